// The process platform: the guest runs natively at CPL 3 in a stub process this thread traces.
//
// The stub is a fresh process (execveat of a two-page static executable from a sealed memfd),
// not a fork of the monitor. Before the guest's first instruction the monitor has it, one system
// call at a time through its gate: unmap everything but its own two pages (stack, vDSO, vvar),
// map guest RAM at the guest-physical addresses from RML_GUEST_LOW up, register that range for
// userfaultfd asynchronous write-protect (the monitor keeps the only reference to the
// userfaultfd), and install a seccomp filter that admits no system call at all. What it then
// holds: its two pages and guest RAM; no file descriptor.
//
// Running the guest is PTRACE_CONT until the stub stops: `out` at CPL 3 raises #GP (SIGSEGV,
// SI_KERNEL), decoded here and emulated by the Vm's devices; any other fault or system call is a
// guest fault; the kick signal (from Kick, any thread) stops it between two instructions. Dirty
// pages: PAGEMAP_SCAN over the stub's pagemap reads and re-protects the written pages in one
// call. vCPU state: the general registers and the XSAVE area, through ptrace.
#include <cpuid.h>
#include <elf.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <x86intrin.h>

#include <chrono>
#include <cstddef>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "guest/abi.h"
#include "vmm/backend.h"
#include "vmm/process/stub_layout.h"
#include "vmm/process/uapi.h"
#include "vmm/sys.h"

extern "C" const uint8_t romulus_stub_elf_start[];
extern "C" const uint8_t romulus_stub_elf_end[];

