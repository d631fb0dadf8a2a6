// Switchover: knowing when the peer host is gone, and making sure only one host ever acts as the
// primary. Heartbeats run over every configured network path; a peer is dead only when all of
// them (and the replication stream) have been silent past the timeout. Promotion needs proof that
// the old primary can no longer release outputs: the witness's lease, or a fencing command that
// succeeded. A primary that cannot renew its lease stops releasing outputs.
#ifndef ROMULUS_SWITCHOVER_SWITCHOVER_H_
#define ROMULUS_SWITCHOVER_SWITCHOVER_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "checkpoint/checkpoint.h"
#include "replicator/replicator.h"
#include "vmm/vmm.h"

namespace romulus::switchover {

using LogFn = std::function<void(absl::string_view line)>;

struct Endpoint {
  std::string host;  // a numeric IPv4 or IPv6 address
  uint16_t port = 0;
};
// "ADDR:PORT" or "[ADDR]:PORT".
absl::StatusOr<Endpoint> ParseEndpoint(absl::string_view text);

// One network path to the peer: this host's address on it and the peer's.
struct PathConfig {
  Endpoint local;
  Endpoint remote;
};

struct PathStatus {
  std::string name;    // "LOCAL -> REMOTE"
  bool up = false;     // an authentic heartbeat arrived within the timeout
  double loss = 0;     // share of the peer's heartbeats lost on this path (last window)
  double rtt_ms = -1;  // smoothed round trip; -1 until measured
  uint64_t sent = 0, received = 0, rejected = 0;
  // The silence after which this path is down now: the configured timeout, raised by how late
  // heartbeats arrived lately, up to the ceiling (FailureDetector).
  std::chrono::milliseconds timeout{0};
};

class Heartbeat {
 public:
  struct Options {
    std::string vm_id{};
    std::string node{};  // this host's name; the peer's must differ
    std::string role{};  // what this host is, for the peer's status: primary or mirror
    std::string key{};
    std::vector<PathConfig> paths{};
    std::chrono::milliseconds interval{10};
    std::chrono::milliseconds timeout{50};     // the least: late heartbeats raise it
    std::chrono::milliseconds timeout_max{0};  // how far they may; 0: four times `timeout`
    // Called on the heartbeat thread when the peer goes from alive to dead and back.
    std::function<void()> on_peer_dead{}, on_peer_back{};
    LogFn log{};
  };
  // Binds every path's local address and starts sending.
  static absl::StatusOr<std::unique_ptr<Heartbeat>> Start(Options options);
  virtual ~Heartbeat() = default;

