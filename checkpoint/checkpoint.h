// The epoch pipeline's two ends. On the primary, the EpochEngine pauses the VM, stages what the
// epoch changed (pages, disk writes, vCPU and device state) and resumes it; outputs produced in
// an epoch are released only when that epoch is acknowledged. On the mirror, the ReplicaStore
// verifies a whole checkpoint and only then applies it, so the replica is always exactly some
// committed checkpoint, also when its disk fails mid-commit (see ReplicaStore::Apply), or is
// marked unusable and never promoted. One header for the three: EpochEngine (epoch_engine.cc),
// ReplicaStore (replica_store.cc), and what both compute alike, the hash trees and digests
// (digests.cc).
#ifndef ROMULUS_CHECKPOINT_CHECKPOINT_H_
#define ROMULUS_CHECKPOINT_CHECKPOINT_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "checkpoint/content_index.h"
#include "checkpoint/histogram.h"
#include "proto/romulus.pb.h"
#include "vmm/vmm.h"

namespace romulus::checkpoint {

struct DiskWrite {
  uint64_t sector = 0;
  std::string data;  // whole sectors
};

// A page of a run that arrived as a reference to content the mirror holds (see ContentIndex):
// its bytes in the run are a placeholder until the replica resolves it.
struct PageRef {
  uint64_t index = 0;  // into the run, ascending
  ContentHash hash;
};

// Guest pages with their hashes.
struct PageRun {
  std::vector<uint64_t> gfns;    // page numbers, ascending
  std::vector<uint64_t> hashes;  // xxh3-64 of each page
  std::vector<uint8_t> pages;    // gfns.size() pages of 4 KiB
  std::vector<PageRef> refs;     // as received from a peer; empty on the primary
};

// The highest epoch a replica accepts. Epochs come from the peer and are kept as int64_t (-1:
// none yet) and counted on from: bounded here, that arithmetic cannot overflow. A new epoch
// every millisecond reaches it after 146 million years.
inline constexpr uint64_t kMaxEpoch = uint64_t{1} << 62;

// One epoch's changes, staged at the pause. A full checkpoint ends a synchronisation: together
// with the pre-copy stream sent before it, it carries all of memory and disk.
struct Checkpoint : PageRun {
  uint64_t epoch = 0;
  bool full = false;
  std::vector<DiskWrite> disk_writes;
  pb::VmSnapshot state;      // vCPU, clock and devices (no memory or disk contents)
  uint64_t output_mark = 0;  // outputs pushed before this mark belong to this epoch or earlier
  uint64_t digest = 0;       // CheckpointDigest() of the above (and of the pre-copy stream)
  std::chrono::steady_clock::time_point paused_at{};  // the engine paused the VM for it

  uint64_t bytes() const;
};

// The disk travels in chunks of this size during a synchronisation.
inline constexpr uint64_t kDiskChunk = vmm::kDiskChunkBytes;
struct SyncChunk {
  uint64_t offset = 0;  // bytes, a multiple of kDiskChunk
  std::string data;
  uint64_t hash = 0;  // xxh3-64 of data
};

// A running digest of a pre-copy stream, in the order it was sent. Both ends compute it; the
// full checkpoint that ends the synchronisation covers it, so a lost, altered or reordered
// pre-copy frame makes that checkpoint fail verification.
class SyncDigest {
 public:
  void AddPage(uint64_t gfn, uint64_t hash);
  void AddDisk(uint64_t offset, uint64_t length, uint64_t hash);
  // The pages under node `node` of `level` of the pages' HashTree, which the mirror already held.
  void AddSamePages(uint64_t level, uint64_t node, uint64_t hash);
  uint64_t value() const { return value_; }

 private:
  uint64_t value_ = 0;
};

// A Merkle tree over a sequence of xxh3-64 leaf hashes (of pages, or of disk chunks). Level 0
// holds the leaves; each node above is the xxh3-64 of up to kFanout consecutive nodes below it;
// the top level holds the root alone (and is empty when there are no leaves). Two hosts compare
// a replica from the root down and descend only into the nodes that differ, so what they
// exchange grows with what differs, not with the size of the VM.
class HashTree {
 public:
  static constexpr uint64_t kFanout = 64;
  explicit HashTree(std::vector<uint64_t> leaves = {});
  // Over every page of `memory`, or every kDiskChunk of the `bytes` of the disk image `fd`.
  static HashTree OverPages(const vmm::GuestMemory& memory);
  static absl::StatusOr<HashTree> OverDisk(int fd, uint64_t bytes);