namespace romulus::vmm {
namespace {

constexpr uint64_t kUserTop = 0x7ffffffff000;  // end of a 47-bit user address space
constexpr uint16_t kUserCs = 0x33, kUserSs = 0x2b;
constexpr size_t kMaxXsaveBytes = 64 << 10;

long Sys(long nr, long a = 0, long b = 0, long c = 0, long d = 0, long e = 0) {
  return ::syscall(nr, a, b, c, d, e);
}

// The stub executable in a sealed memfd, made once per process and kept open.
absl::StatusOr<int> StubExecutable() {
  static std::mutex mu;
  static Fd* exe = nullptr;
  std::lock_guard<std::mutex> lock(mu);
  if (exe) return exe->get();
  constexpr unsigned kMfdExec = 0x10;  // MFD_EXEC (Linux 6.3): executable whatever the default
  const auto name = reinterpret_cast<long>("romulus-stub");
  Fd fd(static_cast<int>(Sys(SYS_memfd_create, name, MFD_CLOEXEC | MFD_ALLOW_SEALING | kMfdExec)));
  if (!fd.valid() && errno == EINVAL) {
    fd = Fd(static_cast<int>(Sys(SYS_memfd_create, name, MFD_CLOEXEC | MFD_ALLOW_SEALING)));
  }
  if (!fd.valid()) return ErrnoStatus("memfd_create for the stub");
  absl::string_view elf(reinterpret_cast<const char*>(romulus_stub_elf_start),
                        static_cast<size_t>(romulus_stub_elf_end - romulus_stub_elf_start));
  for (size_t done = 0; done < elf.size();) {
    ssize_t n = ::write(fd.get(), elf.data() + done, elf.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return ErrnoStatus("write the stub executable");
    done += static_cast<size_t>(n);
  }
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE) !=
      0) {
    return ErrnoStatus("seal the stub executable");
  }
  exe = new Fd(std::move(fd));
  return exe->get();
}

struct SpawnArgs {
  int memory_fd;
  int exe_fd;
  pid_t monitor;
};

// Runs in the child of a vfork-style clone until execveat: raw system calls only (the monitor has
// other threads). The child has its own copy of the monitor's memory (no CLONE_VM: sharing it
// would let the child's sanitizer bookkeeping land in the cloning thread's). The monitor thread
// that cloned it is its parent and its tracer; its death (thread or process) kills the stub
// (PR_SET_PDEATHSIG here, PTRACE_O_EXITKILL later).
__attribute__((no_sanitize("address", "thread", "undefined"))) int StubChild(void* p) {
  auto* a = static_cast<SpawnArgs*>(p);
  Sys(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL);
  if (Sys(SYS_getppid) != a->monitor) Sys(SYS_exit, 126);
  uint64_t none = 0;
  Sys(SYS_rt_sigprocmask, SIG_SETMASK, reinterpret_cast<long>(&none), 0, sizeof(none));
  if (Sys(SYS_ptrace, PTRACE_TRACEME) != 0) Sys(SYS_exit, 125);
  // Guest RAM becomes fd 0, the only one that survives the exec; everything else closes there.
  if (a->memory_fd != 0) {
    if (Sys(SYS_dup3, a->memory_fd, 0, 0) != 0) Sys(SYS_exit, 124);
  } else {
    Sys(SYS_fcntl, 0, F_SETFD, 0);
  }
  constexpr unsigned kCloseRangeCloexec = 1u << 2;
  Sys(SYS_close_range, 1, ~0u, kCloseRangeCloexec);
  const char* argv[] = {"romulus-stub", nullptr};
  const char* envp[] = {nullptr};
  Sys(SYS_execveat, a->exe_fd, reinterpret_cast<long>(""), reinterpret_cast<long>(argv),
      reinterpret_cast<long>(envp), AT_EMPTY_PATH);
  Sys(SYS_exit, 127);
  return 127;
}

// The host's TSC rate, measured once against CLOCK_MONOTONIC_RAW: the guest paces its workload
// by rdtsc, which runs natively in the stub.
uint64_t MeasureTscKhz() {
  static std::once_flag once;
  static uint64_t khz = 0;
  std::call_once(once, [] {
    auto now_ns = [] {
      timespec t;
      ::clock_gettime(CLOCK_MONOTONIC_RAW, &t);
      return static_cast<uint64_t>(t.tv_sec) * 1000000000ull + static_cast<uint64_t>(t.tv_nsec);
    };
    uint64_t t0 = now_ns(), c0 = __rdtsc();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // a measuring interval
    uint64_t t1 = now_ns(), c1 = __rdtsc();
    if (t1 > t0 && c1 > c0) khz = (c1 - c0) * 1000000ull / (t1 - t0);
  });
  return khz;
}

// CPUID answers the guest sees where the CPU can fault on CPUID: the boot host's, saved with
// the vCPU state so that a restored guest sees the same values on another host.
void CaptureCpuid(pb::ProcessVcpuState* out) {
  auto add = [out](uint32_t leaf, uint32_t sub) {
    uint32_t a, b, c, d;
    __cpuid_count(leaf, sub, a, b, c, d);
    pb::CpuidEntry* e = out->add_cpuid();
    e->set_function(leaf);
    e->set_index(sub);
    e->set_eax(a);
    e->set_ebx(b);
    e->set_ecx(c);
    e->set_edx(d);
  };
  uint32_t max = __get_cpuid_max(0, nullptr), ext = __get_cpuid_max(0x80000000, nullptr);
  for (uint32_t leaf = 0; leaf <= std::min(max, 0x20u); leaf++) {
    for (uint32_t sub = 0; sub < 8; sub++) add(leaf, sub);
  }
  for (uint32_t leaf = 0x80000000; leaf <= std::min(ext, 0x80000021u); leaf++) add(leaf, 0);
}

// Decodes the instruction at `rip` that raised #GP: port I/O (only `out` is part of the ABI),
// or a privileged instruction. `len` is set to the length of a port I/O instruction.
VcpuExit DecodeGp(const GuestMemory& mem, const user_regs_struct& r, uint32_t* len) {
  VcpuExit e;
  e.rip = r.rip;
  e.kind = VcpuExit::Kind::kFault;
  e.fault = "general protection fault";
  if (r.rip < RML_GUEST_LOW || r.rip >= mem.size()) return e;
  const uint8_t* b = mem.data() + r.rip;
  uint64_t n = std::min<uint64_t>(15, mem.size() - r.rip), i = 0;
  bool op16 = false;
  for (; i < n && b[i] == 0x66; i++) op16 = true;
  if (i >= n) return e;
  const uint32_t wide = op16 ? 2 : 4;
  const uint16_t dx = static_cast<uint16_t>(r.rdx);
  const uint8_t imm = i + 1 < n ? b[i + 1] : 0;
  auto port_io = [&](VcpuExit::Kind kind, uint16_t port, uint32_t size, uint64_t length) {
    e.kind = kind;
    e.port = port;
    e.size = size;
    e.value = static_cast<uint32_t>(r.rax) & (size == 4 ? ~0u : (1u << (size * 8)) - 1);
    *len = static_cast<uint32_t>(length);
  };
  switch (b[i]) {
    case 0xef:
      port_io(VcpuExit::Kind::kPortOut, dx, wide, i + 1);
      break;
    case 0xee:
      port_io(VcpuExit::Kind::kPortOut, dx, 1, i + 1);
      break;
    case 0xe7:
      port_io(VcpuExit::Kind::kPortOut, imm, wide, i + 2);
      break;
    case 0xe6:
      port_io(VcpuExit::Kind::kPortOut, imm, 1, i + 2);
      break;
    case 0xed:
      port_io(VcpuExit::Kind::kPortIn, dx, wide, i + 1);
      break;
    case 0xec:
      port_io(VcpuExit::Kind::kPortIn, dx, 1, i + 1);
      break;
    case 0xe5:
      port_io(VcpuExit::Kind::kPortIn, imm, wide, i + 2);
      break;
    case 0xe4:
      port_io(VcpuExit::Kind::kPortIn, imm, 1, i + 2);
      break;
    case 0x6c:
    case 0x6d:
    case 0x6e:
    case 0x6f:
      e.fault = absl::StrFormat("unsupported port I/O (string instruction, port 0x%x)", dx);
      break;
    case 0xf4:
      e.fault = "halt (hlt)";
      break;
    case 0xfa:
      e.fault = "privileged instruction (cli)";
      break;
    case 0xfb:
      e.fault = "privileged instruction (sti)";
      break;
    default:
      break;
  }
  return e;
}

class ProcessBackend : public Backend {
 public:
  explicit ProcessBackend(GuestMemory& memory)
      : memory_(memory), tracer_(static_cast<pid_t>(Sys(SYS_gettid))) {}
  ~ProcessBackend() override;