  // Any thread: the peer was heard from on another channel (the replication stream).
  virtual void NoteTrafficFromPeer() = 0;
  // Any thread: the peer's replication stream ended from its side (closed or reset: what a
  // process that died leaves). Until a path hears three more heartbeats (those on their way
  // when it died do not count as life) or a new stream arrives, a path's silence means death
  // after what its heartbeats' gaps were seen to need (at least two intervals, at most the
  // configured timeout), not after the timeout its gaps raised.
  virtual void NotePeerClosedStream() = 0;
  // The peer's stream ended from its side and no path has heard it since (as above): the
  // evidence that its process died, which a takeover needs (a silence alone may be a busy host).
  virtual bool peer_closed_stream() const = 0;
  // Alive: some path, or the replication stream, heard from the peer within the timeout.
  virtual bool peer_alive() const = 0;
  // True until the peer has been heard from once.
  virtual bool never_heard() const = 0;
  // This host's role changed (a migration or a promotion): the peer's status says so.
  virtual void SetRole(const std::string& role) = 0;
  virtual std::string peer_role() const = 0;
  virtual std::string peer_node() const = 0;  // its node name ("" until heard)
  virtual std::vector<PathStatus> paths() const = 0;
  // The silence after which the peer is dead now (the longest of the paths' timeouts).
  virtual std::chrono::milliseconds timeout() const = 0;
};

// The witness: numbers the terms of each VM and grants one lease per VM, to one node at a time
// (the rules are in authority.h). A lease lasts `lease` from when the witness granted it; the
// holder renews it. After a restart it grants nothing for one lease period, so a lease granted
// before the restart has expired before another is granted; and it keeps the terms in its state
// file, so that none is granted twice.
class Witness {
 public:
  struct Options {
    std::string key{};
    Endpoint listen{};  // port 0: any free port
    std::chrono::milliseconds lease{150};
    size_t max_entries = 4096;  // VMs and nodes tracked, to bound memory
    // Where the terms are kept, written and fsynced before a grant that changes them is
    // answered. Empty: in memory only (tests). A missing file is an error unless `init` says
    // this is a first start; `init` with an existing file is an error too.
    std::string state_path{};
    bool init = false;
    LogFn log{};
  };
  struct Holder {
    std::string vm_id, node;
    std::chrono::milliseconds remaining{0};
    uint64_t term = 0;
  };
  static absl::StatusOr<std::unique_ptr<Witness>> Start(Options options);
  virtual ~Witness() = default;
  virtual uint16_t port() const = 0;
  virtual std::vector<Holder> holders() const = 0;
  virtual uint64_t rejected() const = 0;  // datagrams refused: bad MAC, version, nonce or size
};

// One node's side of the lease. While it wants the lease it asks for it, and then renews it,
// every `renew`. It counts the lease as held from the moment it sent the request the witness
// granted, for the granted time less a margin for clock drift: so it always believes the lease
// gone before the witness does.
class LeaseClient {
 public:
  struct Options {
    std::string vm_id{};
    std::string node{};
    std::string key{};
    Endpoint witness{};
    std::string local_address{};  // bind here ("": any)
    std::chrono::milliseconds renew{30};
    // Called on the client's thread when the lease is gained or lost (not renewed in time).
    std::function<void()> on_gained{}, on_lost{};
    // Called on the client's thread when the witness says this node's state was superseded by
    // a newer term (the client stops wanting the lease); `why` is the witness's reason.
    std::function<void(const std::string& why)> on_superseded{};
    LogFn log{};
  };
  struct Status {
    bool held = false;
    uint64_t term = 0;                       // of the lease this node holds or last held
    std::string holder;                      // as the witness last said ("" nobody or not heard)
    std::chrono::milliseconds remaining{0};  // of this node's lease, when held
    std::string reason;                      // the witness's last reason for a refusal
    bool witness_reachable = false;          // an authentic reply within four renew periods
    // The last lease this node held: when the grant arrived, and when this node stopped (or
    // will stop) counting it as held.
    std::chrono::steady_clock::time_point held_since{}, held_until{};
  };
  static absl::StatusOr<std::unique_ptr<LeaseClient>> Start(Options options);
  virtual ~LeaseClient() = default;

