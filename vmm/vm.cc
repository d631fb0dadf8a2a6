// The neutral VM: guest memory, devices on their ports, the pause/stop state machine, state
// assembly, boot, adopt and restore. The platform (vmm/backend.h) only runs the vCPU.
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "vmm/backend.h"
#include "vmm/console.h"
#include "vmm/guest_loader.h"
#include "vmm/idle_device.h"
#include "vmm/snapshot.h"
#include "vmm/vmm.h"

namespace romulus::vmm {
namespace {

absl::Status GuestStopped(absl::string_view what, uint64_t rip) {
  return absl::AbortedError(absl::StrFormat("guest stopped: %s at rip=0x%x", what, rip));
}

}  // namespace

absl::Status CheckPlatform(pb::Platform platform) {
  switch (platform) {
    case pb::KVM:
      return CheckKvm();
    case pb::PROCESS:
      return CheckProcessPlatform();
    default:
      return absl::InvalidArgumentError("no platform named");
  }
}

absl::StatusOr<pb::Platform> ChoosePlatform(pb::Platform requested) {
  if (requested != pb::PLATFORM_UNSPECIFIED) {
    if (auto s = CheckPlatform(requested); !s.ok()) {
      return absl::Status(
          s.code(), absl::StrCat("the ", PlatformName(requested), " platform: ", s.message()));
    }
    return requested;
  }
  absl::Status kvm = CheckKvm();
  if (kvm.ok()) return pb::KVM;
  absl::Status process = CheckProcessPlatform();
  if (process.ok()) return pb::PROCESS;
  return absl::FailedPreconditionError(absl::StrCat(
      "no platform can run VMs here: kvm: ", kvm.message(), "; process: ", process.message()));
}

std::vector<pb::Platform> AvailablePlatforms() {
  std::vector<pb::Platform> out;
  for (pb::Platform p : {pb::KVM, pb::PROCESS}) {
    if (CheckPlatform(p).ok()) out.push_back(p);
  }
  return out;
}

absl::string_view PlatformName(pb::Platform platform) {
  switch (platform) {
    case pb::KVM:
      return "kvm";
    case pb::PROCESS:
      return "process";
    default:
      return "unspecified";
  }
}

absl::StatusOr<pb::Platform> ParsePlatform(absl::string_view name) {
  if (name.empty()) return pb::PLATFORM_UNSPECIFIED;
  if (name == "kvm") return pb::KVM;
  if (name == "process") return pb::PROCESS;
  return absl::InvalidArgumentError(absl::StrCat("unknown platform '", name, "' (kvm or process)"));
}

absl::Status CheckResumable(const pb::VmSnapshot& state, pb::Platform platform) {
  if (state.vcpus_size() != 1) {
    return absl::FailedPreconditionError(
        absl::StrCat("its state has ", state.vcpus_size(), " vCPUs; this monitor runs one"));
  }
  pb::Platform wrote = state.vcpus(0).has_kvm()       ? pb::KVM
                       : state.vcpus(0).has_process() ? pb::PROCESS
                                                      : pb::PLATFORM_UNSPECIFIED;
  if (wrote == pb::PLATFORM_UNSPECIFIED || wrote != state.platform()) {
    return absl::FailedPreconditionError("its state holds no vCPU state of any platform");
  }
  if (wrote != platform) {
    return absl::FailedPreconditionError(absl::StrCat(
        "its state was saved by the ", PlatformName(wrote), " platform and this host runs the ",
        PlatformName(platform), " platform (state does not move between platforms)"));
  }
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

absl::Status Vm::CreateBackend(pb::Platform platform) {
  platform_ = platform;
  thread_ = std::thread([this] { VcpuThread(); });
  return OnVcpuThread([this]() -> absl::Status {
    auto backend =
        platform_ == pb::KVM ? CreateKvmBackend(*memory_) : CreateProcessBackend(*memory_);
    if (!backend.ok()) return backend.status();
    backend_ = std::move(*backend);
    return absl::OkStatus();
  });
}

absl::Status Vm::CreateDevices(std::function<void(absl::string_view)> console,
                               OutputGate* output_gate, const std::string& disk_path) {
  auto disk = BlockDevice::Open(disk_path);
  if (!disk.ok()) return disk.status();
  disk_ = std::move(*disk);
  console_ = std::make_unique<Console>(std::move(console), output_gate);
  idle_ = std::make_unique<IdleDevice>();
  ledger_ = std::make_unique<LedgerDevice>(*memory_, [this] { idle_->Kick(); });
  ports_[RML_PORT_CONSOLE] = [this](uint32_t len) { return console_->OnOut(*memory_, len); };
  ports_[RML_PORT_RESP] = [this](uint32_t) { return ledger_->OnResponseDoorbell(); };
  ports_[RML_PORT_BLOCK] = [this](uint32_t) { return disk_->OnDoorbell(*memory_); };
  ports_[RML_PORT_IDLE] = [this](uint32_t us) {
    idle_->Wait(us);
    return absl::OkStatus();
  };
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Vm>> Vm::Boot(const VmConfig& config) {
  if (auto s = ValidateVmConfig(config); !s.ok()) return s;
  auto platform = ChoosePlatform(config.platform);
  if (!platform.ok()) return platform.status();
  auto image = LoadGuestImage(config.guest_image_path);
  if (!image.ok()) return image.status();

  std::unique_ptr<Vm> vm(new Vm());
  auto mem = config.memory_path.empty()
                 ? GuestMemory::CreateMemfd(config.memory_bytes)
                 : GuestMemory::MapFileShared(config.memory_path, config.memory_bytes, true);
  if (!mem.ok()) return mem.status();
  vm->memory_ = std::move(*mem);
  if (auto s = vm->CreateBackend(*platform); !s.ok()) return s;
  if (auto s = vm->CreateDevices(config.console, config.output_gate, config.disk_path); !s.ok())
    return s;
  auto entry = PlaceGuest(*image, *vm->memory_);
  if (!entry.ok()) return entry.status();

  rml_boot boot{};
  boot.magic = RML_BOOT_MAGIC;
  boot.abi_version = RML_ABI_VERSION;
  boot.pattern = config.workload.pattern;
  boot.memory_bytes = config.memory_bytes;
  boot.ws_pages = config.workload.working_set_pages;
  boot.write_rate = config.workload.write_rate;
  boot.write_limit = config.workload.write_limit;
  boot.max_accounts = config.max_accounts;
  boot.journal_id =
      (static_cast<uint64_t>(::time(nullptr)) << 20) ^ static_cast<uint64_t>(::getpid());
  boot.disk_sectors = vm->disk_->sectors();
  boot.seed = config.workload.seed;
  boot.progress_ms = config.progress_ms;
  Vm* v = vm.get();
  if (auto s = vm->OnVcpuThread([v, &boot, entry = *entry] {
        boot.tsc_khz = v->backend_->TscKhz();
        v->memory_->Write(RML_BOOT_GPA, &boot, sizeof(boot));
        return v->backend_->SetUpEntry(entry);
      });
      !s.ok()) {
    return s;
  }
  return vm;
}

absl::StatusOr<std::unique_ptr<Vm>> Vm::Restore(const std::string& dir,
                                                const std::string& disk_path,
                                                std::function<void(absl::string_view)> console,
                                                OutputGate* output_gate) {
  auto snap = ReadSnapshot(dir);
  if (!snap.ok()) return snap.status();
  auto mem = GuestMemory::CreateMemfd(snap->memory_bytes());
  if (!mem.ok()) return mem.status();
  if (auto s = LoadSnapshotContents(dir, **mem, snap->disk_bytes(), disk_path); !s.ok()) return s;
  return Adopt(std::move(*mem), *snap, disk_path, std::move(console), output_gate);
}

absl::StatusOr<std::unique_ptr<Vm>> Vm::Adopt(std::unique_ptr<GuestMemory> memory,
                                              const pb::VmSnapshot& state,
                                              const std::string& disk_path,
                                              std::function<void(absl::string_view)> console,
                                              OutputGate* output_gate,
                                              std::optional<PostCopy> postcopy) {
  if (auto s = CheckResumable(state, state.platform()); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("cannot resume: ", s.message()));
  }
  if (auto s = CheckPlatform(state.platform()); !s.ok()) {
    return absl::Status(s.code(),
                        absl::StrCat("cannot resume state of the ", PlatformName(state.platform()),
                                     " platform here: ", s.message()));
  }
  std::unique_ptr<Vm> vm(new Vm());
  vm->memory_ = std::move(memory);
  if (postcopy) {
    if (postcopy->missing.pages() != vm->memory_->pages()) {
      return absl::InvalidArgumentError("post-copy: the missing pages do not match guest RAM");
    }
    for (uint64_t gfn = 0; gfn < RML_IMAGE_GPA / kPageSize; gfn++) {
      if (postcopy->missing.Test(gfn)) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "post-copy: page %#x is missing, but pages below %#x travel with the state", gfn,
            RML_IMAGE_GPA));
      }
    }
    // Before anything maps guest RAM for the guest.
    auto mp = MissingPages::Create(*vm->memory_, postcopy->missing,
                                   {.on_fault = std::move(postcopy->on_fault)});
    if (!mp.ok()) return mp.status();
    vm->missing_pages_ = std::move(*mp);
  }
  if (auto s = vm->CreateBackend(state.platform()); !s.ok()) return s;
  if (auto s = vm->CreateDevices(std::move(console), output_gate, disk_path); !s.ok()) return s;
  Vm* v = vm.get();
  if (auto s = vm->OnVcpuThread([v, &state]() -> absl::Status {
        if (v->missing_pages_) {
          auto mappings = v->backend_->WatchMissingPages();
          if (!mappings.ok()) return mappings.status();
          for (PlatformMapping& m : *mappings) {
            auto s = v->missing_pages_->AddMapping(std::move(m.uffd), m.address, m.first_page);
            if (!s.ok()) return s;
          }
        }
        return v->backend_->RestoreCpu(state);
      });
      !s.ok()) {
    return s;
  }
  const pb::DeviceStates& d = state.devices();
  vm->console_->Restore(d.console());
  vm->idle_->Restore(d.idle());
  vm->ledger_->Restore(d.ledger());
  if (auto s = vm->disk_->Restore(d.block()); !s.ok()) return s;
  return vm;
}

