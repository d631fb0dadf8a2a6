#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <atomic>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "vmm/console.h"
#include "vmm/guest_loader.h"
#include "vmm/idle_device.h"
#include "vmm/snapshot.h"
#include "vmm/vcpu_state.h"
#include "vmm/vmm.h"

namespace romulus::vmm {
namespace {

constexpr uint64_t kTssAddr = 0xfffbd000;
const int kKickSignal = SIGUSR2;

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

}  // namespace

absl::Status CheckKvm() {
  Fd kvm(::open("/dev/kvm", O_RDWR | O_CLOEXEC));
  if (!kvm.valid()) {
    return ErrnoStatus(
        "cannot open /dev/kvm (Romulus runs VMs on Linux KVM; load kvm and run "
        "as a user who may open /dev/kvm)");
  }
  int version = ::ioctl(kvm.get(), KVM_GET_API_VERSION, 0);
  if (version != KVM_API_VERSION) {
    return absl::FailedPreconditionError(
        absl::StrCat("/dev/kvm speaks API version ", version, ", Romulus needs ", KVM_API_VERSION));
  }
  return absl::OkStatus();
}

absl::Status Vm::CreateKvmVm(uint64_t memory_bytes) {
  if (auto s = CheckKvm(); !s.ok()) return s;
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
  if (!memory_) {
    auto mem = GuestMemory::CreateMemfd(memory_bytes);
    if (!mem.ok()) return mem.status();
    memory_ = std::move(*mem);
  }
  kvm_userspace_memory_region region{};
  region.slot = 0;
  region.flags = KVM_MEM_LOG_DIRTY_PAGES;
  region.guest_phys_addr = 0;
  region.memory_size = memory_->size();
  region.userspace_addr = reinterpret_cast<uint64_t>(memory_->data());
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

absl::Status Vm::CreateDevices(std::function<void(absl::string_view)> console,
                               OutputGate* output_gate, const std::string& disk_path) {
  auto disk = BlockDevice::Open(disk_path);
  if (!disk.ok()) return disk.status();
  disk_ = std::move(*disk);
  console_ = std::make_unique<Console>(std::move(console), output_gate);
  idle_ = std::make_unique<IdleDevice>();
  ledger_ = std::make_unique<LedgerDevice>(*memory_, [this] { idle_->Kick(); });
  return absl::OkStatus();
}

absl::Status ValidateVmConfig(const VmConfig& config) {
  if (auto s = GuestMemory::ValidateSize(config.memory_bytes); !s.ok()) return s;
  uint64_t workload_pages = (config.memory_bytes - RML_WORKLOAD_GPA) / kPageSize;
  if (config.workload.working_set_pages > workload_pages) {
    return absl::InvalidArgumentError(absl::StrCat(
        "working set of ", config.workload.working_set_pages, " pages does not fit: ",
        config.memory_bytes >> 20, " MiB of memory leaves ", workload_pages, " pages for it"));
  }
  if (config.max_accounts == 0 || config.max_accounts > RML_MAX_ACCOUNTS) {
    return absl::InvalidArgumentError(
        absl::StrCat("accounts must be 1 to ", RML_MAX_ACCOUNTS, ", got ", config.max_accounts));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Vm>> Vm::Boot(const VmConfig& config) {
  if (auto s = ValidateVmConfig(config); !s.ok()) return s;
  auto image = LoadGuestImage(config.guest_image_path);
  if (!image.ok()) return image.status();

  std::unique_ptr<Vm> vm(new Vm());
  if (!config.memory_path.empty()) {
    auto mem = GuestMemory::MapFileShared(config.memory_path, config.memory_bytes, true);
    if (!mem.ok()) return mem.status();
    vm->memory_ = std::move(*mem);
  }
  if (auto s = vm->CreateKvmVm(config.memory_bytes); !s.ok()) return s;
  if (auto s = vm->CreateDevices(config.console, config.output_gate, config.disk_path); !s.ok())
    return s;
  if (auto s = VcpuState::SetSupportedCpuid(vm->kvm_.get(), vm->vcpu_.get()); !s.ok()) return s;
  auto entry = PlaceGuest(*image, *vm->memory_);
  if (!entry.ok()) return entry.status();

  int tsc_khz = ::ioctl(vm->vcpu_.get(), KVM_GET_TSC_KHZ, 0);
  rml_boot boot{};
  boot.magic = RML_BOOT_MAGIC;
  boot.abi_version = RML_ABI_VERSION;
  boot.pattern = config.workload.pattern;
  boot.memory_bytes = config.memory_bytes;
  boot.tsc_khz = tsc_khz > 0 ? static_cast<uint64_t>(tsc_khz) : 0;
  boot.ws_pages = config.workload.working_set_pages;
  boot.write_rate = config.workload.write_rate;
  boot.write_limit = config.workload.write_limit;
  boot.max_accounts = config.max_accounts;
  boot.journal_id =
      (static_cast<uint64_t>(::time(nullptr)) << 20) ^ static_cast<uint64_t>(::getpid());
  boot.disk_sectors = vm->disk_->sectors();
  boot.seed = config.workload.seed;
  boot.progress_ms = config.progress_ms;
  vm->memory_->Write(RML_BOOT_GPA, &boot, sizeof(boot));
  if (auto s = SetUpLongMode(vm->vcpu_.get(), *vm->memory_, *entry); !s.ok()) return s;
  return vm;
}

absl::StatusOr<std::unique_ptr<Vm>> Vm::Restore(const std::string& dir,
                                                const std::string& disk_path,
                                                std::function<void(absl::string_view)> console,
                                                OutputGate* output_gate) {
  auto snap = ReadSnapshot(dir);
  if (!snap.ok()) return snap.status();
  auto mem = GuestMemory::MapFilePrivate(SnapshotMemoryPath(dir), snap->memory_bytes());
  if (!mem.ok()) return mem.status();
  if (uint64_t d = (*mem)->Digest(); d != snap->memory_xxh3()) {
    return absl::DataLossError(
        absl::StrFormat("snapshot %s: memory.bin is corrupted (xxh3 %016x, recorded %016x)", dir, d,
                        snap->memory_xxh3()));
  }
  if (auto s = RestoreSnapshotDisk(dir, *snap, disk_path); !s.ok()) return s;
  return Adopt(std::move(*mem), *snap, disk_path, std::move(console), output_gate);
}

absl::StatusOr<std::unique_ptr<Vm>> Vm::Adopt(std::unique_ptr<GuestMemory> memory,
                                              const pb::VmSnapshot& state,
                                              const std::string& disk_path,
                                              std::function<void(absl::string_view)> console,
                                              OutputGate* output_gate) {
  if (state.vcpus_size() != 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("saved state has %d vCPUs; this monitor runs one", state.vcpus_size()));
  }
  std::unique_ptr<Vm> vm(new Vm());
  uint64_t memory_bytes = memory->size();
  vm->memory_ = std::move(memory);
  if (auto s = vm->CreateKvmVm(memory_bytes); !s.ok()) return s;
  if (auto s = vm->CreateDevices(std::move(console), output_gate, disk_path); !s.ok()) return s;
  if (auto s = VcpuState::Restore(vm->vcpu_.get(), state.vcpus(0)); !s.ok()) return s;
  if (auto s = VmClockState::Restore(vm->vm_.get(), state.clock()); !s.ok()) return s;
  const pb::DeviceStates& d = state.devices();
  vm->console_->Restore(d.console());
  vm->idle_->Restore(d.idle());
  vm->ledger_->Restore(d.ledger());
  if (auto s = vm->disk_->Restore(d.block()); !s.ok()) return s;
  return vm;
}

Vm::~Vm() {
  (void)Stop();
  if (run_) ::munmap(run_, run_size_);
}

std::unique_ptr<GuestMemory> Vm::TakeMemory() {
  (void)Stop();
  // The vCPU holds a reference to the VM: both must be closed for KVM to drop the memory slot.
  if (run_) ::munmap(run_, run_size_);
  run_ = nullptr;
  vcpu_.Reset();
  vm_.Reset();
  return std::move(memory_);
}

absl::Status Vm::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (started_) return absl::FailedPreconditionError("VM already started");
  InstallKickHandler();
  started_ = true;
  thread_ = std::thread([this] { RunLoop(); });
  return absl::OkStatus();
}

void Vm::RunLoop() {
  // Only the kick signal may land on this thread; everything else is for the main thread.
  sigset_t set;
  sigfillset(&set);
  sigdelset(&set, kKickSignal);
  pthread_sigmask(SIG_SETMASK, &set, nullptr);

  absl::Status result;
  bool clean = true;  // false right after an I/O exit, until KVM_RUN has completed it
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (stop_requested_ && clean) break;
      if (pause_requested_ && clean) {
        paused_ = true;
        cv_.notify_all();
        cv_.wait(lock, [this] { return !pause_requested_ || stop_requested_; });
        paused_ = false;
        cv_.notify_all();
        continue;
      }
      // Set under the lock so that a request made after this check still stops KVM_RUN: the
      // requester sets immediate_exit itself and then signals this thread.
      run_->immediate_exit = (pause_requested_ || stop_requested_) ? 1 : 0;
    }
    if (::ioctl(vcpu_.get(), KVM_RUN, 0) < 0) {
      if (errno == EINTR || errno == EAGAIN) {
        clean = true;
        continue;
      }
      result = ErrnoStatus("KVM_RUN");
      break;
    }
    clean = false;
    result = HandleExit();
    if (!result.ok()) break;
  }
  std::lock_guard<std::mutex> lock(mu_);
  exited_ = true;
  exit_status_ = result;
  cv_.notify_all();
}