  absl::Status Create();
  pb::Platform platform() const override { return pb::PROCESS; }
  absl::Status SetUpEntry(uint64_t entry) override;
  absl::StatusOr<VcpuExit> Run() override;
  void Kick() override {
    if (pidfd_.valid()) Sys(SYS_pidfd_send_signal, pidfd_.get(), kKickSignal, 0, 0);
  }
  void ClearKick() override {}  // a stale kick only makes one Run return early
  absl::StatusOr<DirtyBitmap> HarvestGuestDirty() override;
  absl::Status SaveCpu(pb::VmSnapshot* snapshot) override;
  absl::Status RestoreCpu(const pb::VmSnapshot& snapshot) override;
  uint64_t TscKhz() override { return MeasureTscKhz(); }
  absl::StatusOr<std::vector<PlatformMapping>> WatchMissingPages() override;

 private:
  absl::Status OnTracer() const {
    if (Sys(SYS_gettid) != tracer_) {
      return absl::InternalError("process platform: a ptrace call off the tracer thread");
    }
    return absl::OkStatus();
  }
  absl::Status Spawn();
  // Waits for the stub's next stop; a stub that ended is an error naming how.
  absl::StatusOr<int> WaitStop();
  // Runs one system call in the stub through its gate; returns what the kernel returned.
  absl::StatusOr<long> StubCall(long nr, uint64_t a = 0, uint64_t b = 0, uint64_t c = 0,
                                uint64_t d = 0, uint64_t e = 0, uint64_t f = 0);
  absl::Status StubWrite(uint64_t addr, const void* data, size_t len);
  absl::Status SetUpAddressSpace();
  absl::Status GetRegs(user_regs_struct* r);
  absl::Status SetRegs(const user_regs_struct& r);
  // Answers a CPUID from the saved table (when CPUID faults here); false: not a CPUID.
  bool EmulateCpuid(user_regs_struct& r);