Vm::~Vm() {
  (void)Stop();
  if (thread_.joinable()) {
    (void)OnVcpuThread([this] {
      backend_.reset();
      return absl::OkStatus();
    });
    {
      std::lock_guard<std::mutex> lock(mu_);
      quit_ = true;
      cv_.notify_all();
    }
    thread_.join();
  }
}

std::unique_ptr<GuestMemory> Vm::TakeMemory() {
  (void)Stop();
  // Once the backend is gone, neither KVM's memory slot nor the stub's mapping refers to it.
  (void)OnVcpuThread([this] {
    backend_.reset();
    return absl::OkStatus();
  });
  missing_pages_.reset();  // a missing page now reads as zeros: the caller knows which
  return std::move(memory_);
}

absl::Status Vm::OnVcpuThread(std::function<absl::Status()> fn) {
  bool done = false;
  absl::Status result;
  std::unique_lock<std::mutex> lock(mu_);
  if (quit_ || !thread_.joinable()) return absl::FailedPreconditionError("VM torn down");
  requests_.push_back([this, &fn, &done, &result] {
    absl::Status s = fn();
    std::lock_guard<std::mutex> lock(mu_);
    result = std::move(s);
    done = true;
    cv_.notify_all();
  });
  if (backend_ && started_ && !exited_ && !paused_) backend_->Kick();
  cv_.notify_all();
  lock.unlock();
  if (idle_) idle_->Kick();
  lock.lock();
  cv_.wait(lock, [&done] { return done; });
  return result;
}

