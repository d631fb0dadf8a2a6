// The epoch pipeline's two ends. On the primary, the EpochEngine pauses the VM, stages what the
// epoch changed (pages, disk writes, vCPU and device state) and resumes it; outputs produced in
// an epoch are released only when that epoch is acknowledged. On the mirror, the ReplicaStore
// verifies a whole checkpoint and only then applies it, so the replica is always exactly some
// committed checkpoint.
#ifndef ROMULUS_CHECKPOINT_CHECKPOINT_H_
#define ROMULUS_CHECKPOINT_CHECKPOINT_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/romulus.pb.h"
#include "vmm/vmm.h"

namespace romulus::checkpoint {

struct DiskWrite {
  uint64_t sector = 0;
  std::string data;  // whole sectors
};

// One epoch's changes, staged at the pause.
struct Checkpoint {
  uint64_t epoch = 0;
  bool full = false;             // carries all of memory and disk (the first one)
  std::vector<uint64_t> gfns;    // page numbers, ascending
  std::vector<uint64_t> hashes;  // xxh3-64 of each page
  std::vector<uint8_t> pages;    // gfns.size() pages of 4 KiB
  std::vector<DiskWrite> disk_writes;
  pb::VmSnapshot state;      // vCPU, clock and devices (no memory or disk contents)
  uint64_t output_mark = 0;  // outputs pushed before this mark belong to this epoch or earlier
  uint64_t digest = 0;       // CheckpointDigest() of the above

  uint64_t bytes() const;
};

// A digest over everything a checkpoint carries: epoch, each page number and hash, each disk
// write, and the serialized state.
uint64_t CheckpointDigest(const Checkpoint& c);

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
  EpochEngine(vmm::Vm& vm, vmm::OutputGate& gate, Options options);
  ~EpochEngine();

  // Pauses the VM, stages its changes since the previous checkpoint (the first one: everything),
  // resumes it, and returns the checkpoint. Waits first while the in-flight budget is spent;
  // gives up with DeadlineExceeded after `wait`.
  absl::StatusOr<std::shared_ptr<const Checkpoint>> TakeCheckpoint(
      std::chrono::milliseconds wait = std::chrono::milliseconds(10000));
  // The mirror committed `epoch`: its outputs (and all earlier ones) leave, its memory is freed.
  void Acknowledge(uint64_t epoch);
  // The mirror went away: unacknowledged checkpoints are dropped (their outputs stay held until
  // a later checkpoint is acknowledged) and the next checkpoint carries everything again.
  void Restart();
  Stats stats() const;

  // Test hook, run while the VM is paused for a checkpoint, after staging.
  void SetPauseHook(std::function<void(const Checkpoint&)> hook) { pause_hook_ = std::move(hook); }

 private:
  vmm::Vm& vm_;
  vmm::OutputGate& gate_;
  Options options_;
  uint64_t next_epoch_ = 0;
  bool next_full_ = true;    // guarded by mu_
  uint64_t generation_ = 0;  // guarded by mu_; Restart() moves it on
  std::function<void(const Checkpoint&)> pause_hook_;

  std::mutex disk_mu_;  // the vCPU thread records disk writes; the engine takes them at the pause
  std::vector<DiskWrite> disk_writes_;

  mutable std::mutex mu_;
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

  // Verifies `c` completely (sequence, sizes, every page hash, the digest), then applies it.
  // On any error the replica is left exactly as it was. An incremental checkpoint must follow
  // the last committed one; a full one may come at any later epoch (a resynchronisation).
  absl::Status Apply(const Checkpoint& c);
  // A new primary session numbers its epochs afresh: only a full checkpoint is accepted next.
  void ExpectFullCheckpoint() { sequence_reset_ = true; }

  // -1 until the first (full) checkpoint is committed.
  int64_t committed_epoch() const { return committed_epoch_; }
  uint64_t memory_bytes() const { return memory_->size(); }
  uint64_t disk_bytes() const { return disk_bytes_; }
  uint64_t MemoryDigest() const { return memory_->Digest(); }
  absl::StatusOr<uint64_t> DiskDigest() const;
  // Writes the committed replica as a snapshot `romulus vm --restore-from` resumes.
  absl::StatusOr<vmm::SnapshotInfo> SaveSnapshot(const std::string& dir) const;

 private:
  ReplicaStore(std::unique_ptr<vmm::GuestMemory> memory, vmm::Fd disk, uint64_t disk_bytes)
      : memory_(std::move(memory)), disk_(std::move(disk)), disk_bytes_(disk_bytes) {}
  absl::Status Verify(const Checkpoint& c) const;

  std::unique_ptr<vmm::GuestMemory> memory_;
  vmm::Fd disk_;
  uint64_t disk_bytes_;
  int64_t committed_epoch_ = -1;
  bool sequence_reset_ = true;
  pb::VmSnapshot state_;
};

}  // namespace romulus::checkpoint

#endif  // ROMULUS_CHECKPOINT_CHECKPOINT_H_