  GuestMemory& memory_;
  pid_t tracer_;
  pid_t pid_ = -1;
  Fd pidfd_, pagemap_, uffd_;
  user_regs_struct regs_{};  // as of the last stop
  uint32_t advance_ = 0;     // bytes of the `out` to move past on the next Run
  bool cpuid_faulting_ = false;
  pb::ProcessVcpuState cpuid_;  // its cpuid entries
  size_t xsave_bytes_ = 0;
};

ProcessBackend::~ProcessBackend() {
  if (pid_ <= 0) return;
  if (pidfd_.valid()) Sys(SYS_pidfd_send_signal, pidfd_.get(), SIGKILL, 0, 0);
  int st;
  while (::waitpid(pid_, &st, __WALL) < 0 && errno == EINTR) {
  }
}

absl::Status ProcessBackend::Spawn() {
  auto exe = StubExecutable();
  if (!exe.ok()) return exe.status();
  SpawnArgs args{memory_.fd(), *exe, ::getpid()};
  constexpr size_t kStack = 64 << 10;
  void* stack = ::mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (stack == MAP_FAILED) return ErrnoStatus("mmap a stack for the stub's clone");
  pid_ = ::clone(StubChild, static_cast<uint8_t*>(stack) + kStack, CLONE_VFORK | SIGCHLD, &args);
  int err = errno;
  ::munmap(stack, kStack);
  if (pid_ < 0) return ErrnoStatus("clone the stub process", err);
  long pidfd = Sys(SYS_pidfd_open, pid_, 0);
  if (pidfd < 0) return ErrnoStatus("pidfd_open for the stub");
  pidfd_ = Fd(static_cast<int>(pidfd));
  int st;
  pid_t w;
  while ((w = ::waitpid(pid_, &st, __WALL)) < 0 && errno == EINTR) {
  }
  if (w < 0) return ErrnoStatus("wait for the stub process");
  if (!WIFSTOPPED(st) || WSTOPSIG(st) != SIGTRAP) {
    pid_ = WIFSTOPPED(st) ? pid_ : -1;
    return absl::InternalError(absl::StrCat(
        "the stub process did not start (",
        WIFEXITED(st) ? absl::StrCat("exit ", WEXITSTATUS(st),
                                     WEXITSTATUS(st) == 125   ? ": ptrace refused"
                                     : WEXITSTATUS(st) == 127 ? ": exec refused (memfd exec "
                                                                "disabled? see vm.memfd_noexec)"
                                                              : "")
                      : absl::StrCat("status 0x", absl::Hex(st)),
        ")"));
  }
  if (::ptrace(PTRACE_SETOPTIONS, pid_, 0, PTRACE_O_EXITKILL) != 0) {
    return ErrnoStatus("PTRACE_SETOPTIONS on the stub");
  }
  return GetRegs(&regs_);
}

absl::StatusOr<int> ProcessBackend::WaitStop() {
  int st;
  pid_t w;
  while ((w = ::waitpid(pid_, &st, __WALL)) < 0 && errno == EINTR) {
  }
  if (w < 0) return ErrnoStatus("wait for the stub process");
  if (WIFEXITED(st) || WIFSIGNALED(st)) {
    pid_ = -1;
    return absl::AbortedError(
        WIFEXITED(st)
            ? absl::StrCat("the guest's stub process exited (status ", WEXITSTATUS(st), ")")
            : absl::StrCat("the guest's stub process was killed (signal ", WTERMSIG(st), ")"));
  }
  return WSTOPSIG(st);
}

absl::Status ProcessBackend::GetRegs(user_regs_struct* r) {
  if (::ptrace(PTRACE_GETREGS, pid_, 0, r) != 0) return ErrnoStatus("PTRACE_GETREGS");
  return absl::OkStatus();
}

absl::Status ProcessBackend::SetRegs(const user_regs_struct& r) {
  if (::ptrace(PTRACE_SETREGS, pid_, 0, &r) != 0) return ErrnoStatus("PTRACE_SETREGS");
  return absl::OkStatus();
}

absl::Status ProcessBackend::StubWrite(uint64_t addr, const void* data, size_t len) {
  iovec local{const_cast<void*>(data), len}, remote{reinterpret_cast<void*>(addr), len};
  if (::process_vm_writev(pid_, &local, 1, &remote, 1, 0) != static_cast<ssize_t>(len)) {
    return ErrnoStatus("write into the stub");
  }
  return absl::OkStatus();
}

absl::StatusOr<long> ProcessBackend::StubCall(long nr, uint64_t a, uint64_t b, uint64_t c,
                                              uint64_t d, uint64_t e, uint64_t f) {
  user_regs_struct r = regs_;
  r.rax = static_cast<uint64_t>(nr);
  r.orig_rax = ~0ull;
  r.rdi = a;
  r.rsi = b;
  r.rdx = c;
  r.r10 = d;
  r.r8 = e;
  r.r9 = f;
  r.rip = RML_STUB_GATE;
  if (auto s = SetRegs(r); !s.ok()) return s;
  for (int stray = 0;; stray++) {
    if (::ptrace(PTRACE_CONT, pid_, 0, 0) != 0) return ErrnoStatus("PTRACE_CONT");
    auto sig = WaitStop();
    if (!sig.ok()) return sig.status();
    if (*sig == SIGTRAP) break;
    if (stray > 100) return absl::InternalError("the stub keeps stopping during set-up");
  }
  if (auto s = GetRegs(&r); !s.ok()) return s;
  if (r.rip != RML_STUB_GATE + 3) {
    return absl::InternalError(absl::StrFormat("stub set-up call %d stopped at 0x%x", nr, r.rip));
  }
  return static_cast<long>(r.rax);
}

absl::Status ProcessBackend::SetUpAddressSpace() {
  auto call = [this](const char* what, long nr, uint64_t a = 0, uint64_t b = 0, uint64_t c = 0,
                     uint64_t d = 0, uint64_t e = 0, uint64_t f = 0) -> absl::StatusOr<long> {
    auto r = StubCall(nr, a, b, c, d, e, f);
    if (!r.ok()) return r.status();
    if (*r < 0 && *r > -4096)
      return ErrnoStatus(absl::StrCat("stub: ", what), static_cast<int>(-*r));
    return *r;
  };
  // Nothing but the stub's own two pages: no stack, vDSO, vvar or heap.
  if (auto r = call("munmap below the stub", SYS_munmap, 0, RML_STUB_BASE); !r.ok())
    return r.status();
  if (auto r = call("munmap above the stub", SYS_munmap, RML_STUB_END, kUserTop - RML_STUB_END);
      !r.ok()) {
    return r.status();
  }
  uint64_t len = memory_.size() - RML_GUEST_LOW;
  auto mapped = StubCall(SYS_mmap, RML_GUEST_LOW, len, PROT_READ | PROT_WRITE | PROT_EXEC,
                         MAP_SHARED | MAP_FIXED_NOREPLACE, 0, RML_GUEST_LOW);
  if (!mapped.ok()) return mapped.status();
  if (static_cast<uint64_t>(*mapped) != RML_GUEST_LOW) {
    if (*mapped == -EPERM || *mapped == -EACCES) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "the process platform maps guest RAM from 0x%x, below vm.mmap_min_addr here",
          RML_GUEST_LOW));
    }
    return ErrnoStatus("stub: map guest RAM", static_cast<int>(-*mapped));
  }
  (void)StubCall(SYS_madvise, RML_GUEST_LOW, len, MADV_NOHUGEPAGE);
  if (auto r = call("close guest RAM's fd", SYS_close, 0); !r.ok()) return r.status();

  auto uffd = call("userfaultfd", SYS_userfaultfd, O_CLOEXEC | uapi::kUffdUserModeOnly);
  if (!uffd.ok()) return uffd.status();
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = uapi::kUffdFeatureWpAsync | uapi::kUffdFeatureWpUnpopulated;
  if (auto s = StubWrite(RML_STUB_DATA, &api, sizeof(api)); !s.ok()) return s;
  if (auto r = call("UFFDIO_API", SYS_ioctl, *uffd, UFFDIO_API, RML_STUB_DATA); !r.ok())
    return r.status();
  uffdio_register reg{};
  reg.range.start = RML_GUEST_LOW;
  reg.range.len = len;
  reg.mode = UFFDIO_REGISTER_MODE_WP;
  if (auto s = StubWrite(RML_STUB_DATA, &reg, sizeof(reg)); !s.ok()) return s;
  if (auto r = call("UFFDIO_REGISTER", SYS_ioctl, *uffd, UFFDIO_REGISTER, RML_STUB_DATA); !r.ok())
    return r.status();
  uffdio_writeprotect wp{};
  wp.range = reg.range;
  wp.mode = UFFDIO_WRITEPROTECT_MODE_WP;
  if (auto s = StubWrite(RML_STUB_DATA, &wp, sizeof(wp)); !s.ok()) return s;
  if (auto r = call("UFFDIO_WRITEPROTECT", SYS_ioctl, *uffd, UFFDIO_WRITEPROTECT, RML_STUB_DATA);
      !r.ok()) {
    return r.status();
  }
  // The registration lives as long as the userfaultfd: the monitor keeps it, the stub does not.
  long mine = Sys(SYS_pidfd_getfd, pidfd_.get(), *uffd, 0);
  if (mine < 0) return ErrnoStatus("pidfd_getfd of the stub's userfaultfd");
  uffd_ = Fd(static_cast<int>(mine));
  if (auto r = call("close the userfaultfd", SYS_close, *uffd); !r.ok()) return r.status();

  constexpr int kArchSetCpuid = 0x1012;  // ARCH_SET_CPUID: 0 makes CPUID fault
  auto cpuid = StubCall(SYS_arch_prctl, kArchSetCpuid, 0);
  if (!cpuid.ok()) return cpuid.status();
  cpuid_faulting_ = *cpuid == 0;

  // Last: a filter that admits no system call; any one the guest makes raises SIGSYS here.
  struct {
    sock_fprog prog;
    sock_filter insn;
  } filter{};
  filter.prog.len = 1;
  filter.prog.filter =
      reinterpret_cast<sock_filter*>(RML_STUB_DATA + offsetof(decltype(filter), insn));
  filter.insn = BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRAP);
  if (auto s = StubWrite(RML_STUB_DATA, &filter, sizeof(filter)); !s.ok()) return s;
  if (auto r = call("PR_SET_NO_NEW_PRIVS", SYS_prctl, PR_SET_NO_NEW_PRIVS, 1); !r.ok())
    return r.status();
  if (auto r = call("seccomp", SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, RML_STUB_DATA); !r.ok())
    return r.status();
  std::vector<uint8_t> zero(4096);
  return StubWrite(RML_STUB_DATA, zero.data(), zero.size());
}