  size_t top() const { return levels_.size() - 1; }
  uint64_t width(size_t level) const { return levels_[level].size(); }
  uint64_t node(size_t level, uint64_t i) const { return levels_[level][i]; }
  const std::vector<uint64_t>& leaves() const { return levels_[0]; }
  // The nodes one level down under node `i` of `level` (level >= 1), and the leaves under it,
  // as [first, end).
  std::pair<uint64_t, uint64_t> Children(size_t level, uint64_t i) const;
  std::pair<uint64_t, uint64_t> Leaves(size_t level, uint64_t i) const;

 private:
  std::vector<std::vector<uint64_t>> levels_;
};

// What a resynchronisation compares: trees over the pages and the disk chunks of one VM or replica.
struct ReplicaTrees {
  HashTree pages, chunks;
};

// A digest over everything a checkpoint carries: epoch, each page number and hash, each disk
// write, the serialized state, and for a full one the digest of the pre-copy stream before it.
uint64_t CheckpointDigest(const Checkpoint& c, uint64_t sync_digest = 0);

class EpochEngine {
 public:
  struct Options {
    // Staged checkpoints not yet acknowledged may hold at most this many bytes; past it the
    // next checkpoint waits (the epoch stretches) instead of buffering more.
    uint64_t max_in_flight_bytes = 256ull << 20;
    // And at most this many checkpoints: a slow mirror stretches epochs instead of building a
    // queue that every held output would have to wait behind.
    uint64_t max_in_flight_checkpoints = 8;
  };
  struct Stats {
    uint64_t epochs = 0;
    uint64_t acknowledged = 0;
    uint64_t in_flight_bytes = 0;
    uint64_t peak_in_flight_bytes = 0;
    double last_pause_ms = 0;
  };

  // Attaches to a VM (started or not) and its output gate, which it closes: from now on
  // outputs leave only through Acknowledge.
  EpochEngine(vmm::CheckpointableVm& vm, vmm::OutputGate& gate, Options options);
  ~EpochEngine();

  // Pauses the VM, stages its changes since the previous checkpoint, resumes it, and returns the
  // checkpoint. The first one after construction or Restart() is full: it carries whatever a
  // synchronisation (BeginSync) has not sent yet, or without one all of memory and disk. Waits
  // first while the in-flight budget is spent; gives up with DeadlineExceeded after `wait`.
  absl::StatusOr<std::shared_ptr<const Checkpoint>> TakeCheckpoint(
      std::chrono::milliseconds wait = std::chrono::milliseconds(10000));
  // The mirror committed `epoch`: its outputs (and all earlier ones) leave, its memory is freed.
  void Acknowledge(uint64_t epoch);
  // For a primary that lost its lease (another host may be promoted): the VM stays paused and
  // the gate delivers nothing, even outputs the mirror acknowledges, until Suspend(false).
  // Checkpoints taken meanwhile leave the VM paused.
  absl::Status Suspend(bool suspend);
  // For a planned migration: the VM is paused now and stays paused across checkpoints, so the
  // next checkpoint is the last one this host takes; outputs the mirror acknowledges still leave.
  // HoldPaused(false) resumes it (the migration did not happen).
  absl::Status HoldPaused(bool hold);
  // The mirror went away: unacknowledged checkpoints are dropped (their outputs stay held until
  // a later checkpoint is acknowledged) and the next checkpoint is full again.
  void Restart();
  Stats stats() const;
  // Each checkpoint's pause (VM paused to resumed), and its commit (VM paused to acknowledged),
  // in seconds.
  Histogram::Snapshot pause_seconds() const { return pause_seconds_.snapshot(); }
  Histogram::Snapshot commit_seconds() const { return commit_seconds_.snapshot(); }

