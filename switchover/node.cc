// A host's role and its changes. As the primary a node owns the VM, its output gate, the epoch
// engine and the replication to its peer; as the mirror, the replica and its listener. Two locks:
// role_mu_ lets one role change run at a time (a change can take seconds: a hand-over, a
// promotion); mu_ guards the parts, is held only to read or swap them, and is never held while
// a part is torn down (tearing down a mirror joins the thread that may be asking for mu_).
#include <unistd.h>

#include <atomic>
#include <mutex>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "switchover/authority.h"
#include "switchover/switchover.h"

namespace romulus::switchover {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// How long a disk command of a VM arriving by post-copy waits for a chunk before the VM stops
// (the source's failure stops it sooner).
constexpr milliseconds kChunkStall{10000};
// How long a VM handed over to this host holds its outputs for the host it came from, alive, to
// commit its first checkpoint here.
constexpr milliseconds kHandoverWindow{10000};

double MsSince(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

class NodeImpl : public Node {
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
    run_unprotected_ = run_unprotected;
    EnterTerm(*p.gate);
    AttachEngine(p);
    if (auto s = p.vm->Start(); !s.ok()) return s;
    if (auto s = Replicate(p); !s.ok()) return s;
    if (o_.heartbeat) o_.heartbeat->SetRole("primary");
    std::lock_guard<std::mutex> lock(mu_);
    p_ = std::move(p);
    role_ = Role::kPrimary;
    // The lease may have been lost while the VM was being built.
    if (o_.lease ? !o_.lease->held() : fenced_) ApplyFence(true);
    return absl::OkStatus();
  }

  // Without a peer nothing would ever acknowledge an epoch: the gate stays open instead.
  void AttachEngine(AsPrimary& p) {
    if (o_.peer_port == 0) return;
    p.engine = std::make_unique<checkpoint::EpochEngine>(
        *p.vm, *p.gate,
        checkpoint::EpochEngine::Options{.max_in_flight_bytes = o_.max_in_flight_bytes});
  }

  // Replication of `p`'s VM (attached to its engine) to the peer.
  absl::Status Replicate(AsPrimary& p) {
    if (!p.engine) return absl::OkStatus();
    auto r = replicator::Primary::Start(*p.engine, *p.gate,
                                        {.identity = o_.identity,
                                         .key = o_.key,
                                         .mirror_host = o_.peer_host,
                                         .mirror_port = o_.peer_port,
                                         .mirror_paths = PeerPaths(),
                                         .epoch = o_.epoch,
                                         .run_unprotected = run_unprotected_,
                                         .term = LeaseTerm(),
                                         .before_unprotected = BeforeUnprotected(),
                                         .on_mirror_commits = MirrorCommitsHook(),
                                         .compression = o_.compression,
                                         .protection = o_.protection,
                                         .on_traffic = TrafficHook(),
                                         .base_image = o_.base_image,
                                         .log = o_.log});
    if (!r.ok()) return r.status();
    p.primary = std::move(*r);
    return absl::OkStatus();
  }

  // `term`: that of what the replica holds (a planned migration's old primary's own).
  absl::Status RunAsMirror(std::unique_ptr<checkpoint::ReplicaStore> replica, uint64_t term = 0) {
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
         .on_peer_closed = o_.heartbeat ? [hb = o_.heartbeat] { hb->NotePeerClosedStream(); }
                                        : std::function<void()>(),
         .on_handover = [this](uint64_t epoch,
                               const std::string& reason) { return TakeHandover(epoch, reason); },
         .base_image = o_.base_image,
         .postcopy = o_.adopt_postcopy
                         ? [this](const replicator::Mirror::Options::ReceivePostcopy&
                                      receive) { return TakePostcopy(receive); }
                         : std::function<absl::Status(
                               const replicator::Mirror::Options::ReceivePostcopy&)>(),
         .term = term,
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
    // A mirror that resumed the VM but did not answer holds the handed term tentatively until
    // this host commits a checkpoint of its, which it never will: a newer term granted here
    // proves the mirror cannot release anything, and the VM may run here again.
    auto report = primary->HandOver(
        timeout,
        [&]() -> absl::Status {
          return o_.lease ? HandLeaseToPeer(&transferred) : absl::OkStatus();
        },
        reason,
        [&]() -> absl::Status {
          if (!transferred) return absl::FailedPreconditionError("no lease was handed over");
          return TakeLeaseBack(absl::UnavailableError("the mirror did not answer"));
        });
    if (!report.ok()) {
      if (transferred && report.status().code() == absl::StatusCode::kAborted) {
        if (auto s = TakeLeaseBack(report.status()); !s.ok()) return s;
      }
      return report.status();
    }
    migration_downtime_seconds_.Observe(report->downtime_ms / 1000);
    BecomeMirrorOfNewPrimary(report->epoch);
    return report;
  }

  // The VM runs on the other host now. This one's memory and disk hold exactly what it resumed:
  // they become its replica, and its synchronisation sends only what differs. After a hand-over
  // (`handed_over_epoch`) the replica is that checkpoint, committed: the new primary releases
  // nothing until this host committed its first checkpoint, so should it fail before, this host
  // resumes the VM exactly where it left it. With role_mu_.
  void BecomeMirrorOfNewPrimary(std::optional<uint64_t> handed_over_epoch = std::nullopt) {
    AsPrimary old;
    {
      std::lock_guard<std::mutex> lock(mu_);
      old = std::move(p_);
      role_ = Role::kIdle;
      moving_ = false;
    }
    old.primary.reset();
    old.engine.reset();
    absl::StatusOr<pb::VmSnapshot> state = absl::UnavailableError("not asked");
    if (handed_over_epoch) {
      state = old.vm->SaveState();  // paused for good since the hand-over
      if (!state.ok()) {
        Log(absl::StrCat("the hand-over's state cannot be kept here (", state.status().message(),
                         "): this host's replica is a seed, not promotable until it commits"));
      }
    }
    std::unique_ptr<vmm::GuestMemory> memory = old.vm->TakeMemory();
    old.Reset();
    auto adopt = [&]() -> absl::StatusOr<std::unique_ptr<checkpoint::ReplicaStore>> {
      if (state.ok()) {
        return checkpoint::ReplicaStore::Adopt(std::move(memory), disk_path_, *state,
                                               *handed_over_epoch);
      }
      return checkpoint::ReplicaStore::Adopt(std::move(memory), disk_path_);
    };
    uint64_t term = o_.lease ? o_.lease->term() : 0;
    if (o_.listen.empty()) {
      Log("handed over; no replication listener is configured, so this host stays idle");
    } else if (memory == nullptr) {
      Log("handed over, but the VM gave up no memory: this host stays idle");
    } else if (auto replica = adopt(); !replica.ok()) {
      Log(absl::StrCat("handed over, but cannot become the mirror: ", replica.status().message()));
    } else if (auto s = RunAsMirror(std::move(*replica), state.ok() ? term : 0); !s.ok()) {
      Log(absl::StrCat("handed over, but cannot become the mirror: ", s.message()));
    } else {
      Log(absl::StrFormat(
          "handed over; now the mirror of the new primary on %s:%d, %s", o_.listen, o_.port,
          state.ok() ? absl::StrFormat("holding the hand-over's state (epoch %d) until the new "
                                       "primary's first checkpoint commits here",
                                       *handed_over_epoch)
                     : std::string("seeded with this host's memory and disk")));
    }
  }

  absl::StatusOr<replicator::PostcopyMigration::Report> MigratePostcopy(
      const PostcopyTo& to, const std::string& reason) override {
    std::lock_guard<std::mutex> one_at_a_time(role_mu_);
    replicator::PostcopyMigration::Options po{.identity = o_.identity,
                                              .key = o_.key,
                                              .host = to.host.empty() ? o_.peer_host : to.host,
                                              .port = to.host.empty() ? o_.peer_port : to.port,
                                              .protection = o_.protection,
                                              .peer_timeout = to.timeout,
                                              .compression = o_.compression,
                                              .precopy_rounds = to.precopy_rounds,
                                              .before_start = nullptr,
                                              .log = o_.log};
    if (po.port == 0) {
      return absl::FailedPreconditionError(
          "no destination: no peer is configured, so post-copy needs one named (--to HOST:PORT)");
    }
    // With a witness the lease goes to the destination (named by the heartbeats, so it must be
    // the peer) before the VM's state does; if the migration fails it is taken back.
    bool transferred = false;
    if (o_.lease) {
      po.before_start = [&] { return HandLeaseToPeer(&transferred); };
    }
    auto migration = std::make_shared<replicator::PostcopyMigration>(std::move(po));
    NodeVm* vm;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (role_ != Role::kPrimary) {
        return absl::FailedPreconditionError("only a primary can migrate its VM");
      }
      vm = p_.vm.get();
      moving_ = true;
      postcopy_ = migration;
      postcopy_side_ = "source";
      postcopy_error_.clear();
      postcopy_last_.reset();
    }
    Log(absl::StrFormat("post-copy migration to %s:%d begins (%s)",
                        to.host.empty() ? o_.peer_host : to.host,
                        to.host.empty() ? o_.peer_port : to.port, reason));
    // Protection to the old mirror ends; the VM runs on. What it said since the mirror's last
    // commit stays held: released once the VM is whole at the destination, or by the next
    // mirror's commits if it resumes here.
    StopReplication();
    auto report = migration->Run(*vm);
    {
      std::lock_guard<std::mutex> lock(mu_);
      postcopy_.reset();
      postcopy_last_ = migration->progress();
      if (!report.ok()) postcopy_error_ = std::string(report.status().message());
    }
    if (!report.ok()) {
      if (absl::IsUnavailable(report.status())) {
        return absl::UnavailableError(
            absl::StrCat(report.status().message(),
                         "; the destination may be running the VM, so it stays paused here"));
      }
      if (transferred) {
        if (auto s = TakeLeaseBack(report.status()); !s.ok()) return s;
      }
      if (auto s = ResumeHere(); !s.ok()) {
        return absl::InternalError(absl::StrCat(report.status().message(),
                                                "; and the VM did not resume here: ", s.message()));
      }
      return absl::AbortedError(
          absl::StrCat(report.status().message(), "; the VM runs here again"));
    }
    migration_downtime_seconds_.Observe(report->downtime_ms / 1000);
    {
      std::lock_guard<std::mutex> lock(mu_);
      postcopy_last_ = report->progress;
      // The VM is whole at the destination, which continues from the state that said them: what
      // it said here may leave, though the lease (and with it the fence) went with the VM.
      p_.gate->ReleaseThrough(p_.gate->Mark());
      p_.gate->SetFenced(false);
    }
    BecomeMirrorOfNewPrimary();
    return report;
  }