absl::Status ProcessBackend::Create() {
  if (auto s = CheckProcessPlatform(); !s.ok()) return s;
  if (auto s = Spawn(); !s.ok()) return s;
  if (auto s = SetUpAddressSpace(); !s.ok()) return s;
  Fd pagemap(::open(absl::StrCat("/proc/", pid_, "/pagemap").c_str(), O_RDONLY | O_CLOEXEC));
  if (!pagemap.valid()) return ErrnoStatus("open the stub's pagemap");
  pagemap_ = std::move(pagemap);
  // The guest's registers start from the stub's as exec left them (user segments), zeroed.
  user_regs_struct r{};
  r.cs = regs_.cs;
  r.ss = regs_.ss;
  r.eflags = 0x202;
  r.orig_rax = ~0ull;
  regs_ = r;
  std::vector<uint8_t> xsave(kMaxXsaveBytes);
  iovec iov{xsave.data(), xsave.size()};
  if (::ptrace(PTRACE_GETREGSET, pid_, NT_X86_XSTATE, &iov) != 0) {
    return ErrnoStatus("PTRACE_GETREGSET(NT_X86_XSTATE)");
  }
  xsave_bytes_ = iov.iov_len;
  if (cpuid_faulting_) CaptureCpuid(&cpuid_);
  return absl::OkStatus();
}