  // Pre-copy: sends memory and disk while the VM runs, so that the full checkpoint's pause only
  // copies what changed meanwhile. Called between Restart() and the full TakeCheckpoint() that
  // ends the synchronisation.
  // Starts tracking what the VM changes; every page and disk chunk is pending.
  absl::Status BeginSync();
  // Up to `max_pages` pending pages, copied and hashed while the VM runs (what it writes
  // meanwhile is pending again after the next RefreshSync). Empty once none is pending.
  PageRun NextSyncPages(size_t max_pages);
  // The next disk chunk, read while the VM runs (writes meanwhile travel in the full
  // checkpoint); nullopt once the whole disk was read.
  absl::StatusOr<std::optional<SyncChunk>> NextSyncDisk();
  // Trees over the VM's pages and disk chunks as they are now, read while it runs: what the
  // primary compares with the mirror's replica. After BeginSync, so that a page written after
  // it was hashed is pending again, and a disk write travels in the full checkpoint.
  absl::StatusOr<ReplicaTrees> SyncTrees();
  // The pages under node `node` of `level` of `pages` (from SyncTrees) are at the mirror
  // already: they are no longer pending, and the stream's digest covers them as such.
  void SkipSyncPages(const HashTree& pages, size_t level, uint64_t node);
  // Pauses, adds the pages written since the last harvest to the pending ones, resumes; returns
  // how many are pending.
  absl::StatusOr<uint64_t> RefreshSync();

  // Test hook, run while the VM is paused for a checkpoint, after staging.
  void SetPauseHook(std::function<void(const Checkpoint&)> hook) { pause_hook_ = std::move(hook); }

 private:
  vmm::CheckpointableVm& vm_;
  vmm::OutputGate& gate_;
  Options options_;
  uint64_t next_epoch_ = 0;
  bool next_full_ = true;    // guarded by mu_
  uint64_t generation_ = 0;  // guarded by mu_; Restart() moves it on
  std::function<void(const Checkpoint&)> pause_hook_;

  absl::StatusOr<std::optional<DiskWrite>> ReadDiskChunk();  // the next chunk of the disk
  absl::Status ResumeVm();  // unless suspended or held paused; with take_mu_ held
  void StartSyncState();    // everything pending, the disk from its start, a fresh digest

  // Held by whatever pauses the VM or reads it for the mirror: a checkpoint of a lost connection
  // never overlaps the next connection's synchronisation. Guards the synchronisation state.
  std::mutex take_mu_;
  bool suspended_ = false;    // lease lost: paused and fenced
  bool held_paused_ = false;  // migrating: paused
  bool syncing_ = false;
  vmm::DirtyBitmap sync_pending_;
  uint64_t sync_disk_offset_ = 0;  // chunks before it were sent
  SyncDigest sync_digest_;

  std::mutex disk_mu_;  // the vCPU thread records disk writes; the engine takes them at the pause
  std::vector<DiskWrite> disk_writes_;

  mutable std::mutex mu_;
  Histogram pause_seconds_ = Histogram::Seconds(), commit_seconds_ = Histogram::Seconds();
  std::condition_variable cv_;
  std::deque<std::shared_ptr<const Checkpoint>> in_flight_;
  Stats stats_;
};

class ReplicaStore {
 public:
  // A zeroed replica of `memory_bytes` in a memfd and a disk image of `disk_bytes` at disk_path.
  static absl::StatusOr<std::unique_ptr<ReplicaStore>> Create(uint64_t memory_bytes,
                                                              const std::string& disk_path,
                                                              uint64_t disk_bytes);

  // The memory and disk image of a VM that stopped here (the old primary of a planned
  // migration): adopted in place, not copied, as seeded contents. Like a seeded replica it
  // holds no committed checkpoint (it is not promotable) until the new primary's
  // synchronisation commits, which sends only what differs.
  static absl::StatusOr<std::unique_ptr<ReplicaStore>> Adopt(
      std::unique_ptr<vmm::GuestMemory> memory, const std::string& disk_path);
  // The same, committed as checkpoint `epoch` with `state`: the exact state a planned migration
  // handed over (the VM paused for good here), which this host resumes if the new primary fails
  // before it released anything.
  static absl::StatusOr<std::unique_ptr<ReplicaStore>> Adopt(
      std::unique_ptr<vmm::GuestMemory> memory, const std::string& disk_path,
      const pb::VmSnapshot& state, uint64_t epoch);

