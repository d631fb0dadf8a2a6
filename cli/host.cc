#include "cli/host.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cli/args.h"
#include "cli/config.h"
#include "cli/load.h"
#include "cli/metrics.h"
#include "cli/service_manager.h"
#include "cli/signals.h"

namespace romulus::cli {
namespace {

using Clock = std::chrono::steady_clock;

// The replication connection's paths, when it has several (parallel paths).
void AddPaths(const std::vector<replicator::PathStats>& paths, pb::StatusReply* r) {
  if (paths.size() < 2) return;
  for (const replicator::PathStats& p : paths) {
    pb::ReplicationPathState* s = r->add_replication_paths();
    s->set_peer(p.peer);
    s->set_up(p.up);
    s->set_bytes_sent(p.bytes_sent);
    s->set_bytes_received(p.bytes_received);
    s->set_resent(p.resent);
    s->set_error(p.error);
  }
}

pb::StatusReply PrimaryStatus(const std::string& vm_id, const replicator::Primary::Stats& s) {
  pb::StatusReply r;
  r.set_role("primary");
  r.set_vm_id(vm_id);
  r.set_state(s.state);
  r.set_peer_connected(s.connected || s.sync.active);
  r.set_peer(s.peer);
  r.set_epochs(s.checkpoints);
  r.set_committed_epoch(static_cast<int64_t>(s.acked) - 1);
  r.set_lag_epochs(s.lag_epochs);
  r.set_held_outputs(s.held_outputs);
  r.set_pause_p50_ms(Percentile(s.pause_ms, 0.5));
  r.set_pause_p99_ms(Percentile(s.pause_ms, 0.99));
  r.set_bytes(s.bytes_sent);
  r.set_resyncs(s.resyncs);
  r.set_unprotected_s(s.unprotected_seconds);
  r.set_failed_connections(s.failed_connections);
  r.set_rejected(s.rejected);
  r.set_protection(s.protection);
  AddPaths(s.paths, &r);
  if (s.sync.active || s.sync.seconds > 0) {
    pb::SyncStatus* y = s.sync.active ? r.mutable_sync() : r.mutable_last_sync();
    y->set_done_bytes(s.sync.done_bytes);
    y->set_total_bytes(s.sync.total_bytes);
    y->set_wire_bytes(s.sync.wire_bytes);
    y->set_round(s.sync.round);
    y->set_unchanged_bytes(s.sync.unchanged_bytes);
    y->set_deduplicated_pages(s.sync.deduplicated_pages);
    y->set_base_pages(s.sync.base_pages);
    y->set_seconds(s.sync.seconds);
    double rate = s.sync.seconds > 0 ? static_cast<double>(s.sync.done_bytes) / s.sync.seconds : 0;
    y->set_mb_per_s(rate / 1e6);
    if (s.sync.active) {
      y->set_eta_s(rate > 0 ? static_cast<double>(s.sync.total_bytes - s.sync.done_bytes) / rate
                            : 0);
    }
  }
  return r;
}

pb::StatusReply MirrorStatus(const std::string& vm_id, const replicator::Mirror::Stats& s) {
  pb::StatusReply r;
  r.set_role("mirror");
  r.set_vm_id(vm_id);
  if (!s.unusable.empty()) {
    r.set_state(absl::StrCat("replica UNUSABLE, never promotable: ", s.unusable));
  } else if (!s.connected) {
    r.set_state(s.committed_epoch < 0 ? "waiting for a primary; no replica yet"
                                      : "waiting for a primary; replica holds its last commit");
  } else if (s.syncing) {
    r.set_state(
        "receiving the initial synchronisation into staging; replica unchanged until it "
        "commits");
  } else {
    r.set_state("replicating");
  }
  r.set_peer_connected(s.connected);
  r.set_peer(s.peer);
  r.set_epochs(s.checkpoints);
  r.set_committed_epoch(s.committed_epoch);
  r.set_bytes(s.bytes);
  r.set_rejected(s.rejected);
  AddPaths(s.paths, &r);
  return r;
}

// The lease's hooks reach the node through this: they may fire before it exists and while it
// is being torn down.
class NodeRef {
 public:
  void Set(switchover::Node* node) {
    std::lock_guard<std::mutex> lock(mu_);
    node_ = node;
  }
  void Fence(bool fenced) {
    std::lock_guard<std::mutex> lock(mu_);
    if (node_) node_->Fence(fenced);
  }
  void Supersede(const std::string& why) {
    std::lock_guard<std::mutex> lock(mu_);
    if (node_) node_->Supersede(why);
  }