absl::Status ProcessBackend::SetUpEntry(uint64_t entry) {
  if (auto s = OnTracer(); !s.ok()) return s;
  regs_.rip = entry;
  regs_.rsp = RML_STACK_TOP;
  return SetRegs(regs_);
}

bool ProcessBackend::EmulateCpuid(user_regs_struct& r) {
  if (!cpuid_faulting_ || r.rip < RML_GUEST_LOW || r.rip + 2 > memory_.size()) return false;
  const uint8_t* b = memory_.data() + r.rip;
  if (b[0] != 0x0f || b[1] != 0xa2) return false;
  uint32_t leaf = static_cast<uint32_t>(r.rax), sub = static_cast<uint32_t>(r.rcx);
  const pb::CpuidEntry* hit = nullptr;
  for (const pb::CpuidEntry& e : cpuid_.cpuid()) {
    if (e.function() == leaf && (e.index() == sub || (!hit && e.index() == 0))) hit = &e;
  }
  r.rax = hit ? hit->eax() : 0;
  r.rbx = hit ? hit->ebx() : 0;
  r.rcx = hit ? hit->ecx() : 0;
  r.rdx = hit ? hit->edx() : 0;
  r.rip += 2;
  return true;
}

absl::StatusOr<VcpuExit> ProcessBackend::Run() {
  if (auto s = OnTracer(); !s.ok()) return s;
  if (pid_ < 0) return absl::AbortedError("the guest's stub process is gone");
  if (advance_) {
    regs_.rip += advance_;
    advance_ = 0;
    if (::ptrace(PTRACE_POKEUSER, pid_, offsetof(user, regs.rip), regs_.rip) != 0) {
      return ErrnoStatus("PTRACE_POKEUSER(rip)");
    }
  }
  for (;;) {
    if (::ptrace(PTRACE_CONT, pid_, 0, 0) != 0) return ErrnoStatus("PTRACE_CONT");
    auto sig = WaitStop();
    if (!sig.ok()) return sig.status();
    if (auto s = GetRegs(&regs_); !s.ok()) return s;
    siginfo_t info{};
    if (*sig == SIGSEGV || *sig == SIGTRAP || *sig == SIGILL || *sig == SIGFPE || *sig == SIGSYS ||
        *sig == SIGBUS) {
      if (::ptrace(PTRACE_GETSIGINFO, pid_, 0, &info) != 0) return ErrnoStatus("PTRACE_GETSIGINFO");
    }
    VcpuExit e;
    e.rip = regs_.rip;
    e.kind = VcpuExit::Kind::kFault;
    auto addr = reinterpret_cast<uint64_t>(info.si_addr);
    switch (*sig) {
      case SIGSEGV:
        if (info.si_code == SI_KERNEL) {
          if (EmulateCpuid(regs_)) {
            if (auto s = SetRegs(regs_); !s.ok()) return s;
            continue;
          }
          uint32_t len = 0;
          e = DecodeGp(memory_, regs_, &len);
          if (e.kind == VcpuExit::Kind::kPortOut) advance_ = len;
          return e;
        }
        e.fault = absl::StrFormat("access outside guest RAM at 0x%x", addr);
        return e;
      case SIGTRAP:
        e.rip = regs_.rip - 1;  // int3 traps after itself
        e.fault = "breakpoint (int3)";
        return e;
      case SIGILL: {
        bool ud2 = regs_.rip >= RML_GUEST_LOW && regs_.rip + 2 <= memory_.size() &&
                   memory_.data()[regs_.rip] == 0x0f && memory_.data()[regs_.rip + 1] == 0x0b;
        e.fault = ud2 ? "invalid opcode (ud2)" : "invalid opcode";
        return e;
      }
      case SIGFPE:
        e.fault = info.si_code == FPE_INTDIV ? "divide error" : "floating-point exception";
        return e;
      case SIGSYS:
        e.rip = regs_.rip - 2;  // the syscall instruction
        e.fault = absl::StrCat("system call ", info.si_syscall, " (refused; guests make none)");
        return e;
      case SIGBUS:
        e.fault = absl::StrFormat("bus error at 0x%x", addr);
        return e;
      default:
        // The kick, or a signal meant for the monitor's process group: never delivered.
        return VcpuExit{};
    }
  }
}