  // Starts or stops asking for (and renewing) the lease. Stopping releases it.
  virtual void Want(bool want) = 0;
  // The term of the state this node would run (its disk's, or its replica's): requests carry
  // it, and the witness grants a new term only to a state that was not superseded.
  virtual void SetStateTerm(uint64_t term) = 0;
  // This node's mirror may have committed checkpoints of `term`: releasing without it in a term
  // no newer needs a new term first (the witness gives it; LeaseState::MayReleaseUnprotected).
  virtual void SetMirrorTerm(uint64_t term) = 0;
  // What a promotion's requests say.
  struct Promotion {
    // This node is the mirror of the holder, which looks dead; it acknowledges nothing more and
    // resumes what it committed. The witness grants at once if the holder released only what
    // its mirror acknowledged (authority.h).
    bool takeover = false;
    bool unprotected = false;  // and will release outputs without a mirror (DeclareUnprotected)
  };
  // Asks until the lease is held or `wait` passes. Keeps wanting it either way, unless the
  // witness said this node's state was superseded (FailedPrecondition at once).
  virtual absl::Status AcquireWithin(std::chrono::milliseconds wait,
                                     const Promotion& promotion) = 0;
  absl::Status AcquireWithin(std::chrono::milliseconds wait) { return AcquireWithin(wait, {}); }
  // What this node's requests say of its releases while it holds the lease: `flag` true means
  // it releases only what its mirror acknowledged (vmm::OutputGate::ShareReleasesOnlyProven).
  // Until one is given (and after a promotion that said otherwise) requests say so too.
  virtual void SetReleaseState(std::shared_ptr<std::atomic<bool>> flag) = 0;
  // Before the holder releases outputs without a mirror (its release state false): sends a
  // request saying so and returns once the witness granted it (from then on it grants no
  // takeover until a later request says otherwise), or why not.
  virtual absl::Status DeclareUnprotected(std::chrono::milliseconds wait) = 0;
  // The lease is held, and the witness granted a request saying this node releases without a
  // mirror, sent after the last that said otherwise. False asks the witness again (at most
  // every few ms).
  virtual bool may_release_unprotected() = 0;
  // Hands a held lease to `node` (planned migration); this node stops wanting it.
  virtual absl::Status TransferTo(const std::string& node, std::chrono::milliseconds wait) = 0;
  // While tentative, this node holds (and renews) a lease handed to it without confirming its
  // term: the term has not run, and the node that handed it over may still take the VM back.
  // Confirm ends that: it returns once the witness recorded that the term runs (or why not:
  // superseded, when the giver took the VM back first). A post-copy destination confirms
  // before its VM releases anything.
  virtual void SetTentative(bool tentative) = 0;
  virtual absl::Status Confirm(std::chrono::milliseconds wait) = 0;
  virtual bool held() const = 0;
  virtual uint64_t term() const = 0;
  virtual Status status() const = 0;
};

// What a program run by RunProgram did.
struct ProgramResult {
  int exit_code = -1;  // -1: it died of a signal, or was killed when its time was up
  int signal = 0;      // the signal it died of (not counting the kill at the timeout)
  bool timed_out = false;
  std::string output;  // the start of its standard output, when captured
};
// Runs `argv` (argv[0] a path) in a process group of its own, and kills the group when `timeout`
// passes. With `max_output` > 0 the first that many bytes of its standard output are captured and
// its standard error goes to /dev/null; otherwise it inherits both.
absl::StatusOr<ProgramResult> RunProgram(const std::vector<std::string>& argv,
                                         std::chrono::milliseconds timeout, size_t max_output = 0);
// Runs `command` with /bin/sh; OK when it exits 0 within `timeout` (it is killed after that).
// Errors name it as `what`.
absl::Status RunCommand(absl::string_view what, const std::string& command,
                        std::chrono::milliseconds timeout);
absl::Status RunFenceCommand(const std::string& command, std::chrono::milliseconds timeout);

// The witness's term a VM's files belong to (recorded beside its disk image, in DISK.term), 0
// when none is recorded. A host records it durably before the VM runs in a term, so that files
// a newer term superseded are never run again.
uint64_t ReadTermFile(const std::string& disk_path);
absl::Status WriteTermFile(const std::string& disk_path, uint64_t term);

// Who may allow this host to become the primary. With a lease client, holding the lease; else,
// with a fencing command, its success; else only `force`.
// A promotion that is refused stops asking for the lease: nothing holds it that does not run the
// VM.
struct PromotionPolicy {
  LeaseClient* lease = nullptr;
  uint64_t state_term = 0;  // the term of the replica to be resumed
  LeaseClient::Promotion promotion{};
  std::string fence_command;
  std::chrono::milliseconds wait{1000};  // for the lease or the fencing command
};
absl::Status AuthorizePromotion(const PromotionPolicy& policy, bool force);

// A VM as a node runs it while it is the primary: what checkpointing needs, plus starting it
// and, after a planned migration, giving up its memory to become the new primary's replica.
// The CLI's is a KVM VM with its ledger endpoint; tests use a software VM.
class NodeVm : public vmm::CheckpointableVm {
 public:
  // Starts the guest (and the service it offers).
  virtual absl::Status Start() = 0;
  // Stops it for good (the service closes) and gives up its memory.
  virtual std::unique_ptr<vmm::GuestMemory> TakeMemory() = 0;
  // OK while the guest runs (or was stopped on request); the error it stopped with on its own.
  virtual absl::Status exit_status() = 0;
  // A VM adopted for post-copy: where its missing pages are placed (nullptr otherwise).
  virtual vmm::MissingPages* missing_pages() { return nullptr; }
};

// One host of a protected VM, in whichever role it holds now, and the role changes:
//  - primary -> mirror: a planned migration (Migrate). Once the mirror resumed the VM, this
//    host's memory and disk become the new primary's replica, which then sends only what
//    differs: protection goes on without a full copy.
//  - mirror -> primary: a failover (Promote, authorised by the lease or the fencing command) or
//    a migration the other host asked for. The committed replica becomes the VM (its memory is
//    not copied); with `peer` configured the new primary replicates to the other host, which
//    returns as the mirror, and runs unprotected until it does.
class Node {
 public:
  enum class Role { kPrimary, kMirror, kIdle };
  using AdoptFn = std::function<absl::StatusOr<std::unique_ptr<NodeVm>>(
      checkpoint::ReplicaStore::Committed committed, vmm::OutputGate& gate)>;
  using AdoptPostcopyFn = std::function<absl::StatusOr<std::unique_ptr<NodeVm>>(
      std::unique_ptr<vmm::GuestMemory> memory, const pb::VmSnapshot& state,
      const std::string& disk_path, vmm::Vm::PostCopy postcopy, vmm::OutputGate& gate)>;
  struct Options {
    replicator::Identity identity{};
    std::string key{};
    // As the mirror: the replication listener (port 0: any free one). Unset (empty listen): a
    // node that handed its VM over stays idle.
    std::string listen{};
    uint16_t port = 0;
    // As the primary: the other host's replication listener. Unset (port 0): a promoted node
    // runs unprotected.
    std::string peer_host{};
    uint16_t peer_port = 0;
    // Parallel paths: further addresses to listen on (at `port`) as the mirror, and the other
    // host's listener on further paths as the primary.
    std::vector<std::string> listen_paths{};
    std::vector<replicator::Primary::Options::Path> peer_paths{};
    std::chrono::milliseconds epoch{25};
    pb::Compression compression = pb::COMPRESSION_NONE;
    // A memory image both hosts read (replicator's base_image), in either role.
    std::shared_ptr<const checkpoint::BaseImage> base_image = nullptr;
    replicator::Protection protection = {};  // of replication frames, in either role
    uint64_t max_in_flight_bytes = 256ull << 20;
    // The VM this node starts with releases outputs while no mirror is connected. A VM it
    // resumed always does: its outputs must not wait for a mirror that may never return.
    bool run_unprotected = false;
    // The disk image of the VM the node starts with (a resumed one uses the replica's).
    std::string disk_path{};
    // Makes the committed replica a VM, not started, whose outputs pass through `gate`.
    AdoptFn adopt = nullptr;
    // Post-copy migration to this host: makes a VM, not started, of `memory` (lacking the pages
    // `postcopy` names), `state` and the disk image at `disk_path`, whose outputs pass through
    // `gate`. Unset: this host takes no post-copy migration.
    AdoptPostcopyFn adopt_postcopy = nullptr;
    // Whether this host can run the committed replica, asked before the replica is given up
    // (unset: it can).
    std::function<absl::Status(const pb::VmSnapshot& state)> can_resume = nullptr;
    // Whether this host would take the VM in a planned migration (its own health; a failover
    // does not ask: any host beats none). Unset: it would.
    std::function<absl::Status()> healthy = nullptr;
    // Split-brain safety (see AuthorizePromotion). With a lease, a migration hands it to the
    // peer's node (named by the heartbeats).
    LeaseClient* lease = nullptr;
    std::string fence_command{};
    std::chrono::milliseconds fence_timeout{5000};
    // As the primary, with run_unprotected (always, once promoted or handed the VM): must
    // succeed before outputs leave without a mirror (replicator::Primary::Options).
    std::function<absl::Status()> before_unprotected = nullptr;
    Heartbeat* heartbeat = nullptr;
    LogFn log = nullptr;
  };
  struct Status {
    Role role = Role::kIdle;
    int64_t resumed_epoch = -1;       // the checkpoint this node resumed as the primary (-1: none)
    std::string handed_over_because;  // when the other host handed it the VM: why it moved
    uint64_t term = 0;                // of this node's lease (0: no witness)
    std::string superseded;           // why a newer term superseded this node's VM ("" not)
    std::optional<replicator::Primary::Stats> primary;  // a primary replicating to its peer
    std::optional<replicator::Mirror::Stats> mirror;
    uint64_t held_outputs = 0;
    uint16_t port = 0;  // the mirror's replication listener
    // Over this node's life: promotions (asked to resumed as the primary) and planned
    // migrations away from it (their downtime: VM paused here to resumed at the peer), seconds.
    checkpoint::Histogram::Snapshot promotion_seconds, migration_downtime_seconds;
    // A post-copy migration under way, or the last one: from this host ("source") or to it
    // ("destination"), and why it failed if it did.
    std::optional<replicator::PostcopyProgress> postcopy;
    std::string postcopy_side, postcopy_error;
  };
  // Where a post-copy migration goes, and how.
  struct PostcopyTo {
    std::string host;  // the destination's replication listener; empty: the peer's
    uint16_t port = 0;
    uint32_t precopy_rounds = 0;               // the hybrid: pre-copy rounds first
    std::chrono::milliseconds timeout{10000};  // the destination's silence that ends it
  };