  // Verifies `c` completely (sequence, sizes, every page hash, the digest), then applies it.
  // An incremental checkpoint must follow the last committed one; a full one may come at any
  // later epoch (a resynchronisation): it completes the staging copy built by the pre-copy
  // stream, which then replaces the replica.
  // What an error leaves:
  //  - bad input (DataLoss, FailedPrecondition): the replica exactly as it was;
  //  - a disk that fails (ENOSPC: ResourceExhausted; EIO, a short write): the disk is written
  //    before memory, and what an incremental checkpoint's writes overwrote is read first and
  //    put back, so the replica (memory, disk, state, epoch) is still the last committed
  //    checkpoint, and still promotable. When putting back fails too, the replica is unusable()
  //    from then on: committed_epoch() is -1 (never promotable), and it refuses every
  //    checkpoint, synchronisation and snapshot. A full checkpoint written over the replica in
  //    place (a resynchronisation that found some of it the same) that fails part-way leaves it
  //    uncommitted (committed_epoch() -1, not promotable) with its contents kept, like a seeded
  //    replica, for the next synchronisation to compare and repair.
  // The error's message says which, in one line.
  absl::Status Apply(const Checkpoint& c);
  // Why the replica may no longer be used, or empty.
  const std::string& unusable() const { return unusable_; }
  // A new primary session numbers its epochs afresh: only a full checkpoint is accepted next.
  void ExpectFullCheckpoint() { sequence_reset_ = true; }

  // The pre-copy stream goes to a staging copy, never to the replica. Each call verifies what
  // it is given (range, hashes); an error leaves the replica as it was.
  absl::Status StageSyncPages(const PageRun& run);
  // `data` is nullptr for a chunk the primary flagged all-zero.
  absl::Status StageSyncDisk(uint64_t offset, uint64_t length, const std::string* data,
                             uint64_t hash);
  // The connection that carried a synchronisation is gone before it finished. What it staged
  // and verified is kept: HoldingsTrees() shows it to the next synchronisation, which then claims
  // it instead of sending it again, so that a link that keeps failing still makes progress.
  void SuspendSync();
  // Forgets a synchronisation in progress and everything it staged.
  void DiscardSync() {
    staging_.reset();
    index_.Clear();
  }

  // References (PageRun::refs) resolve against the pages whose contents this connection's stream
  // carried since its synchronisation began (staged, then committed), then against the base
  // image. A new connection starts afresh, as its primary does.
  void ResetContentIndex() { index_.Clear(); }
  // A memory image the primary can read too: pages equal to one of its pages may come as
  // references to it. Set before any connection.
  void SetBaseImage(std::shared_ptr<const BaseImage> base) { base_ = std::move(base); }
  const BaseImage* base_image() const { return base_.get(); }

  // -1 until the first (full) checkpoint is committed.
  int64_t committed_epoch() const { return committed_epoch_; }
  uint64_t memory_bytes() const { return memory_->size(); }
  const std::string& disk_path() const { return disk_path_; }
  uint64_t disk_bytes() const { return disk_bytes_; }
  uint64_t MemoryDigest() const { return memory_->Digest(); }
  const vmm::GuestMemory& memory() const { return *memory_; }
  absl::StatusOr<uint64_t> DiskDigest() const;
  // Writes the committed replica as a snapshot `romulus vm --restore-from` resumes.
  absl::StatusOr<vmm::SnapshotInfo> SaveSnapshot(const std::string& dir) const;

  // The committed replica, handed over to become the running VM (a failover): its memory
  // (the memfd itself, not a copy), state, epoch and disk image. The store is empty afterwards.
  const pb::VmSnapshot& committed_state() const { return state_; }
  // Fills the replica's memory and disk from a snapshot it saved before (a restarted mirror),
  // verified against its digests. The contents only seed the next synchronisation, which then
  // sends what differs: the replica stays uncommitted (not promotable) until it completes.
  absl::Status Seed(const std::string& snapshot_dir);
  // Committed, or seeded: what a synchronisation can compare against.
  bool has_contents() const { return committed_epoch_ >= 0 || seeded_; }
  // Trees over the pages and disk chunks of the committed (or seeded) replica, which must have
  // contents. Built once per committed state.
  absl::StatusOr<const ReplicaTrees*> CommittedTrees();
  // What a resynchronisation compares: the committed (or seeded) replica, with what suspended
  // synchronisations staged and verified in place of its pages and chunks. FailedPrecondition
  // when it holds nothing of the VM.
  absl::StatusOr<const ReplicaTrees*> HoldingsTrees();
  // Pre-copy: the pages under node `node` of `level` of the pages tree are what this replica
  // holds (HoldingsTrees); `hash` must be that node's. Nothing is copied: the commit takes them
  // from where they are.
  absl::Status StageSamePages(size_t level, uint64_t node, uint64_t hash);
  // Pre-copy: the disk chunk at `offset` is what this replica holds (its hash is `hash`).
  absl::Status StageSameDisk(uint64_t offset, uint64_t length, uint64_t hash);
  struct Committed {
    std::unique_ptr<vmm::GuestMemory> memory;
    pb::VmSnapshot state;
    int64_t epoch = -1;
    std::string disk_path;
  };
  absl::StatusOr<Committed> TakeCommitted();