absl::Status Vm::ExitError(absl::string_view what) {
  kvm_regs regs{};
  ::ioctl(vcpu_.get(), KVM_GET_REGS, &regs);
  return absl::AbortedError(
      absl::StrFormat("guest stopped: %s at rip=0x%x rflags=0x%x", what, regs.rip, regs.rflags));
}

absl::Status Vm::HandleExit() {
  switch (run_->exit_reason) {
    case KVM_EXIT_IO: {
      const auto& io = run_->io;
      if (io.direction != KVM_EXIT_IO_OUT || io.size != 4 || io.count != 1) {
        return ExitError(absl::StrFormat("unsupported port I/O (%s port 0x%x, %d bytes x %d)",
                                         io.direction == KVM_EXIT_IO_OUT ? "out" : "in", io.port,
                                         io.size, io.count));
      }
      uint32_t value;
      std::memcpy(&value, reinterpret_cast<uint8_t*>(run_) + io.data_offset, sizeof(value));
      switch (io.port) {
        case RML_PORT_CONSOLE:
          return console_->OnOut(*memory_, value);
        case RML_PORT_RESP:
          return ledger_->OnResponseDoorbell();
        case RML_PORT_BLOCK:
          return disk_->OnDoorbell(*memory_);
        case RML_PORT_IDLE:
          idle_->Wait(value);
          return absl::OkStatus();
        case RML_PORT_PANIC:
          return ExitError(absl::StrFormat("guest panic (code 0x%x)", value));
        default:
          return ExitError(absl::StrFormat("write to unknown port 0x%x", io.port));
      }
    }
    case KVM_EXIT_INTERNAL_ERROR:
      return ExitError(
          absl::StrFormat("%s suberror %d", ExitName(run_->exit_reason), run_->internal.suberror));
    case KVM_EXIT_MMIO:
      return ExitError(
          absl::StrFormat("%s gpa=0x%x", ExitName(run_->exit_reason), run_->mmio.phys_addr));
    case KVM_EXIT_FAIL_ENTRY:
      return ExitError(absl::StrFormat("%s reason 0x%x", ExitName(run_->exit_reason),
                                       run_->fail_entry.hardware_entry_failure_reason));
    default:
      return ExitError(
          absl::StrFormat("%s (exit reason %d)", ExitName(run_->exit_reason), run_->exit_reason));
  }
}