  // `vm` runs (once started here) with its outputs through `gate`.
  static absl::StatusOr<std::unique_ptr<Node>> StartPrimary(std::unique_ptr<vmm::OutputGate> gate,
                                                            std::unique_ptr<NodeVm> vm,
                                                            Options options);
  static absl::StatusOr<std::unique_ptr<Node>> StartMirror(
      std::unique_ptr<checkpoint::ReplicaStore> replica, Options options);
  virtual ~Node() = default;

  // Planned migration to the mirror (see replicator::Primary::HandOver for the errors). On
  // success this host becomes the mirror of the new primary (or idle, without a listener).
  // `reason` travels with the VM: the new primary logs it and shows it in its status.
  virtual absl::StatusOr<replicator::Primary::HandoverReport> Migrate(
      std::chrono::milliseconds timeout, const std::string& reason) = 0;
  // Post-copy migration: the VM moves to `to` first and its memory after (replicator::
  // PostcopyMigration). Until every page is there the VM lives on both hosts: its outputs stay
  // held, so that if the destination fails first it resumes here losing nothing (Aborted: the
  // VM runs here again, protected as before); if this host fails first, the destination stops
  // it. Unavailable: the connection failed at the very end, so the destination may run it: the
  // VM stays paused here. On success this host becomes the mirror of the new primary, as after
  // Migrate.
  virtual absl::StatusOr<replicator::PostcopyMigration::Report> MigratePostcopy(
      const PostcopyTo& to, const std::string& reason) = 0;
  // Failover: resumes the last committed checkpoint as the primary, once authorised (`force`:
  // without proof that the old primary is gone). Returns a line saying what was done.
  virtual absl::StatusOr<std::string> Promote(bool force, const std::string& why) = 0;
  // The lease was lost (another host may be promoted: the VM pauses, outputs are held) or
  // regained.
  virtual void Fence(bool fenced) = 0;
  // The witness says a newer term superseded this node's VM: a primary stops it for good (it
  // stays paused, nothing it said leaves, later grants do not lift the fence). Any thread.
  virtual void Supersede(const std::string& why) = 0;
  virtual Status status() const = 0;
  // While the mirror: `fn` runs while no checkpoint is being applied.
  virtual void WithReplica(const std::function<void(checkpoint::ReplicaStore&)>& fn) = 0;
  // While the primary: the guest stopped on its own.
  virtual absl::Status vm_exit_status() = 0;
};

}  // namespace romulus::switchover

#endif  // ROMULUS_SWITCHOVER_SWITCHOVER_H_
