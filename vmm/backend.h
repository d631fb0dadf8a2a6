// How a platform runs the guest's one vCPU: the small interface under the neutral vmm::Vm. KVM
// (vmm/kvm/) and the process platform (vmm/process/) implement it; nothing outside vmm/ sees it.
#ifndef ROMULUS_VMM_BACKEND_H_
#define ROMULUS_VMM_BACKEND_H_

#include <csignal>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/romulus.pb.h"
#include "vmm/dirty_bitmap.h"
#include "vmm/guest_memory.h"
#include "vmm/sys.h"

namespace romulus::vmm {

// The signal Kick() sends the vCPU thread, on every platform: its handler does nothing, and its
// arrival interrupts the guest's run.
inline constexpr int kKickSignal = SIGUSR2;

// Why Backend::Run returned.
struct VcpuExit {
  enum class Kind {
    kKicked,   // Kick() (or a stray signal) interrupted the guest between two instructions
    kPortOut,  // the guest wrote `value` to `port`; it moves past the instruction on the next Run
    kPortIn,   // the guest read from `port`: not part of the ABI
    kFault,    // the guest cannot go on: `fault` says why
  };
  Kind kind = Kind::kKicked;
  uint16_t port = 0;
  uint32_t size = 0;   // bytes per port access
  uint32_t count = 1;  // accesses (string I/O)
  uint32_t value = 0;
  std::string fault;  // one phrase, e.g. "halt (hlt)"
  uint64_t rip = 0;
};

// One of a platform's own mappings of guest RAM (beside the monitor's), registered with `uffd`
// for missing pages: guest page `first_page` is at `address` in it, and it runs to the end of
// guest RAM.
struct PlatformMapping {
  Fd uffd;
  uint64_t address = 0;
  uint64_t first_page = 0;
};

// Every call is made on the vCPU thread that created the backend, except Kick, ClearKick and
// HarvestGuestDirty. The backend is destroyed on that thread too; once it is gone, nothing but
// the monitor's own mapping refers to guest memory.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual pb::Platform platform() const = 0;
  // First boot: the CPU starts the guest at `entry` at CPL 3 with its stack at RML_STACK_TOP.
  virtual absl::Status SetUpEntry(uint64_t entry) = 0;
  // Runs the guest until it needs the monitor or a kick arrives. Returns an error only when the
  // platform itself fails; a guest that faults is a kFault exit.
  virtual absl::StatusOr<VcpuExit> Run() = 0;
  // Any thread, with the Vm's lock held: makes the current Run return soon, or the next one at
  // once.
  virtual void Kick() = 0;
  // The vCPU thread, with the Vm's lock held, when no kick is wanted for the next Run.
  virtual void ClearKick() = 0;
  // Any thread, while the vCPU is stopped: the pages the guest wrote since the previous call.
  // Pages the monitor wrote through its own mapping are not in it (GuestMemory tracks those).
  virtual absl::StatusOr<DirtyBitmap> HarvestGuestDirty() = 0;
  // At a clean point (never in the middle of an emulated instruction): the vCPU's registers and
  // whatever clock the platform keeps, into `snapshot` (vcpus, clock, tsc_khz, platform).
  virtual absl::Status SaveCpu(pb::VmSnapshot* snapshot) = 0;
  // Before the first Run: applies what SaveCpu saved on this platform. Every field is checked.
  virtual absl::Status RestoreCpu(const pb::VmSnapshot& snapshot) = 0;
  // The guest's TSC frequency in kHz (0 when unknown), for its pacing.
  virtual uint64_t TscKhz() = 0;
  // Before the first Run of a guest whose memory is still arriving (post-copy): registers the
  // platform's own mappings of guest RAM for missing pages and returns them (MissingPages then
  // serves them). None on KVM: the guest's memory is the monitor's mapping.
  virtual absl::StatusOr<std::vector<PlatformMapping>> WatchMissingPages() = 0;
};

// Each on the vCPU thread; one-line errors name what is missing.
absl::StatusOr<std::unique_ptr<Backend>> CreateKvmBackend(GuestMemory& memory);
absl::StatusOr<std::unique_ptr<Backend>> CreateProcessBackend(GuestMemory& memory);

// OK when the process platform can run here (Linux 6.7 or later: userfaultfd asynchronous
// write-protect and PAGEMAP_SCAN; ptrace; seccomp); otherwise a one-line reason.
absl::Status CheckProcessPlatform();

}  // namespace romulus::vmm

#endif  // ROMULUS_VMM_BACKEND_H_