absl::Status Vm::Pause() {
  std::unique_lock<std::mutex> lock(mu_);
  if (!started_) return absl::FailedPreconditionError("VM not started");
  if (exited_)
    return exit_status_.ok() ? absl::FailedPreconditionError("VM stopped") : exit_status_;
  ledger_->Freeze();
  pause_requested_ = true;
  run_->immediate_exit = 1;
  idle_->Kick();
  ::pthread_kill(thread_.native_handle(), kKickSignal);
  cv_.wait(lock, [this] { return paused_ || exited_; });
  if (exited_)
    return exit_status_.ok() ? absl::FailedPreconditionError("VM stopped") : exit_status_;
  return absl::OkStatus();
}

absl::Status Vm::Resume() {
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (!paused_) return absl::FailedPreconditionError("VM not paused");
    pause_requested_ = false;
    cv_.notify_all();
    cv_.wait(lock, [this] { return !paused_ || exited_; });
  }
  ledger_->Thaw();
  return absl::OkStatus();
}

absl::Status Vm::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!started_) return absl::OkStatus();
    stop_requested_ = true;
    if (run_) run_->immediate_exit = 1;
    if (!exited_) ::pthread_kill(thread_.native_handle(), kKickSignal);
    cv_.notify_all();
  }
  idle_->Kick();
  return Wait();
}