 private:
  std::mutex mu_;
  switchover::Node* node_ = nullptr;
};

}  // namespace

int Fail(const char* who, const absl::Status& s) {
  std::fprintf(stderr, "romulus %s: %s\n", who, std::string(s.message()).c_str());
  return 1;
}

replicator::LogFn Logger(const char* who) {
  return [who](absl::string_view line) {
    std::fprintf(stdout, "romulus %s: %.*s\n", who, static_cast<int>(line.size()), line.data());
    std::fflush(stdout);
  };
}

std::function<void(absl::string_view)> GuestConsole(const char* who) {
  return [who](absl::string_view line) {
    std::printf("romulus %s: guest: %.*s\n", who, static_cast<int>(line.size()), line.data());
    std::fflush(stdout);
  };
}

LedgerVm::~LedgerVm() {
  endpoint_.reset();
  (void)vm_->Stop();
}

absl::Status LedgerVm::Start() {
  auto endpoint = vmm::LedgerEndpoint::Start(vm_->ledger(), gate_, listen_, port_, Logger(who_));
  if (!endpoint.ok()) return endpoint.status();
  endpoint_ = std::move(*endpoint);
  if (auto s = vm_->Start(); !s.ok()) return s;
  Logger(who_)(absl::StrFormat("VM running, ledger on %s:%d", listen_, endpoint_->port()));
  return absl::OkStatus();
}

std::unique_ptr<vmm::GuestMemory> LedgerVm::TakeMemory() {
  endpoint_.reset();
  return vm_->TakeMemory();
}

namespace {

// Rates between two samples of a primary's stats `dt` seconds apart.
struct Rates {
  double epochs_per_s, mb_per_s, dirty_per_epoch, pause_p50, pause_p99;
};
Rates RatesBetween(const replicator::Primary::Stats& a, const replicator::Primary::Stats& b,
                   double dt) {
  Rates r{};
  uint64_t epochs = b.checkpoints - a.checkpoints;
  r.epochs_per_s = static_cast<double>(epochs) / dt;
  r.mb_per_s = static_cast<double>(b.bytes_sent - std::min(a.bytes_sent, b.bytes_sent)) / dt / 1e6;
  r.dirty_per_epoch =
      epochs ? static_cast<double>(b.dirty_pages - a.dirty_pages) / static_cast<double>(epochs) : 0;
  std::vector<double> recent(
      b.pause_ms.end() - std::min<size_t>(b.pause_ms.size(), std::max<uint64_t>(epochs, 1)),
      b.pause_ms.end());
  r.pause_p50 = Percentile(recent, 0.5);
  r.pause_p99 = Percentile(recent, 0.99);
  return r;
}

// "synchronising: 120.0/320.0 MiB (37%), 95.1 MB/s, ETA 2.1 s, round 1"
std::string SyncLine(const replicator::Primary::SyncProgress& p) {
  double rate = p.seconds > 0 ? static_cast<double>(p.done_bytes) / p.seconds : 0;
  double left = static_cast<double>(p.total_bytes - std::min(p.done_bytes, p.total_bytes));
  return absl::StrFormat(
      "synchronising: %.1f/%.1f MiB (%.0f%%), %.1f MB/s (%.1f MB on the wire), ETA %s, round %d",
      static_cast<double>(p.done_bytes) / (1 << 20), static_cast<double>(p.total_bytes) / (1 << 20),
      p.total_bytes ? 100.0 * static_cast<double>(p.done_bytes) / static_cast<double>(p.total_bytes)
                    : 0.0,
      rate / 1e6, static_cast<double>(p.wire_bytes) / 1e6,
      rate > 0 ? absl::StrFormat("%.1f s", left / rate) : std::string("?"), p.round);
}

std::string StatusLine(const replicator::Primary::Stats& s, const Rates& r) {
  if (s.sync.active) {
    return absl::StrFormat("%s | held outputs %d", SyncLine(s.sync), s.held_outputs);
  }
  if (!s.connected) return absl::StrFormat("%s | held outputs %d", s.state, s.held_outputs);
  return absl::StrFormat(
      "%s | %.0f epochs/s, pause p50 %.2f ms p99 %.2f ms, %.0f dirty pages/epoch, %.1f MB/s, "
      "held outputs %d, replica lag %d epochs",
      s.connected ? "protected" : "UNPROTECTED", r.epochs_per_s, r.pause_p50, r.pause_p99,
      r.dirty_per_epoch, r.mb_per_s, s.held_outputs, s.lag_epochs);
}

// What a planned migration did, for the operator: its downtime split as the paper splits it,
// transfer (VM paused here until the mirror committed the last checkpoint) plus restart (the
// lease handed over and the VM resumed there).
std::string MigrationLine(const replicator::Primary::HandoverReport& report,
                          const switchover::Node::Status& now) {
  return absl::StrFormat(
      "handed over at epoch %u (%u pages in the last checkpoint): committed %.1f ms and resumed "
      "at the mirror %.1f ms after the VM paused here (downtime %.1f ms = transfer %.1f ms + "
      "restart %.1f ms); %s",
      report.epoch, report.final_pages, report.commit_ms, report.downtime_ms, report.downtime_ms,
      report.commit_ms, std::max(0.0, report.downtime_ms - report.commit_ms),
      now.role == switchover::Node::Role::kMirror
          ? absl::StrFormat("this host is now its mirror (replication on port %d)", now.port)
          : std::string("this host is idle (no replication_port to be the mirror on)"));
}

pb::PostcopyStatus PostcopyStatusOf(const replicator::PostcopyProgress& p, const std::string& side,
                                    const std::string& error) {
  pb::PostcopyStatus s;
  s.set_side(side);
  s.set_pages(p.pages);
  s.set_pages_here(p.pages_here);
  s.set_chunks(p.chunks);
  s.set_chunks_here(p.chunks_here);
  s.set_demand_pages(p.demand_pages);
  s.set_faults(p.faults);
  s.set_fault_wait_p50_ms(p.fault_wait_p50_ms);
  s.set_fault_wait_p99_ms(p.fault_wait_p99_ms);
  double moved =
      static_cast<double>(p.pages_here * vmm::kPageSize + p.chunks_here * vmm::kDiskChunkBytes);
  double left =
      static_cast<double>((p.pages - std::min(p.pages_here, p.pages)) * vmm::kPageSize +
                          (p.chunks - std::min(p.chunks_here, p.chunks)) * vmm::kDiskChunkBytes);
  double rate = p.seconds > 0 ? moved / p.seconds : 0;
  s.set_mb_per_s(rate / 1e6);
  s.set_eta_s(rate > 0 ? left / rate : 0);
  s.set_seconds(p.seconds);
  s.set_done(p.done);
  s.set_precopy_rounds(p.precopy_rounds);
  s.set_error(error);
  return s;
}

void AddHealth(const switchover::HealthMonitor::Status& h, pb::StatusReply* r) {
  pb::HealthStatus* s = r->mutable_health();
  s->set_checks(h.checks);
  s->set_state(h.state);
  s->set_last_decision(h.last_decision);
  for (const std::string& p : h.problems) s->add_problems(p);
  s->set_attempts(h.attempts);
  s->set_refusals(h.refusals);
}

}  // namespace

pb::StatusReply RoleStatusReply(const std::string& vm_id, const switchover::Node::Status& s);

pb::StatusReply NodeStatusReply(const std::string& vm_id, const switchover::Node::Status& s) {
  pb::StatusReply r = RoleStatusReply(vm_id, s);
  if (s.postcopy) {
    *r.mutable_postcopy() = PostcopyStatusOf(*s.postcopy, s.postcopy_side, s.postcopy_error);
    // While it runs, it is what this host does.
    if (!s.postcopy->done && s.postcopy_error.empty()) r.set_state(PostcopyLine(r.postcopy()));
  }
  if (!s.postcopy_error.empty()) {
    r.set_state(absl::StrCat("post-copy failed: ", s.postcopy_error, "; ", r.state()));
  }
  return r;
}

pb::StatusReply RoleStatusReply(const std::string& vm_id, const switchover::Node::Status& s) {
  using Role = switchover::Node::Role;
  if (s.role == Role::kMirror && s.mirror) return MirrorStatus(vm_id, *s.mirror);
  if (s.role == Role::kPrimary && s.primary) {
    pb::StatusReply r = PrimaryStatus(vm_id, *s.primary);
    if (s.resumed_epoch >= 0) {
      r.set_state(
          absl::StrFormat("resumed here at epoch %d%s; %s", s.resumed_epoch,
                          s.handed_over_because.empty()
                              ? ""
                              : absl::StrCat(" (handed over because: ", s.handed_over_because, ")"),
                          r.state()));
    }
    r.set_handed_over_because(s.handed_over_because);
    return r;
  }
  pb::StatusReply r;
  r.set_vm_id(vm_id);
  if (s.role == Role::kPrimary) {
    r.set_role("primary");
    r.set_state(
        s.resumed_epoch >= 0
            ? absl::StrFormat("promoted from mirror at epoch %d; running unprotected (no peer "
                              "configured)",
                              s.resumed_epoch)
            : std::string("running, not replicating"));
    r.set_committed_epoch(s.resumed_epoch);
    r.set_held_outputs(s.held_outputs);
    r.set_handed_over_because(s.handed_over_because);
  } else {
    r.set_role("idle");
    r.set_state("holds neither the VM nor a replica (handed over, or a role change failed)");
  }
  return r;
}

int ConfigOnly(const char* usage, const char* summary, int argc, char** argv, std::string* config,
               std::string* unprotected_command) {
  Args args(usage, summary);
  args.String("config", config, "configuration file (protobuf text format)");
  if (unprotected_command != nullptr) {
    args.String("unprotected-command", unprotected_command,
                "overrides switchover.unprotected_command: must exit 0 before outputs leave "
                "without a mirror (bounded by switchover.fence_timeout_ms)");
  }
  if (int rc = args.Prologue(argc, argv); rc >= 0) return rc;
  if (config->empty()) return args.UsageError("--config is required");
  if (unprotected_command != nullptr && unprotected_command->size() > kMaxCommandBytes) {
    return args.UsageError(
        absl::StrCat("--unprotected-command is longer than ", kMaxCommandBytes, " bytes"));
  }
  return -1;
}

absl::StatusOr<std::unique_ptr<ControlServer>> MaybeControl(const std::string& path,
                                                            ControlHandlers handlers) {
  if (path.empty()) return nullptr;
  return ControlServer::Start(path, std::move(handlers));
}

void Switchover::AddStatus(pb::StatusReply* r) const {
  if (heartbeat) {
    r->set_peer_alive(heartbeat->peer_alive());
    for (const switchover::PathStatus& p : heartbeat->paths()) {
      pb::PathState* s = r->add_paths();
      s->set_name(p.name);
      s->set_up(p.up);
      s->set_loss(p.loss);
      s->set_rtt_ms(p.rtt_ms);
      s->set_timeout_ms(static_cast<uint32_t>(p.timeout.count()));
    }
  }
  if (lease) {
    auto s = lease->status();
    r->set_witness(witness);
    r->set_lease_held(s.held);
    r->set_lease_holder(s.holder);
  }
}

absl::StatusOr<Switchover> StartSwitchover(const pb::SwitchoverConfig& c, const std::string& vm_id,
                                           const std::string& role, const std::string& key,
                                           SwitchoverHooks hooks, replicator::LogFn log) {
  Switchover out;
  if (c.path_size() > 0) {
    switchover::Heartbeat::Options o;
    o.vm_id = vm_id;
    o.node = c.node();
    o.role = role;
    o.key = key;
    for (const pb::HeartbeatPath& p : c.path()) {
      // The config loader has checked both endpoints.
      o.paths.push_back(
          {*switchover::ParseEndpoint(p.local()), *switchover::ParseEndpoint(p.remote())});
    }
    o.interval = std::chrono::milliseconds(c.heartbeat_interval_ms());
    o.timeout = std::chrono::milliseconds(c.heartbeat_timeout_ms());
    o.timeout_max = std::chrono::milliseconds(c.heartbeat_timeout_max_ms());
    o.on_peer_dead = std::move(hooks.on_peer_dead);
    o.on_peer_back = std::move(hooks.on_peer_back);
    o.log = log;
    auto hb = switchover::Heartbeat::Start(std::move(o));
    if (!hb.ok()) return hb.status();
    out.heartbeat = std::move(*hb);
  }
  if (!c.witness().empty()) {
    switchover::LeaseClient::Options o;
    o.vm_id = vm_id;
    o.node = c.node();
    o.key = key;
    o.witness = *switchover::ParseEndpoint(c.witness());
    o.renew = std::chrono::milliseconds(c.lease_renew_ms());
    o.on_gained = std::move(hooks.on_lease_gained);
    o.on_lost = std::move(hooks.on_lease_lost);
    o.on_superseded = std::move(hooks.on_superseded);
    o.log = log;
    auto lease = switchover::LeaseClient::Start(std::move(o));
    if (!lease.ok()) return lease.status();
    out.lease = std::move(*lease);
    out.witness = c.witness();
  }
  return out;
}

namespace {

// `romulus migrate`, as the request and the config's migration block say.
absl::StatusOr<Migrated> Migrate(switchover::Node& n, const pb::MigrateRequest& req,
                                 const pb::MigrationConfig& config) {
  auto timeout = std::chrono::milliseconds(req.timeout_ms() ? req.timeout_ms() : 10000);
  bool postcopy = req.postcopy() || config.postcopy();
  if (!postcopy) {
    if (!req.to().empty() || req.has_precopy_rounds()) {
      return absl::InvalidArgumentError(
          "--to and --precopy-rounds are post-copy's (--postcopy, or migration { postcopy: true "
          "})");
    }
    auto report = n.Migrate(timeout, "asked by an operator (romulus migrate)");
    if (!report.ok()) return report.status();
    return Migrated{.line = MigrationLine(*report, n.status()), .downtime_ms = report->downtime_ms};
  }
  if (!req.accept_postcopy_risk() && !config.accept_postcopy_risk()) {
    return absl::FailedPreconditionError(
        "post-copy puts the VM at risk: until all of its memory has arrived it lives on both "
        "hosts, and dies with this one if it fails; say --accept-postcopy-risk (or "
        "migration { accept_postcopy_risk: true }) to go on");
  }
  switchover::Node::PostcopyTo to;
  to.timeout = timeout;
  if (!req.to().empty()) {
    auto ep = switchover::ParseEndpoint(req.to());
    if (!ep.ok()) return absl::InvalidArgumentError(absl::StrCat("--to: ", ep.status().message()));
    to.host = ep->host;
    to.port = ep->port;
  }
  to.precopy_rounds = req.has_precopy_rounds() ? req.precopy_rounds() : config.precopy_rounds();
  if (to.precopy_rounds > replicator::PostcopyMigration::kMaxPrecopyRounds) {
    return absl::InvalidArgumentError(absl::StrCat(
        "at most ", replicator::PostcopyMigration::kMaxPrecopyRounds, " pre-copy rounds"));
  }
  auto report = n.MigratePostcopy(to, "asked by an operator (romulus migrate --postcopy)");
  if (!report.ok()) return report.status();
  const replicator::PostcopyProgress& p = report->progress;
  switchover::Node::Status now = n.status();
  std::string line = absl::StrFormat(
      "moved by post-copy%s: the guest ran at the destination %.1f ms after it paused here "
      "(downtime), and all of its memory was there after %.1f ms: %d pages and %d disk chunks, "
      "%d of them fetched on demand; %d faults (wait p50 %.2f ms p99 %.2f ms), %.1f MiB sent; %s",
      p.precopy_rounds ? absl::StrFormat(" after %d pre-copy rounds (%.1f MiB)", p.precopy_rounds,
                                         static_cast<double>(p.precopy_bytes) / (1 << 20))
                       : std::string(),
      report->downtime_ms, report->total_ms, p.pages, p.chunks, p.demand_pages + p.demand_chunks,
      p.faults, p.fault_wait_p50_ms, p.fault_wait_p99_ms, static_cast<double>(p.bytes) / (1 << 20),
      now.role == switchover::Node::Role::kMirror
          ? absl::StrFormat("this host is now its mirror (replication on port %d)", now.port)
          : std::string("this host is idle (no replication_port to be the mirror on)"));
  return Migrated{.line = line, .downtime_ms = report->downtime_ms};
}

}  // namespace

int RunHost(const char* who, HostSettings h, const sigset_t& signals, StartNode start) {
  NodeRef ref;
  std::atomic<bool> peer_dead{false};
  auto ha = StartSwitchover(h.switchover, h.vm_id, who, h.node.key,
                            {.on_peer_dead = [&] { peer_dead = true; },
                             .on_peer_back = [&] { peer_dead = false; },
                             .on_lease_gained = [&] { ref.Fence(false); },
                             .on_lease_lost = [&] { ref.Fence(true); },
                             .on_superseded = [&](const std::string& why) { ref.Supersede(why); }},
                            Logger(who));
  if (!ha.ok()) return Fail(who, ha.status());
  h.node.lease = ha->lease.get();
  h.node.heartbeat = ha->heartbeat.get();
  h.node.fence_command = h.switchover.fence_command();
  h.node.fence_timeout = std::chrono::milliseconds(h.switchover.fence_timeout_ms());
  if (const std::string& command = h.switchover.unprotected_command(); !command.empty()) {
    // Without a switchover block (a command-line override alone) no timeout was filled in.
    auto timeout = std::chrono::milliseconds(h.switchover.fence_timeout_ms() != 0
                                                 ? h.switchover.fence_timeout_ms()
                                                 : kDefaultFenceTimeoutMs);
    h.node.before_unprotected = [command, timeout, log = Logger(who)]() -> absl::Status {
      auto t0 = Clock::now();
      absl::Status s = switchover::RunCommand("unprotected command", command, timeout);
      if (s.ok()) {
        log(absl::StrFormat("unprotected command succeeded in %.0f ms: %s",
                            std::chrono::duration<double, std::milli>(Clock::now() - t0).count(),
                            command));
      }
      return s;
    };
  }
  h.node.log = Logger(who);
  h.node.adopt = [who, listen = h.ledger_listen, port = h.ledger_port](
                     checkpoint::ReplicaStore::Committed c,
                     vmm::OutputGate& gate) -> absl::StatusOr<std::unique_ptr<switchover::NodeVm>> {
    auto vm = vmm::Vm::Adopt(std::move(c.memory), c.state, c.disk_path, GuestConsole(who), &gate);
    if (!vm.ok()) return vm.status();
    return std::make_unique<LedgerVm>(std::move(*vm), gate, listen, port, who);
  };
  h.node.adopt_postcopy =
      [who, listen = h.ledger_listen, port = h.ledger_port](
          std::unique_ptr<vmm::GuestMemory> memory, const pb::VmSnapshot& state,
          const std::string& disk_path, vmm::Vm::PostCopy postcopy,
          vmm::OutputGate& gate) -> absl::StatusOr<std::unique_ptr<switchover::NodeVm>> {
    auto vm = vmm::Vm::Adopt(std::move(memory), state, disk_path, GuestConsole(who), &gate,
                             std::move(postcopy));
    if (!vm.ok()) return vm.status();
    return std::make_unique<LedgerVm>(std::move(*vm), gate, listen, port, who);
  };
  h.node.can_resume = [platform = h.platform](const pb::VmSnapshot& state) -> absl::Status {
    if (auto s = vmm::CheckPlatform(platform); !s.ok()) return s;
    return vmm::CheckResumable(state, platform);
  };
  // A mirror whose own policy says move refuses to take the VM. The monitor starts after the
  // node (it moves the node's VM), so the node reaches it through this, cleared before it goes.
  struct HealthRef {
    std::mutex mu;
    switchover::HealthMonitor* monitor = nullptr;
  };
  auto health_ref = std::make_shared<HealthRef>();
  h.node.healthy = [health_ref]() -> absl::Status {
    std::lock_guard<std::mutex> lock(health_ref->mu);
    if (health_ref->monitor == nullptr) return absl::OkStatus();
    auto s = health_ref->monitor->status();
    return s.unhealthy ? absl::UnavailableError(s.state) : absl::OkStatus();
  };
  auto node = start(h.node);
  if (!node.ok()) return Fail(who, node.status());
  ref.Set(node->get());
  switchover::Node& n = **node;
  // Started once the node exists (it asks the node to move its VM); stopped before it goes.
  std::unique_ptr<switchover::HealthMonitor> health;
  if (h.health.ByteSizeLong() > 0) {
    switchover::HealthMonitor::Options o = switchover::HealthOptions(h.health);
    o.active = [&] { return n.status().role == switchover::Node::Role::kPrimary; };
    auto timeout = std::chrono::milliseconds(
        h.health.migrate_timeout_ms() ? h.health.migrate_timeout_ms() : 10000);
    o.migrate = [&, timeout](const std::string& reason) -> absl::Status {
      auto report = n.Migrate(timeout, reason);
      if (!report.ok()) return report.status();
      Logger(who)(MigrationLine(*report, n.status()));
      return absl::OkStatus();
    };
    o.log = Logger(who);
    auto m = switchover::HealthMonitor::Start(std::move(o));
    if (!m.ok()) return Fail(who, m.status());
    health = std::move(*m);
  }
  {
    std::lock_guard<std::mutex> lock(health_ref->mu);
    health_ref->monitor = health.get();
  }
  // Destroyed before `health` (on every return): the node no longer reaches the monitor.
  struct Unref {
    HealthRef& ref;
    ~Unref() {
      std::lock_guard<std::mutex> lock(ref.mu);
      ref.monitor = nullptr;
    }
  } unref{*health_ref};
  // What `romulus status` answers, and the metrics are made of.
  auto status_of = [&](const switchover::Node::Status& st) {
    auto r = NodeStatusReply(h.vm_id, st);
    r.set_platform(std::string(vmm::PlatformName(h.platform)));
    if (absl::Status why = n.vm_exit_status(); !why.ok()) {
      r.set_state(absl::StrCat("VM stopped: ", why.message()));
    }
    r.set_term(st.term);
    if (!st.superseded.empty()) {
      r.set_superseded(st.superseded);
      r.set_state(absl::StrCat("superseded, VM stopped for good: ", st.superseded,
                               " (restart this host as the mirror to rejoin)"));
    }
    ha->AddStatus(&r);
    if (health) AddHealth(health->status(), &r);
    return r;
  };
  std::unique_ptr<MetricsServer> metrics;
  if (!h.metrics_listen.empty()) {
    auto m = MetricsServer::Start(
        h.metrics_listen,
        [&] {
          auto st = n.status();
          return NodeMetrics(status_of(st), st);
        },
        Logger(who));
    if (!m.ok()) return Fail(who, m.status());
    metrics = std::move(*m);
  }
  auto control =
      MaybeControl(h.control_socket,
                   {.status = [&] { return status_of(n.status()); },
                    .promote = [&](bool force) { return n.Promote(force, "asked by an operator"); },
                    .migrate = [&](const pb::MigrateRequest& req) -> absl::StatusOr<Migrated> {
                      auto done = Migrate(n, req, h.migration);
                      if (done.ok()) Logger(who)(done->line);
                      return done;
                    }});
  if (!control.ok()) return Fail(who, control.status());

  auto save = [&] {
    if (h.snapshot_dir.empty()) return;
    n.WithReplica([&](checkpoint::ReplicaStore& r) {
      auto info = r.SaveSnapshot(h.snapshot_dir);
      if (!info.ok()) {
        std::printf("romulus %s: no snapshot: %s\n", who,
                    std::string(info.status().message()).c_str());
      } else {
        std::printf(
            "romulus %s: saved replica of epoch %ld to %s (memory_xxh3=%016lx ledger_seq=%lu)\n",
            who, static_cast<long>(r.committed_epoch()), h.snapshot_dir.c_str(),
            static_cast<unsigned long>(info->memory_xxh3),
            static_cast<unsigned long>(info->guest.ledger_seq));
      }
    });
    std::fflush(stdout);
  };
  // With heartbeats the loop wakes every few milliseconds, so that a dead primary is acted on at
  // once; the status line still comes once a second. Under systemd it wakes often enough for the
  // watchdog too.
  ServiceManager systemd;
  auto tick = systemd.Tick(std::chrono::milliseconds(ha->heartbeat ? 5 : 1000));
  auto last_line = Clock::now(), next_attempt = Clock::now();
  switchover::Node::Status last = n.status();
  bool vm_stopped = false;
  // systemd hears READY once the role is established: a mirror once it listens, a primary once
  // its first checkpoint is committed (or at once when it may run unprotected).
  auto tell_systemd = [&](const switchover::Node::Status& now) {
    // The status reply is built only when systemd would hear it, not on every 5 ms tick.
    if (systemd.StatusDue()) systemd.Status(status_of(now).state());
    if (!now.primary || now.primary->acked > 0 || h.node.run_unprotected) systemd.Ready();
  };
  tell_systemd(last);
  for (;;) {
    int sig = WaitSignal(signals, tick);
    if (sig == SIGINT || sig == SIGTERM) break;
    if (sig == SIGUSR1) save();
    // A guest that stopped on its own (a fault, a panic) leaves this host up, saying why, for
    // `romulus status` and the operator; its replica at the mirror holds the last commit.
    if (absl::Status why = n.vm_exit_status(); !why.ok() && !vm_stopped) {
      vm_stopped = true;
      std::printf(
          "romulus %s: VM stopped: %s (this host keeps answering romulus status; stop it "
          "with SIGTERM)\n",
          who, std::string(why.message()).c_str());
      std::fflush(stdout);
    }
    auto now = n.status();
    // The primary proves progress by its epoch loop; otherwise this loop, which promotes the
    // mirror when the primary dies, is the proof.
    systemd.Watchdog(now.primary ? now.primary->epoch_loop_at : Clock::now());
    tell_systemd(now);
    // A primary in the middle of a hand-over it announced is busy, not dead (a heartbeat late on
    // a loaded host would otherwise start a promotion that takes the lease it is handing over).
    bool handover_expected = now.mirror && now.mirror->connected &&
                             now.mirror->handover_expected_until &&
                             Clock::now() < *now.mirror->handover_expected_until;
    if (peer_dead && now.role == switchover::Node::Role::kMirror &&
        now.mirror->committed_epoch >= 0 && !handover_expected && Clock::now() >= next_attempt) {
      auto done = n.Promote(
          false,
          absl::StrFormat("the primary was silent on every path for %d ms",
                          static_cast<int>(ha->heartbeat ? ha->heartbeat->timeout().count()
                                                         : h.switchover.heartbeat_timeout_ms())));
      std::printf("romulus %s: %s\n", who,
                  std::string(done.ok() ? *done : done.status().message()).c_str());
      std::fflush(stdout);
      next_attempt = Clock::now() + std::chrono::seconds(1);
    }
    if (Clock::now() - last_line < std::chrono::seconds(1)) continue;
    double dt = std::chrono::duration<double>(Clock::now() - last_line).count();
    last_line = Clock::now();
    now = n.status();
    if (now.primary) {
      // A new replication session (a role change) starts its counts afresh.
      bool same = last.primary && last.primary->checkpoints <= now.primary->checkpoints &&
                  last.resumed_epoch == now.resumed_epoch;
      std::printf("romulus %s: %s\n", who,
                  StatusLine(*now.primary,
                             RatesBetween(same ? *last.primary : *now.primary, *now.primary, dt))
                      .c_str());
    } else if (now.mirror) {
      uint64_t checkpoints = last.mirror ? last.mirror->checkpoints : 0;
      uint64_t bytes = last.mirror ? last.mirror->bytes : 0;
      if (checkpoints > now.mirror->checkpoints) checkpoints = bytes = 0;
      std::printf(
          "romulus %s: %s | committed epoch %ld, %lu checkpoints/s, %.1f MB/s, %lu refused\n", who,
          now.mirror->connected ? "primary connected" : "no primary",
          static_cast<long>(now.mirror->committed_epoch),
          static_cast<unsigned long>(now.mirror->checkpoints - checkpoints),
          static_cast<double>(now.mirror->bytes - std::min(bytes, now.mirror->bytes)) / 1e6,
          static_cast<unsigned long>(now.mirror->rejected));
    }
    std::fflush(stdout);
    last = now;
  }
  systemd.Stopping();
  save();  // the replica as of the last committed epoch (if the mirror), then stop
  metrics.reset();
  control->reset();
  {
    std::lock_guard<std::mutex> lock(health_ref->mu);
    health_ref->monitor = nullptr;
  }
  health.reset();    // a move it started ends (within its timeout) before the node goes
  ref.Set(nullptr);  // the lease's hooks no longer reach the node
  node->reset();
  ha->lease.reset();  // the heartbeats outlive the node, which feeds them replication traffic
  std::printf("romulus %s: stopped\n", who);
  return 0;
}

}  // namespace romulus::cli
