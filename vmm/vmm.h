// Public interface of the Romulus monitor: a virtual machine running the reference guest, on KVM
// or on the process platform, whose complete state can be paused at a clean point, harvested,
// saved and restored.
#ifndef ROMULUS_VMM_VMM_H_
#define ROMULUS_VMM_VMM_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "guest/abi.h"
#include "proto/romulus.pb.h"
#include "vmm/block_device.h"
#include "vmm/dirty_bitmap.h"
#include "vmm/guest_memory.h"
#include "vmm/ledger_device.h"
#include "vmm/missing_pages.h"
#include "vmm/output_gate.h"
#include "vmm/sys.h"

namespace romulus::vmm {

// The platforms that run a VM (pb::Platform): KVM where /dev/kvm can run VMs, and the process
// platform (the guest natively in a traced stub process) on Linux 6.7 or later. Nothing outside
// vmm/ depends on which one runs.
// OK when /dev/kvm can run VMs here; otherwise a one-line reason.
absl::Status CheckKvm();
// OK when `platform` can run VMs here; otherwise a one-line reason.
absl::Status CheckPlatform(pb::Platform platform);
// PLATFORM_UNSPECIFIED: KVM where /dev/kvm can run VMs, else the process platform; otherwise the
// platform asked for, if it can run here. The error says why none can.
absl::StatusOr<pb::Platform> ChoosePlatform(pb::Platform requested = pb::PLATFORM_UNSPECIFIED);
// The platforms that can run VMs here (for tests and reports).
std::vector<pb::Platform> AvailablePlatforms();
// "kvm", "process"; "" parses as PLATFORM_UNSPECIFIED.
absl::string_view PlatformName(pb::Platform platform);
absl::StatusOr<pb::Platform> ParsePlatform(absl::string_view name);
// OK when a VM can be resumed from `state` on `platform` here (the platform that wrote it, one
// vCPU); otherwise a one-line reason. Checks shape only: Restore checks every field.
absl::Status CheckResumable(const pb::VmSnapshot& state, pb::Platform platform);

struct WorkloadConfig {
  uint64_t working_set_pages = 0;  // 0: no memory workload
  uint64_t write_rate = 0;         // page writes/s; 0: as fast as the guest can
  uint64_t write_limit = 0;        // stop after this many writes; 0: never
  rml_pattern pattern = RML_PATTERN_UNIFORM;
  uint64_t seed = 1;
};

struct VmConfig {
  pb::Platform platform = pb::PLATFORM_UNSPECIFIED;  // unspecified: ChoosePlatform()
  uint64_t memory_bytes = 256ull << 20;
  std::string disk_path;  // an existing image (BlockDevice::CreateImage makes one)
  // Guest RAM in this file (recreated at boot) instead of an anonymous memfd: after a crash the
  // host still holds the guest's memory, to seed its replica when it returns as a mirror.
  std::string memory_path;
  WorkloadConfig workload;
  uint32_t max_accounts = 4096;
  uint64_t progress_ms = 1000;
  std::string guest_image_path;  // empty: the reference guest built into this binary
  std::function<void(absl::string_view line)> console;  // guest console lines
  OutputGate* output_gate = nullptr;  // console lines pass through it (none: straight out)
};

// Checks sizes and knobs (memory, working set, accounts) without touching any file or KVM.
absl::Status ValidateVmConfig(const VmConfig& config);

// What a snapshot holds, for reports and tests.
struct SnapshotInfo {
  uint64_t memory_xxh3 = 0;
  uint64_t disk_xxh3 = 0;
  rml_status guest{};
};

inline constexpr uint32_t kSnapshotFormatVersion = 2;  // 2: vCPU state per platform

// Writes a snapshot directory (state.pb, memory.bin, disk.img) atomically from a state, a memory
// and a disk image (for a live VM: Vm::SaveSnapshot; for a mirror's replica). Fills the digests
// in `info`.
absl::Status WriteSnapshot(const std::string& dir, pb::VmSnapshot state, const GuestMemory& mem,
                           int disk_fd, SnapshotInfo* info);

// Fills `memory` and a disk image at `disk_path` (of `disk_bytes`) from a snapshot directory,
// each verified against its digest; the vCPU and device state is not used. A failure leaves
// `memory` zeroed.
absl::Status LoadSnapshotContents(const std::string& dir, GuestMemory& memory, uint64_t disk_bytes,
                                  const std::string& disk_path);

// What checkpointing needs from a VM: pause it at a clean point, harvest what changed, save its
// state. Vm is the real one; tests also drive the checkpoint pipeline with a software VM.
class CheckpointableVm {
 public:
  virtual ~CheckpointableVm() = default;
  virtual absl::Status Pause() = 0;
  virtual absl::Status Resume() = 0;
  // While paused: pages written since the previous harvest (by the guest or the monitor).
  virtual absl::StatusOr<DirtyBitmap> HarvestDirty() = 0;
  // While paused: vCPU, clock and device state (not memory or disk contents).
  virtual absl::StatusOr<pb::VmSnapshot> SaveState() = 0;
  virtual GuestMemory& memory() = 0;
  virtual BlockDevice& disk() = 0;
};

class Backend;
struct VcpuExit;

// One vCPU running the reference guest. Its vCPU thread lives as long as the Vm: every call into
// the platform runs there (ptrace requires it of the process platform), and the guest runs
// there between Start and Stop.
class Vm : public CheckpointableVm {
 public:
  // Creates the VM, loads the guest and sets it up to start at its entry point.
  static absl::StatusOr<std::unique_ptr<Vm>> Boot(const VmConfig& config);
  // Creates a VM from a snapshot directory, on the platform that wrote it. Its disk is copied to
  // `disk_path` and its memory read into a fresh memfd. Every file is verified against its
  // digest first.
  static absl::StatusOr<std::unique_ptr<Vm>> Restore(const std::string& snapshot_dir,
                                                     const std::string& disk_path,
                                                     std::function<void(absl::string_view)> console,
                                                     OutputGate* output_gate = nullptr);
  // Post-copy: the guest runs before all of its memory has arrived. Each access to a page that
  // has not waits until MissingPages::Place puts it there (missing_pages()).
  struct PostCopy {
    // The pages still to arrive. None below RML_IMAGE_GPA: the page tables and the devices'
    // pages, which the monitor reads as it resumes the VM, travel with its state.
    DirtyBitmap missing;
    std::function<void(uint64_t gfn)> on_fault;  // as MissingPages::Options::on_fault
  };
  // Creates a VM from memory already holding the guest (a mirror's replica memfd, adopted, not
  // copied), its saved state (run on the platform that wrote it), and a disk image used in place.
  // With `postcopy`, the memory holds only what is not missing.
  static absl::StatusOr<std::unique_ptr<Vm>> Adopt(std::unique_ptr<GuestMemory> memory,
                                                   const pb::VmSnapshot& state,
                                                   const std::string& disk_path,
                                                   std::function<void(absl::string_view)> console,
                                                   OutputGate* output_gate = nullptr,
                                                   std::optional<PostCopy> postcopy = std::nullopt);
  ~Vm() override;
  Vm(const Vm&) = delete;
  Vm& operator=(const Vm&) = delete;