absl::Status Vm::Wait() {
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (!started_) return absl::FailedPreconditionError("VM not started");
    cv_.wait(lock, [this] { return exited_; });
  }
  if (thread_.joinable()) thread_.join();
  std::lock_guard<std::mutex> lock(mu_);
  return exit_status_;
}

bool Vm::exited() {
  std::lock_guard<std::mutex> lock(mu_);
  return exited_;
}

absl::Status Vm::WaitStopped() {
  std::lock_guard<std::mutex> lock(mu_);
  if (started_ && !paused_ && !exited_) {
    return absl::FailedPreconditionError("the VM must be paused for this");
  }
  return absl::OkStatus();
}

absl::StatusOr<DirtyBitmap> Vm::HarvestDirty() {
  if (auto s = WaitStopped(); !s.ok()) return s;
  DirtyBitmap bitmap(memory_->pages());
  kvm_dirty_log log{};
  log.slot = 0;
  log.dirty_bitmap = bitmap.words().data();
  if (auto s = Ioctl(vm_.get(), KVM_GET_DIRTY_LOG, &log, "KVM_GET_DIRTY_LOG"); !s.ok()) return s;
  if (manual_dirty_protect_) {
    kvm_clear_dirty_log clear{};
    clear.slot = 0;
    clear.first_page = 0;
    clear.num_pages = static_cast<uint32_t>(memory_->pages());
    clear.dirty_bitmap = bitmap.words().data();
    if (auto s = Ioctl(vm_.get(), KVM_CLEAR_DIRTY_LOG, &clear, "KVM_CLEAR_DIRTY_LOG"); !s.ok()) {
      return s;
    }
  }
  bitmap.Merge(memory_->TakeMonitorDirty());
  return bitmap;
}

absl::StatusOr<pb::VmSnapshot> Vm::SaveState() {
  if (auto s = WaitStopped(); !s.ok()) return s;
  pb::VmSnapshot snap;
  snap.set_format_version(kSnapshotFormatVersion);
  snap.set_memory_bytes(memory_->size());
  snap.set_disk_bytes(disk_->sectors() * RML_SECTOR_SIZE);
  auto vcpu = VcpuState::Save(kvm_.get(), vcpu_.get());
  if (!vcpu.ok()) return vcpu.status();
  *snap.add_vcpus() = std::move(*vcpu);
  auto clock = VmClockState::Save(vm_.get());
  if (!clock.ok()) return clock.status();
  *snap.mutable_clock() = *clock;
  pb::DeviceStates* d = snap.mutable_devices();
  *d->mutable_console() = console_->Save();
  *d->mutable_ledger() = ledger_->Save();
  *d->mutable_block() = disk_->Save();
  *d->mutable_idle() = idle_->Save();
  int khz = ::ioctl(vcpu_.get(), KVM_GET_TSC_KHZ, 0);
  snap.set_tsc_khz(khz > 0 ? static_cast<uint64_t>(khz) : 0);
  return snap;
}

absl::StatusOr<SnapshotInfo> Vm::SaveSnapshot(const std::string& dir) {
  auto state = SaveState();
  if (!state.ok()) return state.status();
  SnapshotInfo info;
  info.guest = guest_status();
  auto s = WriteSnapshot(dir, *state, *memory_, disk_->fd(), &info);
  if (!s.ok()) return s;
  return info;
}

rml_status Vm::guest_status() const {
  rml_status st;
  std::memcpy(&st, memory_->data() + RML_BOOT_GPA + offsetof(rml_boot, status), sizeof(st));
  return st;
}

}  // namespace romulus::vmm