absl::StatusOr<std::vector<PlatformMapping>> ProcessBackend::WatchMissingPages() {
  // The stub's userfaultfd, which already write-protects its mapping (the dirty log), catches
  // its missing pages too; the registration works on the stub's address space from here.
  uffdio_register reg{};
  reg.range.start = RML_GUEST_LOW;
  reg.range.len = memory_.size() - RML_GUEST_LOW;
  reg.mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP;
  if (auto s = Ioctl(uffd_.get(), UFFDIO_REGISTER, &reg,
                     "register the stub's guest RAM for "
                     "missing pages");
      !s.ok()) {
    return s;
  }
  Fd uffd(::fcntl(uffd_.get(), F_DUPFD_CLOEXEC, 0));
  if (!uffd.valid()) return ErrnoStatus("dup the stub's userfaultfd");
  std::vector<PlatformMapping> mappings;
  mappings.push_back({std::move(uffd), RML_GUEST_LOW, RML_GUEST_LOW / kPageSize});
  return mappings;
}

absl::StatusOr<DirtyBitmap> ProcessBackend::HarvestGuestDirty() {
  DirtyBitmap bitmap(memory_.pages());
  std::vector<uapi::PageRegion> regions(1024);
  uapi::PmScanArg arg{};
  arg.size = sizeof(arg);
  arg.flags = uapi::kPmScanWpMatching | uapi::kPmScanCheckWpAsync;
  arg.start = RML_GUEST_LOW;
  arg.end = memory_.size();
  arg.vec = reinterpret_cast<uint64_t>(regions.data());
  arg.vec_len = regions.size();
  arg.category_mask = uapi::kPageIsWritten;
  arg.return_mask = uapi::kPageIsWritten;
  while (arg.start < arg.end) {
    int n = 0;
    if (auto s = Ioctl(pagemap_.get(), uapi::kPagemapScan, &arg, "PAGEMAP_SCAN", &n); !s.ok())
      return s;
    for (int i = 0; i < n; i++) {
      for (uint64_t a = regions[i].start; a < regions[i].end && a < memory_.size(); a += kPageSize)
        bitmap.Set(a / kPageSize);
    }
    if (arg.walk_end <= arg.start) return absl::InternalError("PAGEMAP_SCAN made no progress");
    arg.start = arg.walk_end;
  }
  return bitmap;
}

