// A host's role and its changes. As the primary a node owns the VM, its output gate, the epoch
// engine and the replication to its peer; as the mirror, the replica and its listener. Two locks:
// role_mu_ lets one role change run at a time (a change can take seconds: a hand-over, a
// promotion); mu_ guards the parts, is held only to read or swap them, and is never held while
// a part is torn down (tearing down a mirror joins the thread that may be asking for mu_).
#include <mutex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "switchover/switchover.h"

namespace romulus::switchover {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

double MsSince(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

class NodeImpl : public Node {
 public:
  explicit NodeImpl(Options o) : o_(std::move(o)), disk_path_(o_.disk_path) {}

  ~NodeImpl() override {
    std::lock_guard<std::mutex> one_at_a_time(role_mu_);
    AsPrimary p;
    AsMirror m;
    {
      std::lock_guard<std::mutex> lock(mu_);
      role_ = Role::kIdle;
      p = std::move(p_);
      m = std::move(m_);
    }
    p.Reset();
    m.Reset();
  }

  // The peer's listener on every path: none beyond peer_host:peer_port without parallel paths.
  std::vector<replicator::Primary::Options::Path> PeerPaths() const {
    if (o_.peer_paths.empty()) return {};
    std::vector<replicator::Primary::Options::Path> paths = {{o_.peer_host, o_.peer_port}};
    paths.insert(paths.end(), o_.peer_paths.begin(), o_.peer_paths.end());
    return paths;
  }

  absl::Status RunAsPrimary(std::unique_ptr<vmm::OutputGate> gate, std::unique_ptr<NodeVm> vm,
                            bool run_unprotected) {
    AsPrimary p;
    p.gate = std::move(gate);
    p.vm = std::move(vm);
    // Without a peer nothing would ever acknowledge an epoch: the gate stays open instead.
    if (o_.peer_port != 0) {
      p.engine = std::make_unique<checkpoint::EpochEngine>(
          *p.vm, *p.gate,
          checkpoint::EpochEngine::Options{.max_in_flight_bytes = o_.max_in_flight_bytes});
    }
    if (auto s = p.vm->Start(); !s.ok()) return s;
    if (p.engine) {
      auto r = replicator::Primary::Start(*p.engine, *p.gate,
                                          {.identity = o_.identity,
                                           .key = o_.key,
                                           .mirror_host = o_.peer_host,
                                           .mirror_port = o_.peer_port,
                                           .mirror_paths = PeerPaths(),
                                           .epoch = o_.epoch,
                                           .run_unprotected = run_unprotected,
                                           .before_unprotected = o_.before_unprotected,
                                           .compression = o_.compression,
                                           .protection = o_.protection,
                                           .on_traffic = TrafficHook(),
                                           .base_image = o_.base_image,
                                           .log = o_.log});
      if (!r.ok()) return r.status();
      p.primary = std::move(*r);
    }
    if (o_.heartbeat) o_.heartbeat->SetRole("primary");
    std::lock_guard<std::mutex> lock(mu_);
    p_ = std::move(p);
    role_ = Role::kPrimary;
    // The lease may have been lost while the VM was being built.
    if (o_.lease ? !o_.lease->held() : fenced_) ApplyFence(true);
    return absl::OkStatus();
  }

  absl::Status RunAsMirror(std::unique_ptr<checkpoint::ReplicaStore> replica) {
    AsMirror old;
    {
      std::lock_guard<std::mutex> lock(mu_);
      old = std::move(m_);  // the one that was handed the VM, if any: it ended its replication
    }
    old.Reset();
    auto m = replicator::Mirror::Start(
        *replica,
        {.identity = o_.identity,
         .key = o_.key,
         .listen = o_.listen,
         .port = o_.port,
         .listen_paths = o_.listen_paths,
         .protection = o_.protection,
         .on_traffic = TrafficHook(),
         .on_handover = [this](uint64_t epoch,
                               const std::string& reason) { return TakeHandover(epoch, reason); },
         .base_image = o_.base_image,
         .log = o_.log});
    if (!m.ok()) return m.status();
    o_.port = (*m)->port();  // the peer finds this node there again after the next role change
    if (o_.heartbeat) o_.heartbeat->SetRole("mirror");
    std::lock_guard<std::mutex> lock(mu_);
    m_.replica = std::move(replica);
    m_.mirror = std::move(*m);
    role_ = Role::kMirror;
    return absl::OkStatus();
  }

  absl::StatusOr<replicator::Primary::HandoverReport> Migrate(milliseconds timeout,
                                                              const std::string& reason) override {
    std::lock_guard<std::mutex> one_at_a_time(role_mu_);
    replicator::Primary* primary;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (role_ != Role::kPrimary) {
        return absl::FailedPreconditionError("only a primary can migrate its VM");
      }
      if (!p_.primary) {
        return absl::FailedPreconditionError(
            "no peer is configured: there is nothing to migrate to");
      }
      primary = p_.primary.get();
    }
    // With a witness the lease goes to the mirror once it committed the last checkpoint (this
    // host then counts as fenced); if the mirror still refuses, it is taken back.
    bool transferred = false;
    auto report = primary->HandOver(
        timeout,
        [&]() -> absl::Status {
          if (!o_.lease) return absl::OkStatus();
          std::string peer = o_.heartbeat ? o_.heartbeat->peer_node() : "";
          if (peer.empty()) {
            return absl::FailedPreconditionError(
                "the mirror's node name is unknown (no heartbeat heard): the lease cannot go to "
                "it");
          }
          auto s = o_.lease->TransferTo(peer, milliseconds(1000));
          transferred = s.ok();
          return s;
        },
        reason);
    if (!report.ok()) {
      if (transferred && report.status().code() == absl::StatusCode::kAborted) {
        o_.lease->Want(true);
        if (auto s = o_.lease->AcquireWithin(milliseconds(3000)); !s.ok()) {
          return absl::UnavailableError(
              absl::StrCat(report.status().message(), "; but the lease did not come back (",
                           s.message(), "): the VM stays paused here until it does"));
        }
      }
      return report.status();
    }
    migration_downtime_seconds_.Observe(report->downtime_ms / 1000);
    // The VM runs on the other host now. This one's memory and disk hold exactly the checkpoint
    // it resumed: they become its replica, and its synchronisation sends only what differs.
    AsPrimary old;
    {
      std::lock_guard<std::mutex> lock(mu_);
      old = std::move(p_);
      role_ = Role::kIdle;
    }
    old.primary.reset();
    old.engine.reset();
    std::unique_ptr<vmm::GuestMemory> memory = old.vm->TakeMemory();
    old.Reset();
    if (o_.listen.empty()) {
      Log("handed over; no replication listener is configured, so this host stays idle");
    } else if (memory == nullptr) {
      Log("handed over, but the VM gave up no memory: this host stays idle");
    } else if (auto replica = checkpoint::ReplicaStore::Adopt(std::move(memory), disk_path_);
               !replica.ok()) {
      Log(absl::StrCat("handed over, but cannot become the mirror: ", replica.status().message()));
    } else if (auto s = RunAsMirror(std::move(*replica)); !s.ok()) {
      Log(absl::StrCat("handed over, but cannot become the mirror: ", s.message()));
    } else {
      Log(absl::StrFormat(
          "handed over; now the mirror of the new primary on %s:%d, seeded with this host's "
          "memory and disk",
          o_.listen, o_.port));
    }
    return report;
  }

  absl::StatusOr<std::string> Promote(bool force, const std::string& why) override {
    std::lock_guard<std::mutex> one_at_a_time(role_mu_);
    auto t0 = Clock::now();
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (role_ == Role::kPrimary) {
        return absl::FailedPreconditionError("already promoted: this host is the primary");
      }
      if (role_ != Role::kMirror)
        return absl::FailedPreconditionError("this host holds no replica");
      if (m_.mirror->stats().committed_epoch < 0) {
        return absl::FailedPreconditionError("no checkpoint committed yet: nothing to resume");
      }
    }
    PromotionPolicy policy{.lease = o_.lease,
                           .fence_command = o_.fence_command,
                           .wait = o_.lease ? milliseconds(1000) : o_.fence_timeout};
    if (auto s = AuthorizePromotion(policy, force); !s.ok()) {
      return absl::FailedPreconditionError(absl::StrCat("not promoting: ", s.message()));
    }
    double authorised_ms = MsSince(t0);
    // Checked before the replica is given up, so that a host that cannot run it stays a mirror
    // with its replica intact.
    if (auto s = CanResume(); !s.ok()) {
      if (o_.lease) o_.lease->Want(false);  // a host that can run the VM may have the lease
      return absl::FailedPreconditionError(
          absl::StrCat("authorised", force ? " (forced)" : "",
                       ", but cannot resume the replica here: ", s.message()));
    }
    auto t1 = Clock::now();
    std::unique_ptr<replicator::Mirror> mirror;
    {
      std::lock_guard<std::mutex> lock(mu_);
      mirror = std::move(m_.mirror);
      role_ = Role::kIdle;
    }
    mirror.reset();  // nothing more is received or applied: the replica is final
    if (auto s = ResumeReplica(); !s.ok()) return s;
    promotion_seconds_.Observe(MsSince(t0) / 1000);
    return absl::StrFormat(
        "promoted (%s): resumed epoch %d as the primary in %.1f ms (authorised in %.1f ms%s); %s",
        why, resumed_epoch_, MsSince(t1), authorised_ms, force ? ", forced" : "", Protection());
  }

