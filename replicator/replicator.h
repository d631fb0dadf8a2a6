// Replication over TCP: the primary streams each epoch's checkpoint to the mirror, which
// verifies and commits it and acknowledges it; the acknowledgement releases the epoch's outputs.
// Both sides prove knowledge of a pre-shared key (HMAC challenge both ways) before anything else
// is accepted; every frame from the peer is bounded and checked.
#ifndef ROMULUS_REPLICATOR_REPLICATOR_H_
#define ROMULUS_REPLICATOR_REPLICATOR_H_

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
#include "proto/romulus.pb.h"

namespace romulus::replicator {

// 6: the platform in Hello. 7: frames after the handshake are sealed; the proofs cover both Hellos.
// 8: page references (PageBatch.ref) and the mirror's base image digest (ReplicaRoots). 9:
// parallel paths (Hello.bond, Frame.seq); post-copy migration's frames.
inline constexpr uint32_t kProtocolVersion = 9;
inline constexpr uint32_t kMaxPaths = 8;
inline constexpr uint32_t kMaxFrameBytes = 4u << 20;
inline constexpr size_t kPagesPerBatch = 256;  // 1 MiB of pages per frame

// What both ends must agree on before replicating.
struct Identity {
  std::string vm_id;
  uint64_t memory_bytes = 0;
  uint64_t disk_bytes = 0;
  // The platform this side runs (or would run) the VM on: a mirror whose platform differs from
  // its primary's could not resume the replica, so the pair refuses to connect.
  pb::Platform platform = pb::PLATFORM_UNSPECIFIED;
};

using LogFn = std::function<void(absl::string_view line)>;

// One path of a replication connection (several with parallel paths).
struct PathStats {
  std::string peer;
  bool up = false;
  uint64_t bytes_sent = 0, bytes_received = 0;
  uint64_t resent = 0;  // frames sent again on this path after another path failed
  std::string error;    // why it failed
};

// HMAC-SHA256 of `message` under the pre-shared key, and a constant-time comparison of two MACs.
std::string Hmac(absl::string_view key, absl::string_view message);
bool SameMac(absl::string_view a, absl::string_view b);

// Reads a pre-shared key: a file of 16 to 4096 bytes (trailing newlines are not part of it).
absl::StatusOr<std::string> ReadKeyFile(const std::string& path);

// "none" (or empty) or "lz4".
absl::StatusOr<pb::Compression> ParseCompression(absl::string_view name);

// How the frames of a connection are protected once its handshake is done: each is sealed with
// an AEAD under keys bound to the connection, so that one altered, replayed, reordered or taken
// from another connection is refused and the connection dropped. VM memory does not cross the
// network in clear unless an operator asks for it.
struct Protection {
  pb::FrameCipher cipher = pb::FRAME_CIPHER_UNSPECIFIED;  // unspecified: the cheapest here
  bool encrypt = true;                                    // false: authenticated, but in clear
};
// "auto" (or empty), "aes-256-gcm", "chacha20-poly1305", or "off" (authenticated, in clear).
absl::StatusOr<Protection> ParseEncryption(absl::string_view name);

// Resynchronisation first compares the mirror's replica with the primary's VM as hash trees
// (checkpoint::HashTree). The mirror sends its roots (RootsOf); the primary descends from them
// into the nodes that differ (CompareTrees), asking the mirror for their children, which it
// answers from its replica's trees (AnswerTreeQuery).
inline constexpr size_t kMaxTreeQueryNodes = 4096;  // children: 2 MiB of hashes at most

pb::ReplicaRoots RootsOf(const checkpoint::ReplicaTrees* trees);  // nullptr: holds nothing

// What the primary learned about the mirror's replica.
struct MirrorHoldings {
  // The largest subtrees of the pages tree that the mirror holds as the VM had them: (level,
  // node), level by level from the top. None when it holds nothing.
  std::vector<std::pair<uint32_t, uint64_t>> same_pages;
  uint64_t same_page_count = 0;
  uint64_t same_chunk_count = 0;  // disk chunks the mirror holds as the VM has them
  // The mirror's hash of every disk chunk; empty when it holds nothing.
  std::vector<uint64_t> chunks;
};
using AskMirror = std::function<absl::StatusOr<pb::TreeAnswer>(const pb::TreeQuery&)>;
absl::StatusOr<MirrorHoldings> CompareTrees(const checkpoint::ReplicaTrees& own,
                                            const pb::ReplicaRoots& roots, const AskMirror& ask);

// The mirror's answer to a query from an untrusted peer. `budget` is how many hashes it still
// answers on this connection (start with TreeQueryBudget): a peer that asks for more is refused.
absl::StatusOr<pb::TreeAnswer> AnswerTreeQuery(const checkpoint::ReplicaTrees& trees,
                                               const pb::TreeQuery& q, uint64_t& budget);
uint64_t TreeQueryBudget(const checkpoint::ReplicaTrees& trees);

// Pre-copy frames for `holdings.same_pages` (of `pages`), each within kMaxFrameBytes.
std::vector<pb::Frame> SamePagesFrames(const checkpoint::HashTree& pages,
                                       const MirrorHoldings& holdings);

// The primary's record of what content the mirror holds: the stream's pages since the
// synchronisation began (as the mirror indexes them, in the same order) and, when the mirror has
// the same base image, that image's pages. One per connection, used on the sending thread.
struct Dedup {
  explicit Dedup(uint64_t memory_pages) : sent(memory_pages) {}
  checkpoint::ContentIndex sent;
  const checkpoint::BaseImage* base = nullptr;  // the mirror holds this one too
  uint64_t deduplicated = 0, from_base = 0;     // pages sent as references, by what they name
};

// Pages run[begin, begin+n) as one batch (n <= kPagesPerBatch): zero pages as flags; with
// `dedup`, pages whose content the mirror holds as references (and `dedup` records every page
// sent); the rest raw or, when it makes them smaller, LZ4-compressed. `sync`: part of a pre-copy
// stream.
pb::Frame PageBatchFrame(uint64_t epoch, bool sync, const checkpoint::PageRun& run, size_t begin,
                         size_t n, pb::Compression compression, Dedup* dedup = nullptr);
// The pages of a batch from an untrusted peer, with counts, sizes, page numbers and
// decompression checked. Page hashes are checked by ReplicaStore.
absl::StatusOr<checkpoint::PageRun> DecodePageBatch(const pb::PageBatch& b, uint64_t memory_pages);
// One disk chunk of a pre-copy stream (all-zero, or equal to the mirror's chunk, as a flag; the
// rest compressed when that makes it smaller).
pb::Frame SyncDiskFrame(const checkpoint::SyncChunk& chunk,
                        const std::vector<uint64_t>* mirror = nullptr,
                        pb::Compression compression = pb::COMPRESSION_NONE);
// The bytes of a pre-copy disk chunk from an untrusted peer, decompressed and checked against
// its length; nullopt for a chunk flagged zero or same. Its hash is checked by ReplicaStore.
absl::StatusOr<std::optional<std::string>> SyncDiskData(const pb::SyncDisk& d);

// The frames that carry one checkpoint: page batches, disk-write batches, then the trailer.
std::vector<pb::Frame> CheckpointFrames(const checkpoint::Checkpoint& c,
                                        pb::Compression compression = pb::COMPRESSION_NONE,
                                        Dedup* dedup = nullptr);

// Collects the frames of one checkpoint from an untrusted peer, checking every count and size
// against the replica's geometry. Page contents and the digest are checked by ReplicaStore.
class CheckpointAssembler {
 public:
  CheckpointAssembler(uint64_t memory_bytes, uint64_t disk_bytes)
      : memory_pages_(memory_bytes / 4096), disk_bytes_(disk_bytes) {}
  // Returns the checkpoint once its trailer arrives, nullopt before; an error for a bad frame.
  absl::StatusOr<std::optional<checkpoint::Checkpoint>> Add(pb::Frame frame);