absl::Status ProcessBackend::SaveCpu(pb::VmSnapshot* snap) {
  if (auto s = OnTracer(); !s.ok()) return s;
  if (advance_) return absl::InternalError("vCPU state captured in the middle of an `out`");
  pb::ProcessVcpuState* out = snap->add_vcpus()->mutable_process();
  if (auto s = GetRegs(&regs_); !s.ok()) return s;
  out->set_regs(std::string(reinterpret_cast<const char*>(&regs_), sizeof(regs_)));
  std::string xsave(xsave_bytes_, '\0');
  iovec iov{xsave.data(), xsave.size()};
  if (::ptrace(PTRACE_GETREGSET, pid_, NT_X86_XSTATE, &iov) != 0) {
    return ErrnoStatus("PTRACE_GETREGSET(NT_X86_XSTATE)");
  }
  xsave.resize(iov.iov_len);
  out->set_xsave(std::move(xsave));
  *out->mutable_cpuid() = cpuid_.cpuid();
  snap->set_tsc_khz(TscKhz());
  snap->set_platform(pb::PROCESS);
  return absl::OkStatus();
}

absl::Status ProcessBackend::RestoreCpu(const pb::VmSnapshot& snap) {
  if (auto s = OnTracer(); !s.ok()) return s;
  if (snap.vcpus_size() != 1 || !snap.vcpus(0).has_process()) {
    return absl::InvalidArgumentError("saved state holds no process-platform vCPU state");
  }
  const pb::ProcessVcpuState& in = snap.vcpus(0).process();
  if (in.regs().size() != sizeof(user_regs_struct)) {
    return absl::InvalidArgumentError(absl::StrCat("vCPU state: registers are ", in.regs().size(),
                                                   " bytes, expected ", sizeof(user_regs_struct)));
  }
  if (in.xsave().size() != xsave_bytes_) {
    return absl::FailedPreconditionError(absl::StrCat("vCPU state: the XSAVE area is ",
                                                      in.xsave().size(), " bytes; this CPU's is ",
                                                      xsave_bytes_, " (saved on a different CPU)"));
  }
  if (in.cpuid_size() > 4096)
    return absl::InvalidArgumentError("vCPU state: too many CPUID entries");
  user_regs_struct r;
  std::memcpy(&r, in.regs().data(), sizeof(r));
  r.cs = kUserCs;
  r.ss = kUserSs;
  r.orig_rax = ~0ull;
  if (auto s = SetRegs(r); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("vCPU state refused: ", s.message()));
  }
  std::string xsave = in.xsave();
  iovec iov{xsave.data(), xsave.size()};
  if (::ptrace(PTRACE_SETREGSET, pid_, NT_X86_XSTATE, &iov) != 0) {
    return ErrnoStatus("vCPU state refused: PTRACE_SETREGSET(NT_X86_XSTATE)");
  }
  regs_ = r;
  if (in.cpuid_size() > 0) *cpuid_.mutable_cpuid() = in.cpuid();
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckProcessPlatform() {
  static std::once_flag once;
  static absl::Status* result;
  std::call_once(once, [] {
    auto need = [](absl::string_view what) {
      utsname u{};
      ::uname(&u);
      return absl::FailedPreconditionError(
          absl::StrCat("the process platform needs Linux 6.7 or later (userfaultfd asynchronous "
                       "write-protect and PAGEMAP_SCAN); this kernel is ",
                       u.release, ": ", what));
    };
    absl::Status s;
    Fd uffd(static_cast<int>(Sys(SYS_userfaultfd, O_CLOEXEC | uapi::kUffdUserModeOnly)));
    uffdio_api api{};
    api.api = UFFD_API;
    api.features = uapi::kUffdFeatureWpAsync | uapi::kUffdFeatureWpUnpopulated;
    if (!uffd.valid()) {
      s = need(absl::StrCat("userfaultfd: ", std::strerror(errno)));
    } else if (::ioctl(uffd.get(), UFFDIO_API, &api) != 0) {
      s = need("UFFD_FEATURE_WP_ASYNC is not supported");
    } else {
      Fd pagemap(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
      uapi::PageRegion region;
      uapi::PmScanArg arg{};
      arg.size = sizeof(arg);
      arg.start = arg.end = 0x10000;
      arg.vec = reinterpret_cast<uint64_t>(&region);
      arg.vec_len = 1;
      if (!pagemap.valid() || ::ioctl(pagemap.get(), uapi::kPagemapScan, &arg) < 0) {
        s = need("PAGEMAP_SCAN is not supported");
      }
    }
    result = new absl::Status(s);
  });
  return *result;
}

absl::StatusOr<std::unique_ptr<Backend>> CreateProcessBackend(GuestMemory& memory) {
  auto backend = std::make_unique<ProcessBackend>(memory);
  if (auto s = backend->Create(); !s.ok()) return s;
  return backend;
}

}  // namespace romulus::vmm