  void Fence(bool fenced) override {
    std::lock_guard<std::mutex> lock(mu_);
    fenced_ = fenced;
    if (role_ == Role::kPrimary) ApplyFence(fenced);
  }

  Status status() const override {
    std::lock_guard<std::mutex> lock(mu_);
    Status s;
    s.role = role_;
    s.resumed_epoch = resumed_epoch_;
    s.handed_over_because = handed_over_because_;
    s.promotion_seconds = promotion_seconds_.snapshot();
    s.migration_downtime_seconds = migration_downtime_seconds_.snapshot();
    if (role_ == Role::kPrimary) {
      if (p_.primary) s.primary = p_.primary->stats();
      s.held_outputs = p_.gate->held();
    }
    if (role_ == Role::kMirror) {
      s.mirror = m_.mirror->stats();
      s.port = m_.mirror->port();
    }
    return s;
  }

  void WithReplica(const std::function<void(checkpoint::ReplicaStore&)>& fn) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (role_ == Role::kMirror) m_.mirror->WithReplica(fn);
  }

  absl::Status vm_exit_status() override {
    std::lock_guard<std::mutex> lock(mu_);
    return role_ == Role::kPrimary ? p_.vm->exit_status() : absl::OkStatus();
  }

 private:
  // Declared so that they are destroyed in the right order: replication, then the engine, then
  // the VM, then the gate its outputs pass through; the mirror before its replica.
  struct AsPrimary {
    std::unique_ptr<vmm::OutputGate> gate;
    std::unique_ptr<NodeVm> vm;
    std::unique_ptr<checkpoint::EpochEngine> engine;
    std::unique_ptr<replicator::Primary> primary;
    void Reset() {
      primary.reset();
      engine.reset();
      vm.reset();
      gate.reset();
    }
  };
  struct AsMirror {
    std::unique_ptr<checkpoint::ReplicaStore> replica;
    std::unique_ptr<replicator::Mirror> mirror;
    void Reset() {
      mirror.reset();
      replica.reset();
    }
  };

  // Planned migration, on the mirror's replication thread: the primary paused its VM for good
  // after `epoch`, committed here. The primary's request authorises it; with a witness the
  // primary handed its lease to this node, which takes it before resuming. The mirror is not
  // torn down here (this is its thread): it ends replication once this returns OK, and goes at
  // the next role change.
  absl::Status TakeHandover(uint64_t epoch, const std::string& reason) {
    // Not waited for: a promotion in progress tears the mirror down, joining this thread.
    std::unique_lock<std::mutex> one_at_a_time(role_mu_, std::try_to_lock);
    if (!one_at_a_time.owns_lock()) {
      return absl::UnavailableError("a role change is under way on this host");
    }
    auto t0 = Clock::now();
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (role_ != Role::kMirror) return absl::FailedPreconditionError("this host is no mirror");
    }
    if (o_.healthy) {
      if (auto s = o_.healthy(); !s.ok()) {
        return absl::FailedPreconditionError(absl::StrCat("this host is unhealthy: ", s.message()));
      }
    }
    if (auto s = CanResume(); !s.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("cannot resume the replica here: ", s.message()));
    }
    if (o_.lease) {
      o_.lease->Want(true);
      if (auto s = o_.lease->AcquireWithin(milliseconds(2000)); !s.ok()) {
        o_.lease->Want(false);
        return absl::FailedPreconditionError(absl::StrCat("no lease: ", s.message()));
      }
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      role_ = Role::kIdle;
    }
    if (auto s = ResumeReplica(); !s.ok()) return s;
    {
      std::lock_guard<std::mutex> lock(mu_);
      handed_over_because_ = reason.empty() ? "not said (an older primary)" : reason;
    }
    Log(absl::StrFormat("handed over: resumed epoch %d as the primary in %.1f ms (restart); %s%s",
                        epoch, MsSince(t0), Protection(),
                        reason.empty() ? "" : absl::StrCat("; the VM moved because: ", reason)));
    return absl::OkStatus();
  }

  // The committed replica becomes the running VM. With role_mu_ held, once nothing more is
  // applied to the replica.
  absl::Status ResumeReplica() {
    auto committed = m_.replica->TakeCommitted();
    if (!committed.ok()) return committed.status();
    int64_t epoch = committed->epoch;
    std::string disk = committed->disk_path;
    auto gate = std::make_unique<vmm::OutputGate>();
    auto vm = o_.adopt(std::move(*committed), *gate);
    if (!vm.ok()) {
      return absl::InternalError(absl::StrCat(
          "promotion failed after the replica was handed over (restart this host as a mirror): ",
          vm.status().message()));
    }
    disk_path_ = disk;
    {
      std::lock_guard<std::mutex> lock(mu_);
      resumed_epoch_ = epoch;
      handed_over_because_.clear();  // a hand-over says why once this returns
    }
    return RunAsPrimary(std::move(gate), std::move(*vm), /*run_unprotected=*/true);
  }

  absl::Status CanResume() {
    if (!o_.adopt) return absl::FailedPreconditionError("this host has no way to run the VM");
    if (!o_.can_resume) return absl::OkStatus();
    pb::VmSnapshot state;
    WithReplica([&](checkpoint::ReplicaStore& r) { state = r.committed_state(); });
    return o_.can_resume(state);
  }

  // With mu_ held, as the primary.
  void ApplyFence(bool fenced) {
    if (p_.engine) {
      (void)p_.engine->Suspend(fenced);
      return;
    }
    p_.gate->SetFenced(fenced);
    (void)(fenced ? p_.vm->Pause() : p_.vm->Resume());
  }

  std::string Protection() const {
    if (o_.peer_port == 0) return "running unprotected (no peer is configured)";
    return absl::StrFormat(
        "replicating to %s:%d, unprotected until the other host returns there as the mirror",
        o_.peer_host, o_.peer_port);
  }

  std::function<void()> TrafficHook() const {
    if (!o_.heartbeat) return nullptr;
    return [hb = o_.heartbeat] { hb->NoteTrafficFromPeer(); };
  }

  void Log(const std::string& line) const {
    if (o_.log) o_.log(line);
  }

  Options o_;
  std::string disk_path_;  // the disk image of the VM, whichever role
  std::mutex role_mu_;
  mutable std::mutex mu_;
  checkpoint::Histogram promotion_seconds_ = checkpoint::Histogram::Seconds();
  checkpoint::Histogram migration_downtime_seconds_ = checkpoint::Histogram::Seconds();
  Role role_ = Role::kIdle;
  bool fenced_ = false;
  int64_t resumed_epoch_ = -1;
  std::string handed_over_because_;
  AsPrimary p_;
  AsMirror m_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Node>> Node::StartPrimary(std::unique_ptr<vmm::OutputGate> gate,
                                                         std::unique_ptr<NodeVm> vm,
                                                         Options options) {
  bool run_unprotected = options.run_unprotected;
  auto node = std::make_unique<NodeImpl>(std::move(options));
  if (auto s = node->RunAsPrimary(std::move(gate), std::move(vm), run_unprotected); !s.ok()) {
    return s;
  }
  return node;
}

absl::StatusOr<std::unique_ptr<Node>> Node::StartMirror(
    std::unique_ptr<checkpoint::ReplicaStore> replica, Options options) {
  auto node = std::make_unique<NodeImpl>(std::move(options));
  if (auto s = node->RunAsMirror(std::move(replica)); !s.ok()) return s;
  return node;
}

}  // namespace romulus::switchover