void Vm::VcpuThread() {
  // Only the kick signal may land on this thread; everything else is for the main thread.
  sigset_t set;
  sigfillset(&set);
  sigdelset(&set, SIGUSR2);
  pthread_sigmask(SIG_SETMASK, &set, nullptr);

  std::unique_lock<std::mutex> lock(mu_);
  bool clean = true;  // false right after a port exit, until the next Run has completed it
  for (;;) {
    if (!requests_.empty() && clean) {
      auto request = std::move(requests_.front());
      requests_.pop_front();
      lock.unlock();
      request();
      lock.lock();
      continue;
    }
    if (quit_) break;
    if (!started_ || exited_) {
      cv_.wait(lock);
      continue;
    }
    if (stop_requested_ && clean) {
      exited_ = true;
      paused_ = false;
      cv_.notify_all();
      continue;
    }
    if (pause_requested_ && clean) {
      if (!paused_) {
        paused_ = true;
        cv_.notify_all();
      }
      cv_.wait(lock);
      continue;
    }
    if (paused_) {
      paused_ = false;
      cv_.notify_all();
    }
    if (!pause_requested_ && !stop_requested_ && requests_.empty()) backend_->ClearKick();
    lock.unlock();
    absl::Status result;
    auto exit = backend_->Run();
    if (!exit.ok()) {
      result = exit.status();
    } else {
      clean = exit->kind == VcpuExit::Kind::kKicked;
      result = HandleExit(*exit);
    }
    lock.lock();
    if (!result.ok()) {
      exited_ = true;
      exit_status_ = result;
      clean = true;
      cv_.notify_all();
    }
  }
}

