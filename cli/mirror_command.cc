// romulus mirror: holds the replica, watches the primary, and takes its place when it dies (or
// when an operator says so with `romulus promote`).
#include <signal.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <mutex>

#include "absl/strings/str_format.h"
#include "checkpoint/checkpoint.h"
#include "cli/commands.h"
#include "cli/config.h"
#include "cli/host.h"
#include "cli/signals.h"
#include "vmm/ledger_endpoint.h"
#include "vmm/vmm.h"

namespace romulus::cli {
namespace {

using Clock = std::chrono::steady_clock;

double MsSince(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

pb::StatusReply MirrorStatus(const std::string& vm_id, const replicator::Mirror::Stats& s) {
  pb::StatusReply r;
  r.set_role("mirror");
  r.set_vm_id(vm_id);
  if (!s.connected) {
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
  return r;
}

// A failed primary returning as the mirror: the guest memory its monitor left in its
// memory_file and its disk image (replica_disk) become the replica, uncommitted (not
// promotable) until the new primary's synchronisation, which sends only what differs, commits.
// nullptr: nothing to seed from (or it does not fit; it says why).
absl::StatusOr<std::unique_ptr<checkpoint::ReplicaStore>> SeedFromMemoryFile(
    const pb::MirrorConfig& c) {
  if (c.seed_memory_file().empty() || !std::filesystem::exists(c.seed_memory_file())) {
    return nullptr;
  }
  auto no = [&](absl::string_view why) {
    std::printf("romulus mirror: not seeding from %s: %.*s\n", c.seed_memory_file().c_str(),
                static_cast<int>(why.size()), why.data());
    return nullptr;
  };
  std::error_code ec;
  if (std::filesystem::file_size(c.replica_disk(), ec) != c.disk_mib() << 20 || ec) {
    return no(absl::StrCat("replica_disk ", c.replica_disk(), " is not a disk image of ",
                           c.disk_mib(), " MiB"));
  }
  auto memory = vmm::GuestMemory::MapFileShared(c.seed_memory_file(), c.memory_mib() << 20,
                                                /*fresh=*/false);
  if (!memory.ok()) return no(memory.status().message());
  auto replica = checkpoint::ReplicaStore::Adopt(std::move(*memory), c.replica_disk());
  if (!replica.ok()) return no(replica.status().message());
  std::printf(
      "romulus mirror: replica seeded from the memory file %s and disk %s; the next "
      "synchronisation sends only what differs\n",
      c.seed_memory_file().c_str(), c.replica_disk().c_str());
  return replica;
}

// The mirror's replication and, once promoted, the VM it became. A promotion stops receiving,
// resumes the last committed checkpoint as the VM (the replica's memfd becomes guest RAM; the
// replica disk image is used in place), opens the ledger at this host's service address, and
// lets outputs out: there is no mirror for the new primary yet.
class MirrorHost {
 public:
  MirrorHost(const pb::MirrorConfig& c, std::unique_ptr<checkpoint::ReplicaStore> replica,
             std::unique_ptr<replicator::Mirror> mirror, const Switchover& ha)
      : c_(c), replica_(std::move(replica)), mirror_(std::move(mirror)), ha_(ha) {}

  ~MirrorHost() {
    std::lock_guard<std::mutex> lock(mu_);
    endpoint_.reset();
    if (vm_) (void)vm_->Stop();
  }

  bool promoted() const {
    std::lock_guard<std::mutex> lock(mu_);
    return vm_ != nullptr;
  }

  int64_t committed_epoch() const {
    std::lock_guard<std::mutex> lock(mu_);
    return vm_ ? promoted_epoch_ : mirror_->stats().committed_epoch;
  }

  absl::StatusOr<std::string> Promote(bool force, const std::string& why) {
    std::lock_guard<std::mutex> one_at_a_time(promote_mu_);
    auto t0 = Clock::now();
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (vm_) return absl::FailedPreconditionError("already promoted: this host is the primary");
      if (mirror_->stats().committed_epoch < 0) {
        return absl::FailedPreconditionError("no checkpoint committed yet: nothing to resume");
      }
    }
    switchover::PromotionPolicy policy;
    policy.lease = ha_.lease.get();
    policy.fence_command = c_.switchover().fence_command();
    policy.wait =
        std::chrono::milliseconds(policy.lease ? 1000 : c_.switchover().fence_timeout_ms());
    if (auto s = switchover::AuthorizePromotion(policy, force); !s.ok()) {
      return absl::FailedPreconditionError(absl::StrCat("not promoting: ", s.message()));
    }
    double authorised_ms = MsSince(t0);
    // Checked before the replica is handed over, so that a host that cannot run it stays a
    // mirror with its replica intact.
    if (auto s = CanResume(); !s.ok()) {
      if (ha_.lease) ha_.lease->Want(false);  // a host that can run the VM may have the lease
      return absl::FailedPreconditionError(
          absl::StrCat("authorised", force ? " (forced)" : "",
                       ", but cannot resume the replica here: ", s.message()));
    }
    auto t1 = Clock::now();
    std::lock_guard<std::mutex> lock(mu_);
    mirror_.reset();  // nothing more is received or applied: the replica is final
    if (auto s = ResumeReplica(); !s.ok()) return s;
    return absl::StrFormat(
        "promoted (%s): resumed epoch %d as the primary in %.1f ms (authorised in %.1f ms%s); "
        "ledger on %s:%d; running unprotected until a mirror is configured",
        why, promoted_epoch_, MsSince(t1), authorised_ms, force ? ", forced" : "",
        c_.ledger_listen(), endpoint_->port());
  }

  // Planned migration, on the replication thread: the primary paused its VM for good after
  // `epoch`, which is committed here. The primary's own request authorises it; with a witness
  // the primary handed its lease to this node, which takes it before resuming. The mirror is not
  // torn down here (this is its thread): it ends replication itself once this returns OK.
  absl::Status TakeHandover(uint64_t epoch) {
    // Not waited for: a promotion in progress tears the mirror down, joining this thread.
    std::unique_lock<std::mutex> one_at_a_time(promote_mu_, std::try_to_lock);
    if (!one_at_a_time.owns_lock()) {
      return absl::UnavailableError("a promotion is under way on this host");
    }
    auto t0 = Clock::now();
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (vm_) return absl::FailedPreconditionError("already promoted: this host is the primary");
    }
    if (auto s = CanResume(); !s.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("cannot resume the replica here: ", s.message()));
    }
    if (ha_.lease) {
      ha_.lease->Want(true);
      if (auto s = ha_.lease->AcquireWithin(std::chrono::milliseconds(2000)); !s.ok()) {
        ha_.lease->Want(false);
        return absl::FailedPreconditionError(absl::StrCat("no lease: ", s.message()));
      }
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (auto s = ResumeReplica(); !s.ok()) return s;
    std::printf(
        "romulus mirror: handed over: resumed epoch %lu as the primary in %.1f ms; ledger "
        "on %s:%d; running unprotected until a mirror is configured\n",
        static_cast<unsigned long>(epoch), MsSince(t0), c_.ledger_listen().c_str(),
        endpoint_->port());
    std::fflush(stdout);
    return absl::OkStatus();
  }

  // The committed replica becomes the running VM, with its ledger at this host's address. With
  // mu_ held, once replication has stopped.
  absl::Status ResumeReplica() {
    auto committed = replica_->TakeCommitted();
    if (!committed.ok()) return committed.status();
    promoted_epoch_ = committed->epoch;
    auto vm = vmm::Vm::Adopt(
        std::move(committed->memory), committed->state, committed->disk_path,
        [](absl::string_view line) {
          std::printf("romulus mirror: guest: %.*s\n", static_cast<int>(line.size()), line.data());
          std::fflush(stdout);
        },
        &gate_);
    if (!vm.ok()) {
      return absl::InternalError(absl::StrCat(
          "promotion failed after the replica was handed over (restart this host as a mirror): ",
          vm.status().message()));
    }
    auto endpoint =
        vmm::LedgerEndpoint::Start((*vm)->ledger(), gate_, c_.ledger_listen(),
                                   static_cast<uint16_t>(c_.ledger_port()), Logger("mirror"));
    if (!endpoint.ok()) return endpoint.status();
    if (auto s = (*vm)->Start(); !s.ok()) return s;
    vm_ = std::move(*vm);
    endpoint_ = std::move(*endpoint);
    return absl::OkStatus();
  }

  absl::Status CanResume() {
    if (auto s = vmm::CheckKvm(); !s.ok()) return s;
    absl::Status state_ok;
    WithReplica([&](checkpoint::ReplicaStore& r) {
      if (int n = r.committed_state().vcpus_size(); n != 1) {
        state_ok = absl::FailedPreconditionError(
            absl::StrCat("its state has ", n, " vCPUs; this monitor runs one"));
      }
    });
    return state_ok;
  }

  // The lease was lost (another host may be promoted) or regained. The gate closes at once;
  // the lease thread does not wait for a promotion in progress to pause the VM (a VM promoted
  // meanwhile runs behind the closed gate until the lease returns).
  void Fence(bool fenced) {
    gate_.SetFenced(fenced);
    std::unique_lock<std::mutex> lock(mu_, std::try_to_lock);
    if (!lock.owns_lock() || !vm_) return;
    (void)(fenced ? vm_->Pause() : vm_->Resume());
  }

  pb::StatusReply Status() const {
    std::lock_guard<std::mutex> lock(mu_);
    pb::StatusReply r;
    if (vm_) {
      r.set_role("primary");
      r.set_vm_id(c_.vm_id());
      r.set_state(absl::StrFormat(
          "promoted from mirror at epoch %d; running unprotected (no mirror)", promoted_epoch_));
      r.set_committed_epoch(promoted_epoch_);
      r.set_held_outputs(gate_.held());
    } else {
      r = MirrorStatus(c_.vm_id(), mirror_->stats());
    }
    ha_.AddStatus(&r);
    return r;
  }

  // While still a mirror: `fn` runs while no checkpoint is being applied.
  void WithReplica(const std::function<void(checkpoint::ReplicaStore&)>& fn) {
    std::lock_guard<std::mutex> lock(mu_);
    if (mirror_ && !vm_) mirror_->WithReplica(fn);
  }

  std::optional<replicator::Mirror::Stats> MirrorStats() const {
    std::lock_guard<std::mutex> lock(mu_);
    if (!mirror_ || vm_) return std::nullopt;
    return mirror_->stats();
  }

 private:
  const pb::MirrorConfig& c_;
  std::unique_ptr<checkpoint::ReplicaStore> replica_;
  std::mutex promote_mu_;
  mutable std::mutex mu_;
  std::unique_ptr<replicator::Mirror> mirror_;
  const Switchover& ha_;
  vmm::OutputGate gate_;
  std::unique_ptr<vmm::Vm> vm_;
  std::unique_ptr<vmm::LedgerEndpoint> endpoint_;
  int64_t promoted_epoch_ = -1;
};

}  // namespace

int MirrorCommand(int argc, char** argv) {
  std::string path;
  if (int rc = ConfigOnly(
          "mirror", "romulus mirror --config FILE",
          "Holds the replica of the primary's VM: receives each checkpoint, verifies it and "
          "commits it.\nSIGUSR1 (and stopping) saves the committed replica to snapshot_dir, "
          "which\n`romulus vm --restore-from` resumes. With `switchover` heartbeat paths it "
          "watches\nthe primary and, when every path has been silent past the timeout, resumes "
          "the\nreplica as the primary, once the witness's lease (or the fencing command) allows.",
          argc, argv, &path);
      rc >= 0) {
    return rc;
  }
  auto c = LoadMirrorConfig(path);
  if (!c.ok()) return Fail("mirror", c.status());
  auto key = replicator::ReadKeyFile(c->psk_file());
  if (!key.ok()) return Fail("mirror", key.status());
  sigset_t signals = TakeSignals();
  auto replica = SeedFromMemoryFile(*c);
  if (!replica.ok() || *replica == nullptr) {
    replica = checkpoint::ReplicaStore::Create(c->memory_mib() << 20, c->replica_disk(),
                                               c->disk_mib() << 20);
  }
  if (!replica.ok()) return Fail("mirror", replica.status());
  bool seeded = (*replica)->has_contents();  // from a failed primary's memory and disk
  if (!seeded && !c->snapshot_dir().empty() && std::filesystem::exists(c->snapshot_dir())) {
    // The replica this mirror saved when it last stopped: the primary's resynchronisation then
    // sends only what differs. It is not promotable until that synchronisation commits.
    if (auto s = (*replica)->Seed(c->snapshot_dir()); s.ok()) {
      std::printf(
          "romulus mirror: replica seeded from %s; the next synchronisation sends only "
          "what differs\n",
          c->snapshot_dir().c_str());
    } else {
      std::printf("romulus mirror: not seeding from %s: %s\n", c->snapshot_dir().c_str(),
                  std::string(s.message()).c_str());
    }
  }

  std::atomic<bool> peer_dead{false};
  MirrorHost* host_ptr = nullptr;  // set once the host exists; the hooks run only after that
  std::atomic<bool> host_ready{false};
  auto ha = StartSwitchover(c->switchover(), c->vm_id(), "mirror", *key,
                            {.on_peer_dead = [&] { peer_dead = true; },
                             .on_peer_back = [&] { peer_dead = false; },
                             .on_lease_gained =
                                 [&] {
                                   if (host_ready) host_ptr->Fence(false);
                                 },
                             .on_lease_lost =
                                 [&] {
                                   if (host_ready) host_ptr->Fence(true);
                                 }},
                            Logger("mirror"));
  if (!ha.ok()) return Fail("mirror", ha.status());
  auto mirror = replicator::Mirror::Start(
      **replica, {.identity = {c->vm_id(), c->memory_mib() << 20, c->disk_mib() << 20},
                  .key = *key,
                  .listen = c->listen(),
                  .port = static_cast<uint16_t>(c->port()),
                  .on_traffic = ha->TrafficHook(),
                  .on_handover =
                      [&](uint64_t epoch) {
                        if (!host_ready) return absl::UnavailableError("starting or stopping");
                        return host_ptr->TakeHandover(epoch);
                      },
                  .log = Logger("mirror")});
  if (!mirror.ok()) return Fail("mirror", mirror.status());
  uint16_t port = (*mirror)->port();
  MirrorHost host(*c, std::move(*replica), std::move(*mirror), *ha);
  host_ptr = &host;
  host_ready = true;
  auto control = MaybeControl(
      c->control_socket(),
      {.status = [&] { return host.Status(); },
       .promote = [&](bool force) { return host.Promote(force, "asked by an operator"); }});
  if (!control.ok()) return Fail("mirror", control.status());
  std::printf("romulus mirror: waiting for the primary of '%s' on %s:%d\n", c->vm_id().c_str(),
              c->listen().c_str(), port);
  std::fflush(stdout);
  auto save = [&] {
    if (c->snapshot_dir().empty()) return;
    host.WithReplica([&](checkpoint::ReplicaStore& r) {
      auto info = r.SaveSnapshot(c->snapshot_dir());
      if (!info.ok()) {
        std::printf("romulus mirror: no snapshot: %s\n",
                    std::string(info.status().message()).c_str());
      } else {
        std::printf(
            "romulus mirror: saved replica of epoch %ld to %s (memory_xxh3=%016lx "
            "ledger_seq=%lu)\n",
            static_cast<long>(r.committed_epoch()), c->snapshot_dir().c_str(),
            static_cast<unsigned long>(info->memory_xxh3),
            static_cast<unsigned long>(info->guest.ledger_seq));
      }
    });
    std::fflush(stdout);
  };
  // With heartbeats the loop wakes every few milliseconds, so a dead primary is acted on at
  // once; the status line still comes once a second.
  auto tick = std::chrono::milliseconds(ha->heartbeat ? 5 : 1000);
  auto last = host.MirrorStats();
  auto last_line = Clock::now(), next_attempt = Clock::now();
  for (;;) {
    int sig = WaitSignal(signals, tick);
    if (sig == SIGINT || sig == SIGTERM) break;
    if (sig == SIGUSR1) save();
    if (peer_dead && !host.promoted() && host.committed_epoch() >= 0 &&
        Clock::now() >= next_attempt) {
      auto done =
          host.Promote(false, absl::StrFormat("the primary was silent on every path for %d ms",
                                              c->switchover().heartbeat_timeout_ms()));
      std::printf("romulus mirror: %s\n",
                  std::string(done.ok() ? *done : done.status().message()).c_str());
      std::fflush(stdout);
      next_attempt = Clock::now() + std::chrono::seconds(1);
    }
    if (Clock::now() - last_line < std::chrono::seconds(1)) continue;
    last_line = Clock::now();
    auto now = host.MirrorStats();
    if (!now) continue;  // promoted: the VM's own lines say what it does
    std::printf(
        "romulus mirror: %s | committed epoch %ld, %lu checkpoints/s, %.1f MB/s, %lu refused\n",
        now->connected ? "primary connected" : "no primary",
        static_cast<long>(now->committed_epoch),
        static_cast<unsigned long>(now->checkpoints - (last ? last->checkpoints : 0)),
        static_cast<double>(now->bytes - (last ? last->bytes : 0)) / 1e6,
        static_cast<unsigned long>(now->rejected));
    std::fflush(stdout);
    last = now;
  }
  save();  // the replica as of the last committed epoch (if still a mirror), then stop
  control->reset();
  host_ready = false;
  ha->lease.reset();  // its thread calls into the host: stop it before the host goes (the
                      // heartbeats outlive the host, which feeds them replication traffic)
  return 0;
}

}  // namespace romulus::cli