  pb::Platform platform() const { return platform_; }
  // Lets the guest run.
  absl::Status Start();
  // Stops the vCPU at a clean point (no half-done I/O) and returns once it is stopped.
  absl::Status Pause() override;
  absl::Status Resume() override;
  // Stops the guest for good and returns why it stopped (OK when asked to stop).
  absl::Status Stop();
  // Blocks until the guest stops on its own (guest error) or Stop() is called.
  absl::Status Wait();
  // True once the guest has stopped for good.
  bool exited();
  // Stops the VM for good and gives up its memory (to become a replica after a planned
  // migration): the platform's mapping of it is gone once this returns. Only destruction may
  // follow.
  std::unique_ptr<GuestMemory> TakeMemory();

  absl::StatusOr<DirtyBitmap> HarvestDirty() override;
  absl::StatusOr<pb::VmSnapshot> SaveState() override;
  // While paused: writes a snapshot directory (state.pb, memory.bin, disk.img) atomically.
  absl::StatusOr<SnapshotInfo> SaveSnapshot(const std::string& dir);
  // The guest's own counters (read from its boot page).
  rml_status guest_status() const;

  GuestMemory& memory() override { return *memory_; }
  BlockDevice& disk() override { return *disk_; }
  LedgerDevice& ledger() { return *ledger_; }
  // A VM adopted for post-copy: where its missing pages are placed (nullptr otherwise).
  MissingPages* missing_pages() { return missing_pages_.get(); }

 private:
  Vm() = default;
  // Starts the vCPU thread and creates the platform's backend on it.
  absl::Status CreateBackend(pb::Platform platform);
  absl::Status CreateDevices(std::function<void(absl::string_view)> console,
                             OutputGate* output_gate, const std::string& disk_path);
  // Runs `fn` on the vCPU thread while the guest is not running, and returns its result.
  absl::Status OnVcpuThread(std::function<absl::Status()> fn);
  void VcpuThread();
  absl::Status HandleExit(const VcpuExit& exit);
  absl::Status WaitStopped();

  pb::Platform platform_ = pb::PLATFORM_UNSPECIFIED;
  std::unique_ptr<GuestMemory> memory_;
  std::unique_ptr<MissingPages> missing_pages_;  // registered on memory_: goes before it
  std::unique_ptr<BlockDevice> disk_;
  std::unique_ptr<class Console> console_;
  std::unique_ptr<class IdleDevice> idle_;
  std::unique_ptr<LedgerDevice> ledger_;
  // Port writes the guest may make, by port (each port is 32 bits wide): the devices' doorbells.
  std::map<uint16_t, std::function<absl::Status(uint32_t value)>> ports_;
  std::unique_ptr<Backend> backend_;  // created, used and destroyed on the vCPU thread

  std::mutex mu_;
  std::condition_variable cv_;
  std::thread thread_;
  std::deque<std::function<void()>> requests_;  // for the vCPU thread
  bool started_ = false, pause_requested_ = false, paused_ = false, stop_requested_ = false;
  bool exited_ = false, quit_ = false;
  absl::Status exit_status_;
};

}  // namespace romulus::vmm

#endif  // ROMULUS_VMM_VMM_H_