absl::Status Vm::HandleExit(const VcpuExit& exit) {
  switch (exit.kind) {
    case VcpuExit::Kind::kKicked:
      return absl::OkStatus();
    case VcpuExit::Kind::kFault:
      return GuestStopped(exit.fault, exit.rip);
    case VcpuExit::Kind::kPortIn:
    case VcpuExit::Kind::kPortOut: {
      bool out = exit.kind == VcpuExit::Kind::kPortOut;
      if (!out || exit.size != 4 || exit.count != 1) {
        return GuestStopped(absl::StrFormat("unsupported port I/O (%s port 0x%x, %d bytes x %d)",
                                            out ? "out" : "in", exit.port, exit.size, exit.count),
                            exit.rip);
      }
      if (exit.port == RML_PORT_PANIC) {
        return GuestStopped(absl::StrFormat("guest panic (code 0x%x)", exit.value), exit.rip);
      }
      auto device = ports_.find(exit.port);
      if (device == ports_.end()) {
        return GuestStopped(absl::StrFormat("write to unknown port 0x%x", exit.port), exit.rip);
      }
      return device->second(exit.value);
    }
  }
  return absl::InternalError("unknown vCPU exit");
}

absl::Status Vm::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (started_) return absl::FailedPreconditionError("VM already started");
  started_ = true;
  cv_.notify_all();
  return absl::OkStatus();
}

absl::Status Vm::Pause() {
  std::unique_lock<std::mutex> lock(mu_);
  if (!started_) return absl::FailedPreconditionError("VM not started");
  if (exited_)
    return exit_status_.ok() ? absl::FailedPreconditionError("VM stopped") : exit_status_;
  ledger_->Freeze();
  pause_requested_ = true;
  backend_->Kick();
  idle_->Kick();
  cv_.notify_all();
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
    if (!started_ || !thread_.joinable()) return absl::OkStatus();
    stop_requested_ = true;
    if (!exited_ && backend_) backend_->Kick();
    cv_.notify_all();
  }
  if (idle_) idle_->Kick();
  return Wait();
}

absl::Status Vm::Wait() {
  std::unique_lock<std::mutex> lock(mu_);
  if (!started_) return absl::FailedPreconditionError("VM not started");
  cv_.wait(lock, [this] { return exited_; });
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
  auto bitmap = backend_->HarvestGuestDirty();
  if (!bitmap.ok()) return bitmap.status();
  bitmap->Merge(memory_->TakeMonitorDirty());
  return bitmap;
}

absl::StatusOr<pb::VmSnapshot> Vm::SaveState() {
  if (auto s = WaitStopped(); !s.ok()) return s;
  pb::VmSnapshot snap;
  snap.set_format_version(kSnapshotFormatVersion);
  snap.set_memory_bytes(memory_->size());
  snap.set_disk_bytes(disk_->sectors() * RML_SECTOR_SIZE);
  if (auto s = OnVcpuThread([this, &snap] { return backend_->SaveCpu(&snap); }); !s.ok()) return s;
  pb::DeviceStates* d = snap.mutable_devices();
  *d->mutable_console() = console_->Save();
  *d->mutable_ledger() = ledger_->Save();
  *d->mutable_block() = disk_->Save();
  *d->mutable_idle() = idle_->Save();
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
