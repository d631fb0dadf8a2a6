// A software VM for the checkpoint pipeline, so that replication is tested where /dev/kvm is
// absent too. Its "guest" is a host thread: it writes guest memory through GuestMemory::Write
// (which the harvest sees, as it sees monitor writes on a real VM) and disk sectors through the
// real block device (whose writes reach the engine's listener), and a pause waits for it to be
// between two writes.
#ifndef ROMULUS_TESTS_SOFT_VM_H_
#define ROMULUS_TESTS_SOFT_VM_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "switchover/switchover.h"
#include "vmm/vmm.h"

namespace romulus::testing {

class SoftVm : public switchover::NodeVm {
 public:
  struct Options {
    uint64_t memory_bytes = 16ull << 20;
    uint64_t disk_bytes = 4ull << 20;
    uint64_t working_set_pages = 512;  // pages written, from RML_WORKLOAD_GPA on
    uint64_t writes_per_ms = 50;       // 8-byte writes to random pages of the working set
    uint64_t disk_write_every = 100;   // one sector written per this many memory writes
    uint64_t seed = 1;
    std::string memory_path;  // guest RAM in this file (created fresh) instead of a memfd
    // Called (under the VM's lock, so in write order) with the write count after each write
    // whose number is a multiple of output_every (0: never).
    uint64_t output_every = 0;
    std::function<void(uint64_t writes)> output;
  };
  static std::unique_ptr<SoftVm> Create(const std::string& disk_path, Options options);
  // A VM that goes on from memory and a disk image that another VM left (a promoted replica):
  // its write count continues from the one in `memory`. Not started.
  static std::unique_ptr<SoftVm> Adopt(std::unique_ptr<vmm::GuestMemory> memory,
                                       const std::string& disk_path, Options options);
  ~SoftVm() override;
  // Fills memory but page 0 (the write count) with incompressible bytes, through Write so that
  // the harvest sees them: every page then costs its full size on the wire. Running or not.
  void FillWithNoise();
  // Writes as the guest does, between two of its own writes and never while it is paused, so
  // that a checkpoint's pause sees all of it or none.
  void WriteAsGuest(uint64_t gpa, const void* src, uint64_t len);
  // Stops the writer for good and gives up the memory (to become a replica).
  std::unique_ptr<vmm::GuestMemory> TakeMemory() override;

  absl::Status Start() override;
  absl::Status exit_status() override { return absl::OkStatus(); }
  absl::Status Pause() override;
  absl::Status Resume() override;
  absl::StatusOr<vmm::DirtyBitmap> HarvestDirty() override;
  absl::StatusOr<pb::VmSnapshot> SaveState() override;
  vmm::GuestMemory& memory() override { return *memory_; }
  vmm::BlockDevice& disk() override { return *disk_; }

  uint64_t writes() const { return writes_.load(); }
  // The write count stored in guest memory (page 0): what a replica of this VM says it reached.
  static uint64_t WritesIn(const uint8_t* memory);

 private:
  SoftVm() = default;
  void Run();
  void StopWriter();
  void WriteOnce(uint64_t& rng);

  Options options_;
  std::unique_ptr<vmm::GuestMemory> memory_;
  std::unique_ptr<vmm::BlockDevice> disk_;
  std::mutex mu_;  // held by the writer while it writes, and by a pause
  std::condition_variable cv_;
  bool paused_ = false, stop_ = false;
  std::atomic<uint64_t> writes_{0};
  std::thread thread_;
};

}  // namespace romulus::testing

#endif  // ROMULUS_TESTS_SOFT_VM_H_
