// The KVM platform: the guest in a KVM virtual machine with one vCPU, identity-mapped long mode at
// CPL 3, port I/O admitted by the TSS's I/O permission bitmap, dirty pages from KVM's log.
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>

#include <mutex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "guest/abi.h"
#include "vmm/backend.h"
#include "vmm/kvm/kvm_api.h"
#include "vmm/kvm/vcpu_state.h"
#include "vmm/vmm.h"

namespace romulus::vmm {
namespace {

constexpr uint64_t kTssAddr = 0xfffbd000;  // KVM's own (unused by this guest) TSS pages

void OnKick(int) {}  // only there so that the signal interrupts KVM_RUN with EINTR

void InstallKickHandler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_handler = OnKick;
    sigemptyset(&sa.sa_mask);
    ::sigaction(kKickSignal, &sa, nullptr);
  });
}

const char* ExitName(uint32_t reason) {
  switch (reason) {
    case KVM_EXIT_SHUTDOWN:
      return "triple fault (KVM_EXIT_SHUTDOWN)";
    case KVM_EXIT_INTERNAL_ERROR:
      return "emulation failure (KVM_EXIT_INTERNAL_ERROR)";
    case KVM_EXIT_FAIL_ENTRY:
      return "entry failure (KVM_EXIT_FAIL_ENTRY)";
    case KVM_EXIT_MMIO:
      return "access outside guest RAM (KVM_EXIT_MMIO)";
    case KVM_EXIT_HLT:
      return "halt (KVM_EXIT_HLT)";
    case KVM_EXIT_EXCEPTION:
      return "exception (KVM_EXIT_EXCEPTION)";
    default:
      return "unexpected exit";
  }
}

// Page-table and segment bits.
constexpr uint64_t kPresent = 1, kWritable = 2, kUser = 4, kHuge = 0x80;
constexpr uint64_t kCr0Pe = 1, kCr0Mp = 2, kCr0Et = 0x10, kCr0Ne = 0x20, kCr0Wp = 0x10000,
                   kCr0Pg = 0x80000000;
constexpr uint64_t kCr4Pae = 0x20, kCr4Osfxsr = 0x200, kCr4Osxmmexcpt = 0x400;
constexpr uint64_t kEferLme = 0x100, kEferLma = 0x400;
constexpr uint64_t kRflagsIopl3 = 3ull << 12, kRflagsReserved = 2, kRflagsIf = 0x200;

// GDT layout: null, (unused), user data, user code (64-bit), TSS (two slots).
constexpr uint16_t kUserDataSel = (2 << 3) | 3, kUserCodeSel = (3 << 3) | 3, kTssSel = 4 << 3;

uint64_t SegmentDescriptor(const kvm_segment& s) {
  uint64_t d = (s.limit & 0xffff) | ((s.base & 0xffffffull) << 16) |
               (static_cast<uint64_t>(s.type) << 40) | (static_cast<uint64_t>(s.s) << 44) |
               (static_cast<uint64_t>(s.dpl) << 45) | (static_cast<uint64_t>(s.present) << 47) |
               (static_cast<uint64_t>((s.limit >> 16) & 0xf) << 48) |
               (static_cast<uint64_t>(s.l) << 53) | (static_cast<uint64_t>(s.db) << 54) |
               (static_cast<uint64_t>(s.g) << 55) | ((s.base >> 24 & 0xffull) << 56);
  return d;
}