 private:
  uint64_t memory_pages_, disk_bytes_;
  bool started_ = false;
  uint64_t disk_bytes_received_ = 0;
  checkpoint::Checkpoint cp_;
};

// ---- Post-copy migration: the VM moves first and its memory after (postcopy.h says how) ----

// How far a post-copy has come, on either side.
struct PostcopyProgress {
  uint64_t pages = 0, pages_here = 0;    // to come at the start; arrived (destination) or sent
  uint64_t chunks = 0, chunks_here = 0;  // likewise, disk chunks
  uint64_t demand_pages = 0, demand_chunks = 0;  // of those, fetched on demand
  uint64_t bytes = 0;                            // on both connections, from the source
  double seconds = 0;                            // since the guest resumed at the destination
  // The guest's waits for a missing page (at the destination; at the source once it is done).
  uint64_t faults = 0;
  double fault_wait_p50_ms = 0, fault_wait_p99_ms = 0;
  uint32_t precopy_rounds = 0;  // the hybrid's rounds before the VM moved
  uint64_t precopy_bytes = 0;   // what they sent
  bool done = false;
};

// What a destination resumed: the guest's memory and disk, still arriving, and how to stop it.
struct PostcopyTarget {
  vmm::MissingPages* pages = nullptr;
  vmm::BlockDevice* disk = nullptr;  // with ExpectChunks done
  std::function<void(const std::string& reason)> stop;
};
// Resumes the VM from `state` in `memory` (which holds what is not missing), its memory and
// disk waiting for what is (`on_page`, `on_chunk` ask for one: MissingPages' and ExpectChunks'
// callbacks). An error leaves nothing running.
using PostcopyAdopt = std::function<absl::StatusOr<PostcopyTarget>(
    std::unique_ptr<vmm::GuestMemory> memory, const pb::VmSnapshot& state,
    vmm::DirtyBitmap missing_pages, vmm::DirtyBitmap missing_chunks,
    std::function<void(uint64_t gfn)> on_page, std::function<void(uint64_t chunk)> on_chunk)>;

// The source's side: moves a running VM to another host's replication listener (a Mirror with
// `postcopy` set). With pre-copy rounds first (the hybrid), the pages the guest does not write
// meanwhile are there before it moves, and only the rest is fetched after.
class PostcopyMigration {
 public:
  struct Options {
    Identity identity;
    std::string key;
    std::string host;
    uint16_t port = 0;
    Protection protection = {};
    std::chrono::milliseconds peer_timeout{5000};
    pb::Compression compression = pb::COMPRESSION_NONE;
    uint32_t precopy_rounds = 0;  // at most kMaxPrecopyRounds
    // Runs with the VM paused for good, before its state leaves (to hand a lease over); an
    // error ends the migration (Aborted).
    std::function<absl::Status()> before_start = nullptr;
    LogFn log = nullptr;
  };
  static constexpr uint32_t kMaxPrecopyRounds = 100;
  struct Report {
    PostcopyProgress progress;
    double downtime_ms = 0;  // VM paused here -> the destination said the guest runs there
    double total_ms = 0;     // VM paused here -> every page and chunk is there
  };
  explicit PostcopyMigration(Options options);
  ~PostcopyMigration();
  // `vm` runs. Pauses it for good and moves it; returns once the destination holds everything
  // (its outputs are the caller's to release then). Errors leave the VM paused here:
  //  - Aborted: the destination refused, failed or is gone before the end: it does not run the
  //    guest (it stops it, and released none of its outputs), and the VM may resume here;
  //  - Unavailable: the connection failed after the end was sent, so the destination may be
  //    running it: resuming here too could run it twice.
  absl::StatusOr<Report> Run(vmm::CheckpointableVm& vm);
  // Any thread.
  PostcopyProgress progress() const;

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

class Mirror {
 public:
  struct Options {
    Identity identity;
    std::string key;
    std::string listen = "127.0.0.1";
    uint16_t port = 0;  // 0: any free port
    // Parallel paths: more addresses to listen on, at the same port. A primary with several
    // paths connects to one address per path; its connections form one logical connection.
    std::vector<std::string> listen_paths = {};
    std::chrono::milliseconds peer_timeout{5000};
    Protection protection = {};  // the primary's cipher is taken; `encrypt` must agree
    std::function<void()> on_traffic = nullptr;  // a frame arrived (a sign of life, for heartbeats)
    // The primary's connection ended from its side (closed or reset, as when its process dies):
    // a sign of death that comes before any heartbeat timeout.
    std::function<void()> on_peer_closed = nullptr;
    // Planned migration: the primary paused its VM for good after `epoch`, which is committed
    // here; resume it on this host. `reason` is the primary's (printable, bounded). OK means it
    // runs here now and replication ends (the replica belongs to the VM); an error must leave the
    // replica as it was, and the primary resumes. Unset: hand-overs are refused.
    std::function<absl::Status(uint64_t epoch, const std::string& reason)> on_handover = nullptr;
    // A memory image the primary reads too (checkpoint::BaseImage): pages equal to one of its
    // pages may travel as references to it.
    std::shared_ptr<const checkpoint::BaseImage> base_image = nullptr;
    // Post-copy migration to this host (PostcopyMigration): `postcopy` runs on the mirror's
    // thread with a function that receives the VM through an adopt function (see
    // PostcopyAdopt) and returns once every page is here (OK) or the guest was stopped (the
    // reason), or adopting failed. Whatever happened after the guest was adopted, replication
    // ends here. Unset: post-copy migrations are refused.
    using ReceivePostcopy = std::function<absl::Status(const PostcopyAdopt& adopt)>;
    std::function<absl::Status(const ReceivePostcopy& receive)> postcopy = nullptr;
    // The term of what the replica holds when it starts (Stats::term): the old primary's, when
    // it holds the state a planned migration handed over.
    uint64_t term = 0;
    LogFn log = nullptr;
  };
  struct Stats {
    uint64_t connections = 0;
    uint64_t checkpoints = 0;
    uint64_t bytes = 0;
    uint64_t rejected = 0;  // connections dropped for a bad frame, key or checkpoint
    int64_t committed_epoch = -1;
    // The newest term of a primary whose checkpoint this replica committed (0: none, or no
    // witness): the term a promotion resumes from. Primaries of older terms are refused.
    uint64_t term = 0;
    // Why the replica may no longer be used (ReplicaStore::unusable), or empty.
    std::string unusable;
    bool connected = false;
    bool syncing = false;          // a pre-copy stream is arriving (into staging, not the replica)
    bool handed_over = false;      // the VM was handed over to this host: replication has ended
    std::vector<PathStats> paths;  // of the current connection (one unless parallel paths)
    // The connected primary announced a hand-over, expected before this time (see
    // pb::HandoverNotice): its silence until then is no reason to promote this host.
    std::optional<std::chrono::steady_clock::time_point> handover_expected_until;
    std::string peer;
    std::optional<PostcopyProgress> postcopy;  // a post-copy migration to this host, once begun
  };
  static absl::StatusOr<std::unique_ptr<Mirror>> Start(checkpoint::ReplicaStore& replica,
                                                       Options options);
  virtual ~Mirror() = default;
  virtual uint16_t port() const = 0;
  virtual Stats stats() const = 0;
  // Runs `fn` while no checkpoint is being applied (to save a snapshot of the replica).
  virtual void WithReplica(const std::function<void(checkpoint::ReplicaStore&)>& fn) = 0;
};

class Primary {
 public:
  struct Options {
    Identity identity;
    std::string key;
    std::string mirror_host = "127.0.0.1";
    uint16_t mirror_port = 0;
    // Parallel paths (two or more, at most kMaxPaths): the mirror's address on each path, used
    // instead of mirror_host and mirror_port. Checkpoints travel over all of them at once; one
    // that fails costs only a resend on the others.
    struct Path {
      std::string host;
      uint16_t port = 0;
    };
    std::vector<Path> mirror_paths = {};
    std::chrono::milliseconds epoch{25};
    std::chrono::milliseconds peer_timeout{5000};
    bool run_unprotected = false;  // release outputs while no mirror is connected
    // The witness's term this primary runs the VM in (unset or 0: no witness), read at each
    // connection and acknowledgement: it grows while the VM runs, when the primary releases
    // without a mirror. A mirror that committed checkpoints of a newer term refuses it; one that
    // acknowledges in another term is dropped (and synchronises in the new one).
    std::function<uint64_t()> term = nullptr;
    // With run_unprotected: called (on the connecting thread) each time outputs are about to
    // leave without a mirror (at the start, after the mirror was lost), before the first does.
    // Outputs stay held until it succeeds; it is tried again before each connection attempt.
    // What it is for: making sure no other host's replica, which falls behind from then on, can
    // be promoted (a cluster withdraws their promotion scores). It must return within a bound.
    std::function<absl::Status()> before_unprotected = nullptr;
    // Called (on the connecting thread) with the connection's term when a synchronisation has
    // sent everything but the full checkpoint: from then on the mirror may commit checkpoints of
    // that term, and outputs wait for it. Releasing without a mirror later in that term would
    // leave a replica of it behind (the witness then gives a new term first).
    std::function<void(uint64_t term)> on_mirror_commits = nullptr;
    pb::Compression compression = pb::COMPRESSION_NONE;
    Protection protection = {};
    // Pre-copy ends when what is left fits an epoch at the rate measured so far, when a round
    // no longer shrinks it, or after this many rounds; the rest goes in the full checkpoint.
    uint32_t max_sync_rounds = 20;
    std::function<void()> on_traffic = nullptr;  // a frame arrived (a sign of life, for heartbeats)
    // A memory image the mirror reads too: pages equal to one of its pages travel as references
    // to it, when the mirror holds the same image (equal digests).
    std::shared_ptr<const checkpoint::BaseImage> base_image = nullptr;
    LogFn log = nullptr;
  };
  // The initial synchronisation of the current (or last) connection.
  struct SyncProgress {
    bool active = false;
    uint64_t done_bytes = 0;   // memory and disk sent, pages sent again included
    uint64_t total_bytes = 0;  // memory + disk + pages that had to be sent again
    uint64_t wire_bytes = 0;   // bytes on the connection (zero flags and compression applied)
    uint32_t round = 0;        // 0: the first pass; then pre-copy rounds of re-dirtied pages
    double seconds = 0;        // since it began
    uint64_t final_pages = 0;  // pages left for the full checkpoint (once pre-copy ended)
    // Pages and chunks the mirror's replica already held (flags instead of contents).
    uint64_t unchanged_bytes = 0;
    // Pages sent as references to content the mirror held: an earlier page of the stream, or a
    // page of the shared base image.
    uint64_t deduplicated_pages = 0, base_pages = 0;
  };
  struct Stats {
    bool connected = false;
    uint64_t checkpoints = 0;
    uint64_t acked = 0;
    uint64_t bytes_sent = 0;
    uint64_t resyncs = 0;
    uint64_t dirty_pages = 0;  // in checkpoints sent, full copies excluded
    uint64_t held_outputs = 0;
    uint64_t lag_epochs = 0;       // checkpoints taken but not yet acknowledged
    std::vector<double> pause_ms;  // recent pauses
    std::string state;             // one line: what the primary is doing or waiting for
    std::string peer;
    SyncProgress sync;
    // While no mirror commits: for how long, and how many connections failed since it last did
    // (reconnects back off while they get nowhere).
    double unprotected_seconds = 0;
    uint32_t failed_connections = 0;
    // Connections this primary dropped for a bad frame from the mirror (one that failed its
    // integrity check, or broke the protocol).
    uint64_t rejected = 0;
    std::string protection;        // of the frames on the current (or last) connection
    std::vector<PathStats> paths;  // of the current connection (one unless parallel paths)
    // The epoch loop's last pass (every epoch, protected or not): a loop that is stuck (a VM
    // that does not pause, a commit that never ends) stops moving it.
    std::chrono::steady_clock::time_point epoch_loop_at{};
    // Checkpoint pauses and commits (seconds), and pages per incremental checkpoint.
    checkpoint::Histogram::Snapshot pause_seconds, commit_seconds, dirty_pages_per_epoch;
    // Replication bytes by what they carry, since this primary started: checkpoint page
    // contents sent as they are and LZ4-compressed, the zero-page flags sent instead of zero
    // pages, disk writes, and everything an initial synchronisation sent (on the wire).
    // References: the bytes of the reference masks and hashes sent instead of pages, and how
    // many pages were sent so, naming an earlier page of the stream or a base image page.
    struct Wire {
      uint64_t pages = 0, compressed = 0, zero_flags = 0, disk = 0, resync = 0;
      uint64_t references = 0, deduplicated_pages = 0, base_pages = 0;
    } wire;
  };
  // What a planned migration took, measured on this host.
  struct HandoverReport {
    uint64_t epoch = 0;        // the last checkpoint, which the mirror resumed
    uint64_t final_pages = 0;  // pages in it
    double commit_ms = 0;      // VM paused here -> the mirror committed the last checkpoint
    double downtime_ms = 0;    // VM paused here -> the mirror said the VM runs there
  };
  // The VM must be running. Starts the epoch clock and the connection to the mirror.
  static absl::StatusOr<std::unique_ptr<Primary>> Start(checkpoint::EpochEngine& engine,
                                                        vmm::OutputGate& gate, Options options);
  virtual ~Primary() = default;
  virtual Stats stats() const = 0;
  // Planned migration. Pauses the VM for good and takes the last checkpoint; once the mirror
  // committed it (its outputs leave), `committed` runs (to hand the lease over; an error stops
  // the migration), then the mirror is told to resume the VM. On success replication ends and
  // the VM stays paused here; the engine's VM may then become the new primary's replica.
  // `reason` (why it moves) travels to the mirror, which logs it.
  // FailedPrecondition: not protected now, nothing was done. Aborted: the migration did not
  // happen and the VM runs here again. Unavailable: the mirror was told to resume but did not
  // answer in time; the VM is left paused here, as either host may be running it, unless
  // `unanswered` (if set) then succeeds: it proved the mirror cannot run it (the witness gave
  // this host a newer term than the one handed over), and the VM runs here again (Aborted).
  virtual absl::StatusOr<HandoverReport> HandOver(
      std::chrono::milliseconds timeout, const std::function<absl::Status()>& committed,
      const std::string& reason, const std::function<absl::Status()>& unanswered = nullptr) = 0;
};

}  // namespace romulus::replicator

#endif  // ROMULUS_REPLICATOR_REPLICATOR_H_