 private:
  // What a synchronisation has built so far: what it received, in a sparse copy of memory and
  // disk, and what it found the same as the replica's, which stays where it is.
  struct Staging {
    std::unique_ptr<vmm::GuestMemory> memory;
    vmm::Fd disk;
    vmm::DirtyBitmap pages;   // pages received (or claimed where kept: they are here)
    vmm::DirtyBitmap chunks;  // disk chunks received (likewise)
    vmm::DirtyBitmap same_pages, same_chunks;  // claimed, and the replica's
    SyncDigest digest;
    // Staged and verified by synchronisations that were suspended, with their hashes: this
    // copy holds them in place of the replica's.
    vmm::DirtyBitmap kept_pages, kept_chunks;
    std::vector<uint64_t> page_hashes, chunk_hashes;  // of what this copy holds
    std::unique_ptr<ReplicaTrees> holdings;           // HoldingsTrees() while kept is non-empty
  };
  ReplicaStore(std::unique_ptr<vmm::GuestMemory> memory, vmm::Fd disk, std::string disk_path,
               uint64_t disk_bytes)
      : memory_(std::move(memory)),
        disk_(std::move(disk)),
        disk_path_(std::move(disk_path)),
        disk_bytes_(disk_bytes),
        index_(memory_->pages()) {}
  // A run's pages with its references resolved: where each page's bytes are, and the content
  // hash of each (what the content index records once they are applied).
  struct ResolvedRun {
    std::vector<uint8_t> ref_pages;    // the referenced pages' bytes, in refs order
    std::vector<const uint8_t*> page;  // of each page of the run
    std::vector<ContentHash> content;
  };
  absl::StatusOr<ResolvedRun> Resolve(const PageRun& run, const std::string& what) const;
  void Record(const PageRun& run, const ResolvedRun& r);
  absl::Status Verify(const Checkpoint& c, const ResolvedRun& r) const;
  absl::StatusOr<const ReplicaTrees*> ContentTrees();  // CommittedTrees, contents or not
  absl::Status StartStaging();
  // Applies a verified full checkpoint to the staging copy; then the staging copy replaces the
  // replica (nothing was the same), or what it received is written over the replica.
  absl::Status CommitStaging(const Checkpoint& c, const ResolvedRun& r);
  absl::Status CopyReceivedIntoReplica(const Staging& st, const Checkpoint& c);
  // An incremental checkpoint's disk writes failed (`torn`: and could not be taken back).
  absl::Status DiskFailed(uint64_t epoch, const absl::Status& why, bool torn);

  std::unique_ptr<vmm::GuestMemory> memory_;
  vmm::Fd disk_;
  std::string disk_path_;
  uint64_t disk_bytes_;
  bool seeded_ = false;
  std::unique_ptr<Staging> staging_;
  std::unique_ptr<ReplicaTrees> trees_;  // of the contents as they are; reset when they change
  int64_t committed_epoch_ = -1;
  bool sequence_reset_ = true;
  std::string unusable_;  // set once, never cleared
  pb::VmSnapshot state_;
  // Over the staging copy while there is one (a synchronisation clears it when it starts one),
  // else over the replica.
  ContentIndex index_;
  std::shared_ptr<const BaseImage> base_;
};

}  // namespace romulus::checkpoint

#endif  // ROMULUS_CHECKPOINT_CHECKPOINT_H_