  absl::StatusOr<std::string> Promote(bool force, const std::string& why) override {
    std::lock_guard<std::mutex> one_at_a_time(role_mu_);
    auto t0 = Clock::now();
    uint64_t replica_term;  // what the promotion resumes from, for the witness
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (role_ == Role::kPrimary) {
        return absl::FailedPreconditionError("already promoted: this host is the primary");
      }
      if (role_ != Role::kMirror)
        return absl::FailedPreconditionError("this host holds no replica");
      auto replica = m_.mirror->stats();
      if (!replica.unusable.empty()) {
        return absl::FailedPreconditionError(
            absl::StrCat("the replica is unusable, nothing to resume: ", replica.unusable));
      }
      if (replica.committed_epoch < 0) {
        return absl::FailedPreconditionError("no checkpoint committed yet: nothing to resume");
      }
      replica_term = replica.term;
    }
    PromotionPolicy policy{
        .lease = o_.lease,
        .state_term = replica_term,
        // It acknowledges nothing more, and resumes what it committed; the
        // VM it resumes runs without a mirror until the other host returns.
        // A takeover only when the primary's process is seen to have died
        // (its stream closed): a silence alone may be a host too busy to
        // send, which its lease then protects from a needless failover.
        .promotion = {.takeover = o_.heartbeat && o_.heartbeat->peer_closed_stream(),
                      .unprotected = true},
        .fence_command = o_.fence_command,
        .wait = o_.lease ? milliseconds(1000) : o_.fence_timeout};
    if (auto s = AuthorizePromotion(policy, force); !s.ok()) {
      return absl::FailedPreconditionError(absl::StrCat("not promoting: ", s.message()));
    }
    double authorised_ms = MsSince(t0);
    forced_ = force;
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
    if (auto s = ResumeReplica(); !s.ok()) {
      // Nothing holds the lease that does not run the VM (the old primary stays superseded).
      if (o_.lease) o_.lease->Want(false);
      return s;
    }
    promotion_seconds_.Observe(MsSince(t0) / 1000);
    return absl::StrFormat(
        "promoted (%s): resumed epoch %d as the primary in %.1f ms (authorised in %.1f ms%s); %s",
        why, resumed_epoch_, MsSince(t1), authorised_ms, force ? ", forced" : "", Protection());
  }

  void Fence(bool fenced) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (!superseded_.empty()) return;  // for good
    fenced_ = fenced;
    if (role_ == Role::kPrimary) ApplyFence(fenced);
  }

  void Supersede(const std::string& why) override {
    std::lock_guard<std::mutex> lock(mu_);
    // A mirror whose promotion the witness refused so holds an old replica; the next
    // synchronisation brings it the current term.
    if (role_ != Role::kPrimary || !superseded_.empty()) return;
    superseded_ = why;
    superseded_flag_ = true;
    fenced_ = true;
    ApplyFence(true);
    Log(absl::StrCat("superseded, the VM stopped here for good (nothing it said is released): ",
                     why, ". This host may rejoin only as the mirror of the primary"));
  }

  Status status() const override {
    std::lock_guard<std::mutex> lock(mu_);
    Status s;
    s.role = role_;
    s.resumed_epoch = resumed_epoch_;
    s.handed_over_because = handed_over_because_;
    s.superseded = superseded_;
    s.term = o_.lease ? o_.lease->term() : 0;
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
    s.postcopy_side = postcopy_side_;
    s.postcopy_error = postcopy_error_;
    if (postcopy_) {
      s.postcopy = postcopy_->progress();
    } else if (postcopy_side_ == "destination" && m_.mirror) {
      s.postcopy = m_.mirror->stats().postcopy;  // under way, or how it ended
    } else {
      s.postcopy = postcopy_last_;
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
    // Tentative, like the outputs: the old host holds the hand-over's state, committed, until
    // it commits this host's first checkpoint, and resumes it should this host fail before.
    if (auto s = TakeLeaseToRun(/*tentative=*/true); !s.ok()) return s;
    {
      std::lock_guard<std::mutex> lock(mu_);
      role_ = Role::kIdle;
    }
    handover_window_until_ = Clock::now() + kHandoverWindow;
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

  // Post-copy migration to this host, on the mirror's replication thread (see Migrate for the
  // lease). The VM runs here from the moment it is adopted, its outputs held until every page
  // is here; then it is the primary, replicating to the peer. If the source fails first the
  // guest is stopped and this host is idle: the VM never runs on a page that did not arrive.
  absl::Status TakePostcopy(const replicator::Mirror::Options::ReceivePostcopy& receive) {
    std::unique_lock<std::mutex> one_at_a_time(role_mu_, std::try_to_lock);
    if (!one_at_a_time.owns_lock()) {
      return absl::UnavailableError("a role change is under way on this host");
    }
    std::string disk;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (role_ != Role::kMirror) return absl::FailedPreconditionError("this host is no mirror");
      disk = m_.replica->disk_path();
      postcopy_side_ = "destination";
      postcopy_error_.clear();
    }
    if (o_.healthy) {
      if (auto s = o_.healthy(); !s.ok()) {
        return absl::FailedPreconditionError(absl::StrCat("this host is unhealthy: ", s.message()));
      }
    }
    auto t0 = Clock::now();
    bool adopted = false;
    vmm::OutputGate* gate = nullptr;
    NodeVm* vm = nullptr;
    struct Stopped {
      std::mutex mu;
      std::string why;  // the guest was stopped (on the receiving's thread), saying why
    };
    auto stopped = std::make_shared<Stopped>();
    absl::Status received = receive(
        [&](std::unique_ptr<vmm::GuestMemory> memory, const pb::VmSnapshot& state,
            vmm::DirtyBitmap missing, vmm::DirtyBitmap missing_chunks,
            std::function<void(uint64_t)> on_page,
            std::function<void(uint64_t)> on_chunk) -> absl::StatusOr<replicator::PostcopyTarget> {
          if (o_.can_resume) {
            if (auto s = o_.can_resume(state); !s.ok()) {
              return absl::FailedPreconditionError(
                  absl::StrCat("cannot resume the VM here: ", s.message()));
            }
          }
          // Tentative: until every page is here the source may take the VM back.
          if (auto s = TakeLeaseToRun(/*tentative=*/true); !s.ok()) return s;
          uint64_t pages = missing.Count(), chunks = missing_chunks.Count();
          auto p =
              AdoptPostcopy(std::move(memory), state, std::move(missing), std::move(missing_chunks),
                            std::move(on_page), std::move(on_chunk), disk);
          if (!p.ok()) {
            if (o_.lease) o_.lease->Want(false);
            return p.status();
          }
          adopted = true;
          gate = p->gate.get();
          vm = p->vm.get();
          if (o_.heartbeat) o_.heartbeat->SetRole("primary");
          {
            std::lock_guard<std::mutex> lock(mu_);
            p_ = std::move(*p);
            role_ = Role::kPrimary;
            resumed_epoch_ = -1;
            handed_over_because_ = "a post-copy migration";
          }
          Log(absl::StrFormat(
              "post-copy: the VM runs here, %.1f ms after the source connected; %d pages and %d "
              "disk chunks to come (its outputs are held until they are here)",
              MsSince(t0), pages, chunks));
          return replicator::PostcopyTarget{
              vm->missing_pages(), &vm->disk(), [vm, stopped](const std::string& why) {
                (void)vm->Pause();  // for good: it is torn down once the receiving ends
                std::lock_guard<std::mutex> lock(stopped->mu);
                stopped->why = why;
              }};
        });
    if (!adopted) return received;
    if (!received.ok()) {
      // The guest was stopped: nothing it said left (its outputs were held), and it goes now.
      std::string why;
      {
        std::lock_guard<std::mutex> lock(stopped->mu);
        why = stopped->why.empty() ? std::string(received.message()) : stopped->why;
      }
      AsPrimary gone;
      {
        std::lock_guard<std::mutex> lock(mu_);
        gone = std::move(p_);
        role_ = Role::kIdle;
        postcopy_error_ = why;
      }
      gone.Reset();
      if (o_.lease) o_.lease->Want(false);
      if (o_.heartbeat) o_.heartbeat->SetRole("idle");
      Log(absl::StrCat("post-copy failed, the VM is not running here: ", why));
      return received;
    }
    // Every page is here. The term runs from now on (the source can no longer take the VM back,
    // which it would have done had it been first to ask): the guest's outputs leave, and it is
    // protected like any primary.
    if (o_.lease) {
      if (auto s = o_.lease->Confirm(milliseconds(2000)); !s.ok()) {
        AsPrimary gone;
        {
          std::lock_guard<std::mutex> lock(mu_);
          gone = std::move(p_);
          role_ = Role::kIdle;
          postcopy_error_ = std::string(s.message());
        }
        gone.Reset();
        o_.lease->Want(false);
        if (o_.heartbeat) o_.heartbeat->SetRole("idle");
        Log(
            absl::StrCat("post-copy: every page is here, but the term could not be confirmed, so "
                         "the VM is not running here: ",
                         s.message()));
        return s;
      }
    }
    gate->SetHolding(false);
    absl::Status protecting;
    {
      std::lock_guard<std::mutex> lock(mu_);
      // Like a VM a failover resumed, its outputs do not wait for a mirror that may not return.
      run_unprotected_ = true;
      AttachEngine(p_);
      protecting = Replicate(p_);
      SyncFence();
    }
    Log(absl::StrFormat(
        "post-copy: every page is here %.1f ms after the source connected; %s", MsSince(t0),
        protecting.ok() ? Protection() : absl::StrCat("not protected: ", protecting.message())));
    return absl::OkStatus();
  }

  // The parts of a primary for a VM that arrives by post-copy, started: a fresh disk image
  // (written beside the replica's, which it replaces once the VM is made), its outputs held.
  absl::StatusOr<AsPrimary> AdoptPostcopy(std::unique_ptr<vmm::GuestMemory> memory,
                                          const pb::VmSnapshot& state, vmm::DirtyBitmap missing,
                                          vmm::DirtyBitmap missing_chunks,
                                          std::function<void(uint64_t)> on_page,
                                          std::function<void(uint64_t)> on_chunk,
                                          const std::string& disk) {
    std::string incoming = disk + ".incoming";
    ::unlink(incoming.c_str());
    if (auto s = vmm::BlockDevice::CreateImage(incoming, o_.identity.disk_bytes); !s.ok()) {
      return s;
    }
    AsPrimary p;
    p.gate = std::make_unique<vmm::OutputGate>();
    p.gate->SetHolding(true);
    disk_path_ = disk;
    EnterTerm(*p.gate);
    auto vm = o_.adopt_postcopy(std::move(memory), state, incoming,
                                vmm::Vm::PostCopy{std::move(missing), std::move(on_page)}, *p.gate);
    if (!vm.ok()) {
      ::unlink(incoming.c_str());
      return vm.status();
    }
    p.vm = std::move(*vm);
    absl::Status s =
        p.vm->disk().ExpectChunks(std::move(missing_chunks), std::move(on_chunk), kChunkStall);
    if (s.ok() && ::rename(incoming.c_str(), disk.c_str()) != 0) {
      s = vmm::ErrnoStatus(absl::StrCat("rename ", incoming, " to ", disk));
    }
    if (s.ok()) s = p.vm->Start();
    if (!s.ok()) {
      p.Reset();
      ::unlink(incoming.c_str());
      return s;
    }
    disk_path_ = disk;
    return p;
  }

  // A migration hands the witness's lease to the other host (named by the heartbeats) before the
  // VM moves; `*transferred` says whether it went.
  absl::Status HandLeaseToPeer(bool* transferred) {
    std::string peer = o_.heartbeat ? o_.heartbeat->peer_node() : "";
    if (peer.empty()) {
      return absl::FailedPreconditionError(
          "the other host's node name is unknown (no heartbeat heard): the lease cannot go to it");
    }
    absl::Status s = o_.lease->TransferTo(peer, milliseconds(1000));
    *transferred = s.ok();
    return s;
  }

  // A host the VM migrates to takes the lease (which its peer handed over) before running it.
  absl::Status TakeLeaseToRun(bool tentative = false) {
    if (!o_.lease) return absl::OkStatus();
    o_.lease->SetTentative(tentative);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (m_.mirror) o_.lease->SetStateTerm(m_.mirror->stats().term);
    }
    o_.lease->Want(true);
    if (auto s = o_.lease->AcquireWithin(milliseconds(2000)); !s.ok()) {
      o_.lease->Want(false);
      return absl::FailedPreconditionError(absl::StrCat("no lease: ", s.message()));
    }
    return absl::OkStatus();
  }

  // A migration that did not happen after the lease went: this host takes it back before the
  // VM runs here again. `failed` is why the migration did not happen.
  absl::Status TakeLeaseBack(const absl::Status& failed) {
    o_.lease->Want(true);
    if (auto s = o_.lease->AcquireWithin(milliseconds(3000)); !s.ok()) {
      return absl::UnavailableError(absl::StrCat(failed.message(),
                                                 "; but the lease did not come back (", s.message(),
                                                 "): the VM stays paused here until it does"));
    }
    return absl::OkStatus();
  }

  // Ends replication to the mirror; the VM runs on. With role_mu_.
  void StopReplication() {
    std::unique_ptr<replicator::Primary> primary;
    std::unique_ptr<checkpoint::EpochEngine> engine;
    {
      std::lock_guard<std::mutex> lock(mu_);
      primary = std::move(p_.primary);
      engine = std::move(p_.engine);
    }
    primary.reset();
    engine.reset();
  }

  // After a migration that did not happen: the paused VM runs here again, replicating to the
  // peer as before. With role_mu_.
  absl::Status ResumeHere() {
    std::lock_guard<std::mutex> lock(mu_);
    moving_ = false;
    AttachEngine(p_);
    if (!SyncFence()) {  // else it resumes when the fence lifts
      if (auto s = p_.vm->Resume(); !s.ok()) return s;
    }
    return Replicate(p_);
  }

  // A VM about to run here in the lease's term: its files record the term (so that a host
  // restarted over them later cannot run them again once superseded), and its gate lets outputs
  // leave without a mirror only while the lease is held at that moment, granted to a request
  // that said so (LeaseClient::DeclareUnprotected). Files that keep an older
  // term than they hold only cost availability (the witness then refuses them, and the host
  // rejoins as the mirror), never safety: a failure to record it does not stop the VM.
  void EnterTerm(vmm::OutputGate& gate) {
    if (!o_.lease) return;
    recorded_term_ = 0;  // a VM about to run here: its files, perhaps others, get the term
    RecordTerm();
    gate.SetUnprotectedCheck([this] { return MayReleaseUnprotected(); });
    auto releases_only_proven = std::make_shared<std::atomic<bool>>(false);
    gate.ShareReleasesOnlyProven(releases_only_proven);
    gate.SetTermSource(LeaseTerm());
    o_.lease->SetReleaseState(std::move(releases_only_proven));
  }

  // Once per term (the connecting thread and a role change call it).
  void RecordTerm() {
    if (disk_path_.empty()) return;
    uint64_t term = o_.lease->term();
    if (term == recorded_term_.exchange(term)) return;
    if (auto s = WriteTermFile(disk_path_, term); !s.ok()) {
      Log(absl::StrCat("cannot record term ", term, " beside the disk (", s.message(),
                       "): should this host be restarted as the primary, the witness will "
                       "refuse its files; it can rejoin as the mirror"));
    }
  }

  std::function<void(uint64_t)> MirrorCommitsHook() const {
    if (!o_.lease) return nullptr;
    return [lease = o_.lease](uint64_t term) { lease->SetMirrorTerm(term); };
  }

  // The lease's term, read by the replicator and the gate: it grows while the VM runs here,
  // when it releases without a mirror (see BeforeUnprotected). None without a witness.
  std::function<uint64_t()> LeaseTerm() const {
    if (!o_.lease) return nullptr;
    return [lease = o_.lease] { return lease->term(); };
  }

  // What must hold before outputs leave without a mirror. Right after a hand-over, while the
  // host the VM came from is alive (and for kHandoverWindow at most), they wait for it to
  // commit: it holds the hand-over's state until then. Then the term must run (confirmed at the
  // witness: a tentative holder's source may have taken the VM back), the witness must have
  // granted the lease to a request saying that this host releases without a mirror (it grants
  // no takeover in this term after that), and the configured command must succeed.
  std::function<absl::Status()> BeforeUnprotected() {
    if (!o_.lease && !o_.before_unprotected) return nullptr;
    return [this]() -> absl::Status {
      if (Clock::now() < handover_window_until_.load() && o_.heartbeat &&
          o_.heartbeat->peer_alive()) {
        return absl::UnavailableError(
            "the host the VM came from holds the hand-over's state until it commits a "
            "checkpoint of this one");
      }
      handover_window_until_ = Clock::time_point{};
      if (o_.lease) {
        if (auto s = o_.lease->Confirm(milliseconds(1000)); !s.ok()) return s;
        // Where a mirror may hold a replica of this term, the witness gives a new one.
        if (auto s = o_.lease->DeclareUnprotected(milliseconds(1000)); !s.ok()) return s;
        RecordTerm();
      }
      return o_.before_unprotected ? o_.before_unprotected() : absl::OkStatus();
    };
  }

  bool MayReleaseUnprotected() const {
    if (superseded_flag_) return false;
    return forced_ || o_.lease->may_release_unprotected();
  }

  // After an engine was attached to the VM of a primary that ran without one, which fenced the
  // gate itself: the fence as the lease (or Fence) says now, through the engine. Returns whether
  // the node is fenced. With mu_ held.
  bool SyncFence() {
    bool fenced = o_.lease ? !o_.lease->held() : fenced_;
    if (fenced) {
      ApplyFence(true);
    } else {
      p_.gate->SetFenced(false);
    }
    return fenced;
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
    // A VM a migration paused stays paused when the fence lifts: the migration decides.
    if (fenced || !moving_) (void)(fenced ? p_.vm->Pause() : p_.vm->Resume());
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
  std::string superseded_;  // under mu_: why a newer term superseded this host's VM
  std::atomic<bool> superseded_flag_{false}, forced_{false};
  // After a hand-over to this host: until then, outputs wait for a mirror (BeforeUnprotected).
  std::atomic<Clock::time_point> handover_window_until_{};
  bool run_unprotected_ = false;            // of the VM this node runs as the primary
  std::atomic<uint64_t> recorded_term_{0};  // the last term written beside the disk
  bool moving_ = false;                     // under mu_: a post-copy migration holds the VM paused
  // Post-copy (under mu_): the migration from this host under way, and the last one's end.
  std::shared_ptr<replicator::PostcopyMigration> postcopy_;
  std::optional<replicator::PostcopyProgress> postcopy_last_;
  std::string postcopy_side_, postcopy_error_;
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