absl::Status SetUpLongMode(int vcpu_fd, GuestMemory& mem, uint64_t entry) {
  // Page tables: one PML4 entry, up to four PDPT entries, 2 MiB pages for all of RAM.
  uint64_t pml4 = RML_PDPT_GPA | kPresent | kWritable | kUser;
  mem.Write(RML_PML4_GPA, &pml4, sizeof(pml4));
  uint64_t huge_pages = mem.size() / (2ull << 20);
  for (uint64_t gib = 0; gib < (huge_pages + 511) / 512; gib++) {
    uint64_t pdpte = (RML_PD_GPA + gib * kPageSize) | kPresent | kWritable | kUser;
    mem.Write(RML_PDPT_GPA + gib * 8, &pdpte, sizeof(pdpte));
  }
  for (uint64_t i = 0; i < huge_pages; i++) {
    uint64_t pde = (i << 21) | kPresent | kWritable | kUser | kHuge;
    mem.Write(RML_PD_GPA + i * 8, &pde, sizeof(pde));
  }

  kvm_sregs sregs{};
  if (auto s = Ioctl(vcpu_fd, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS"); !s.ok()) return s;
  kvm_segment code{};
  code.base = 0;
  code.limit = 0xffffffff;
  code.selector = kUserCodeSel;
  code.type = 11;  // execute/read, accessed
  code.present = 1;
  code.dpl = 3;
  code.s = 1;
  code.l = 1;
  code.g = 1;
  kvm_segment data = code;
  data.selector = kUserDataSel;
  data.type = 3;  // read/write, accessed
  data.l = 0;
  data.db = 1;
  // The I/O permission bitmap admits exactly the Romulus ports. Under PVM the guest's CPL-3
  // code runs with hardware IOPL 0, so IOPL alone does not let `out` through; the bitmap does.
  constexpr uint32_t kIoMapOffset = 0x68, kIoMapPorts = 0x600;
  uint8_t tss_bytes[kIoMapOffset + kIoMapPorts / 8 + 1];
  std::memset(tss_bytes, 0, kIoMapOffset);
  std::memset(tss_bytes + kIoMapOffset, 0xff, sizeof(tss_bytes) - kIoMapOffset);
  uint16_t iomap_base = kIoMapOffset;
  std::memcpy(tss_bytes + 0x66, &iomap_base, sizeof(iomap_base));
  for (uint32_t port = RML_PORT_FIRST; port < RML_PORT_END; port++) {
    tss_bytes[kIoMapOffset + port / 8] &= static_cast<uint8_t>(~(1u << (port % 8)));
  }
  mem.Write(RML_TSS_GPA, tss_bytes, sizeof(tss_bytes));
  kvm_segment tss{};
  tss.base = RML_TSS_GPA;
  tss.limit = sizeof(tss_bytes) - 1;
  tss.selector = kTssSel;
  tss.type = 11;  // 64-bit busy TSS
  tss.present = 1;

  uint64_t gdt[6] = {0, 0, SegmentDescriptor(data), SegmentDescriptor(code), SegmentDescriptor(tss),
                     0 /* TSS base bits 63:32 */};
  mem.Write(RML_GDT_GPA, gdt, sizeof(gdt));

  sregs.cs = code;
  sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
  sregs.tr = tss;
  sregs.ldt = {};
  sregs.ldt.unusable = 1;
  sregs.gdt.base = RML_GDT_GPA;
  sregs.gdt.limit = sizeof(gdt) - 1;
  sregs.idt.base = 0;
  sregs.idt.limit = 0;  // no IDT: any fault escalates to a triple fault the monitor reports
  sregs.cr0 = kCr0Pe | kCr0Mp | kCr0Et | kCr0Ne | kCr0Wp | kCr0Pg;
  sregs.cr3 = RML_PML4_GPA;
  sregs.cr4 = kCr4Pae | kCr4Osfxsr | kCr4Osxmmexcpt;
  sregs.efer = kEferLme | kEferLma;
  if (auto s = Ioctl(vcpu_fd, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS"); !s.ok()) return s;

  kvm_regs regs{};
  regs.rip = entry;
  regs.rsp = RML_STACK_TOP;
  regs.rflags = kRflagsReserved | kRflagsIopl3 | kRflagsIf;
  return Ioctl(vcpu_fd, KVM_SET_REGS, &regs, "KVM_SET_REGS");
}

class KvmBackend : public Backend {
 public:
  explicit KvmBackend(GuestMemory& memory) : memory_(memory), thread_(::pthread_self()) {}
  ~KvmBackend() override {
    if (run_) ::munmap(run_, run_size_);
  }

  absl::Status Create();
  pb::Platform platform() const override { return pb::KVM; }
  absl::Status SetUpEntry(uint64_t entry) override {
    if (auto s = KvmVcpu::SetSupportedCpuid(kvm_.get(), vcpu_.get()); !s.ok()) return s;
    return SetUpLongMode(vcpu_.get(), memory_, entry);
  }
  absl::StatusOr<VcpuExit> Run() override;
  void Kick() override {
    run_->immediate_exit = 1;
    ::pthread_kill(thread_, kKickSignal);
  }
  void ClearKick() override { run_->immediate_exit = 0; }
  absl::StatusOr<DirtyBitmap> HarvestGuestDirty() override;
  absl::Status SaveCpu(pb::VmSnapshot* snapshot) override;
  absl::Status RestoreCpu(const pb::VmSnapshot& snapshot) override;
  absl::StatusOr<std::vector<PlatformMapping>> WatchMissingPages() override {
    return std::vector<PlatformMapping>{};
  }
  uint64_t TscKhz() override {
    int khz = ::ioctl(vcpu_.get(), KVM_GET_TSC_KHZ, 0);
    return khz > 0 ? static_cast<uint64_t>(khz) : 0;
  }

 private:
  VcpuExit Fault(std::string what) {
    VcpuExit e;
    e.kind = VcpuExit::Kind::kFault;
    e.fault = std::move(what);
    kvm_regs regs{};
    ::ioctl(vcpu_.get(), KVM_GET_REGS, &regs);
    e.rip = regs.rip;
    return e;
  }

  GuestMemory& memory_;
  pthread_t thread_;
  Fd kvm_, vm_, vcpu_;
  struct kvm_run* run_ = nullptr;
  size_t run_size_ = 0;
  bool manual_dirty_protect_ = false;
};

absl::Status KvmBackend::Create() {
  if (auto s = CheckKvm(); !s.ok()) return s;
  InstallKickHandler();
  kvm_ = Fd(::open("/dev/kvm", O_RDWR | O_CLOEXEC));
  int fd = -1;
  if (auto s = Ioctl(kvm_.get(), KVM_CREATE_VM, 0, "KVM_CREATE_VM", &fd); !s.ok()) return s;
  vm_ = Fd(fd);
  if (auto s = Ioctl(vm_.get(), KVM_SET_TSS_ADDR, kTssAddr, "KVM_SET_TSS_ADDR"); !s.ok()) return s;
  // With manual protect, KVM_GET_DIRTY_LOG only reads the log and KVM_CLEAR_DIRTY_LOG re-arms
  // exactly the pages harvested.
  int caps = ::ioctl(vm_.get(), KVM_CHECK_EXTENSION, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
  if (caps > 0 && (caps & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)) {
    kvm_enable_cap cap{};
    cap.cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
    cap.args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
    if (auto s = Ioctl(vm_.get(), KVM_ENABLE_CAP, &cap, "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG)");
        !s.ok()) {
      return s;
    }
    manual_dirty_protect_ = true;
  }
  kvm_userspace_memory_region region{};
  region.slot = 0;
  region.flags = KVM_MEM_LOG_DIRTY_PAGES;
  region.guest_phys_addr = 0;
  region.memory_size = memory_.size();
  region.userspace_addr = reinterpret_cast<uint64_t>(memory_.data());
  if (auto s = Ioctl(vm_.get(), KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");
      !s.ok()) {
    return s;
  }
  if (auto s = Ioctl(vm_.get(), KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU", &fd); !s.ok()) return s;
  vcpu_ = Fd(fd);
  int size = 0;
  if (auto s = Ioctl(kvm_.get(), KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE", &size);
      !s.ok()) {
    return s;
  }
  void* run = ::mmap(nullptr, static_cast<size_t>(size), PROT_READ | PROT_WRITE, MAP_SHARED,
                     vcpu_.get(), 0);
  if (run == MAP_FAILED) return ErrnoStatus("mmap kvm_run");
  run_ = static_cast<kvm_run*>(run);
  run_size_ = static_cast<size_t>(size);
  return absl::OkStatus();
}

absl::StatusOr<VcpuExit> KvmBackend::Run() {
  if (::ioctl(vcpu_.get(), KVM_RUN, 0) < 0) {
    if (errno == EINTR || errno == EAGAIN) return VcpuExit{};
    return ErrnoStatus("KVM_RUN");
  }
  switch (run_->exit_reason) {
    case KVM_EXIT_IO: {
      const auto& io = run_->io;
      VcpuExit e;
      e.kind = io.direction == KVM_EXIT_IO_OUT ? VcpuExit::Kind::kPortOut : VcpuExit::Kind::kPortIn;
      e.port = io.port;
      e.size = io.size;
      e.count = io.count;
      if (io.size <= sizeof(e.value)) {
        std::memcpy(&e.value, reinterpret_cast<uint8_t*>(run_) + io.data_offset, io.size);
      }
      kvm_regs regs{};
      ::ioctl(vcpu_.get(), KVM_GET_REGS, &regs);
      e.rip = regs.rip;
      return e;
    }
    case KVM_EXIT_INTERNAL_ERROR:
      return Fault(
          absl::StrFormat("%s suberror %d", ExitName(run_->exit_reason), run_->internal.suberror));
    case KVM_EXIT_MMIO:
      return Fault(
          absl::StrFormat("%s gpa=0x%x", ExitName(run_->exit_reason), run_->mmio.phys_addr));
    case KVM_EXIT_FAIL_ENTRY:
      return Fault(absl::StrFormat("%s reason 0x%x", ExitName(run_->exit_reason),
                                   run_->fail_entry.hardware_entry_failure_reason));
    default:
      return Fault(
          absl::StrFormat("%s (exit reason %d)", ExitName(run_->exit_reason), run_->exit_reason));
  }
}

absl::StatusOr<DirtyBitmap> KvmBackend::HarvestGuestDirty() {
  DirtyBitmap bitmap(memory_.pages());
  kvm_dirty_log log{};
  log.slot = 0;
  log.dirty_bitmap = bitmap.words().data();
  if (auto s = Ioctl(vm_.get(), KVM_GET_DIRTY_LOG, &log, "KVM_GET_DIRTY_LOG"); !s.ok()) return s;
  if (manual_dirty_protect_) {
    kvm_clear_dirty_log clear{};
    clear.slot = 0;
    clear.first_page = 0;
    clear.num_pages = static_cast<uint32_t>(memory_.pages());
    clear.dirty_bitmap = bitmap.words().data();
    if (auto s = Ioctl(vm_.get(), KVM_CLEAR_DIRTY_LOG, &clear, "KVM_CLEAR_DIRTY_LOG"); !s.ok()) {
      return s;
    }
  }
  return bitmap;
}

absl::Status KvmBackend::SaveCpu(pb::VmSnapshot* snap) {
  auto vcpu = KvmVcpu::Save(kvm_.get(), vcpu_.get());
  if (!vcpu.ok()) return vcpu.status();
  *snap->add_vcpus()->mutable_kvm() = std::move(*vcpu);
  auto clock = KvmClock::Save(vm_.get());
  if (!clock.ok()) return clock.status();
  *snap->mutable_clock() = *clock;
  snap->set_tsc_khz(TscKhz());
  snap->set_platform(pb::KVM);
  return absl::OkStatus();
}

absl::Status KvmBackend::RestoreCpu(const pb::VmSnapshot& snap) {
  if (snap.vcpus_size() != 1 || !snap.vcpus(0).has_kvm()) {
    return absl::InvalidArgumentError("saved state holds no KVM vCPU state");
  }
  if (auto s = KvmVcpu::Restore(vcpu_.get(), snap.vcpus(0).kvm()); !s.ok()) return s;
  return KvmClock::Restore(vm_.get(), snap.clock());
}

}  // namespace

absl::Status CheckKvm() {
  Fd kvm(::open("/dev/kvm", O_RDWR | O_CLOEXEC));
  if (!kvm.valid()) return ErrnoStatus("cannot open /dev/kvm");
  int version = ::ioctl(kvm.get(), KVM_GET_API_VERSION, 0);
  if (version != KVM_API_VERSION) {
    return absl::FailedPreconditionError(
        absl::StrCat("/dev/kvm speaks API version ", version, ", Romulus needs ", KVM_API_VERSION));
  }
  int fd = ::ioctl(kvm.get(), KVM_CREATE_VM, 0);
  if (fd < 0) return ErrnoStatus("/dev/kvm cannot create a VM (KVM_CREATE_VM)");
  ::close(fd);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Backend>> CreateKvmBackend(GuestMemory& memory) {
  auto backend = std::make_unique<KvmBackend>(memory);
  if (auto s = backend->Create(); !s.ok()) return s;
  return backend;
}

}  // namespace romulus::vmm
