// What a guest can reach. On the process platform the guest shares a process with the stub: that
// process must hold nothing but the stub's two pages and guest RAM, no file descriptor, a seccomp
// filter and its tracer, and it must die with the monitor. On every platform a guest that faults
// stops with one line while its host keeps answering `romulus status`.
#include <dirent.h>
#include <signal.h>
#include <sys/stat.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cli/control.h"
#include "tests/test_util.h"
#include "vmm/process/stub_layout.h"
#include "vmm/vmm.h"

namespace romulus::containment_test {
namespace {

using testing::ReadFile;
using testing::TempDir;

// Child processes of `pid` (of any of its threads).
std::vector<pid_t> Children(pid_t pid) {
  std::vector<pid_t> out;
  std::string tasks = "/proc/" + std::to_string(pid) + "/task";
  DIR* d = ::opendir(tasks.c_str());
  if (!d) return out;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    std::istringstream in(ReadFile(tasks + "/" + e->d_name + "/children"));
    for (pid_t c; in >> c;) out.push_back(c);
  }
  ::closedir(d);
  return out;
}

// The process-platform stub among `pid`'s children (its executable is the stub's memfd).
pid_t FindStub(pid_t pid) {
  for (pid_t c : Children(pid)) {
    char link[256] = {};
    std::string exe = "/proc/" + std::to_string(c) + "/exe";
    if (::readlink(exe.c_str(), link, sizeof(link) - 1) > 0 &&
        std::string(link).find("romulus-stub") != std::string::npos) {
      return c;
    }
  }
  return -1;
}

TEST(ProcessPlatformStub, HoldsOnlyItsPagesAndGuestRamAndNoFiles) {
  if (auto s = vmm::CheckPlatform(pb::PROCESS); !s.ok()) {
    GTEST_SKIP() << "needs the process platform: " << s.message();
  }
  TempDir dir;
  auto vm = testing::BootTestVm(pb::PROCESS, dir, {.working_set_pages = 256, .write_rate = 1000});
  ASSERT_NE(vm, nullptr);
  ASSERT_TRUE(vm->Start().ok());
  ASSERT_TRUE(testing::WaitUntil([&] { return vm->guest_status().workload_pages > 100; }, 20));
  pid_t stub = FindStub(::getpid());
  ASSERT_GT(stub, 0) << "no stub process among this test's children";

  // The address space: the stub's code and data pages, guest RAM from 64 KiB up, and the
  // kernel's legacy vsyscall page (a fixed kernel mapping no process can unmap). Nothing else:
  // no stack, no vDSO, no heap, no library, nothing of the monitor's.
  std::istringstream maps(ReadFile("/proc/" + std::to_string(stub) + "/maps"));
  int lines = 0, ram = 0, stub_pages = 0;
  for (std::string line; std::getline(maps, line); lines++) {
    uint64_t start = 0, end = 0;
    ASSERT_EQ(std::sscanf(line.c_str(), "%lx-%lx", &start, &end), 2) << line;
    if (line.find("[vsyscall]") != std::string::npos) continue;
    if (start == RML_GUEST_LOW && end == vm->memory().size()) {
      ram++;
      EXPECT_NE(line.find("rwxs"), std::string::npos) << "guest RAM is shared: " << line;
      EXPECT_NE(line.find("romulus-guest-ram"), std::string::npos) << line;
      continue;
    }
    if (start >= RML_STUB_BASE && end <= RML_STUB_END) {
      stub_pages++;
      continue;
    }
    ADD_FAILURE() << "unexpected mapping in the stub: " << line;
  }
  EXPECT_EQ(ram, 1);
  EXPECT_GE(stub_pages, 1);
  EXPECT_GT(lines, 0);

  // No file descriptor at all: no socket, no key, no disk image.
  std::string fds = "/proc/" + std::to_string(stub) + "/fd";
  DIR* d = ::opendir(fds.c_str());
  ASSERT_NE(d, nullptr);
  std::vector<std::string> open_fds;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] != '.') open_fds.push_back(e->d_name);
  }
  ::closedir(d);
  EXPECT_TRUE(open_fds.empty()) << open_fds.size() << " open descriptors, first " << open_fds[0];

  // A seccomp filter, no new privileges, and this process as its tracer.
  EXPECT_EQ(testing::ProcStatusField(stub, "Seccomp"), "2");
  EXPECT_EQ(testing::ProcStatusField(stub, "NoNewPrivs"), "1");
  pid_t tracer = std::stoi(testing::ProcStatusField(stub, "TracerPid"));
  EXPECT_EQ(testing::ProcStatusField(tracer, "Tgid"), std::to_string(::getpid()));
  ASSERT_TRUE(vm->Stop().ok());
}

// A monitor killed with SIGKILL takes its stub with it (PR_SET_PDEATHSIG, PTRACE_O_EXITKILL):
// no guest runs on without the monitor that holds its outputs.
TEST(ProcessPlatformStub, DiesWithItsMonitor) {
  if (auto s = vmm::CheckPlatform(pb::PROCESS); !s.ok()) {
    GTEST_SKIP() << "needs the process platform: " << s.message();
  }
  TempDir dir;
  testing::Child monitor({"vm", "--platform", "process", "--disk", dir.File("disk.img"), "--memory",
                          "32M", "--ledger-port", "0", "--progress-ms", "0"});
  ASSERT_NE(monitor.WaitForLine("ledger listening on", 30), "");
  pid_t stub = -1;
  ASSERT_TRUE(testing::WaitUntil([&] { return (stub = FindStub(monitor.pid())) > 0; }, 10));
  monitor.Signal(SIGKILL);
  EXPECT_EQ(monitor.Wait(30), 137);
  // The stub was the monitor's child: once it is gone it is reaped by init, or a zombie only
  // for a moment.
  EXPECT_TRUE(testing::WaitUntil(
      [&] {
        std::string state = testing::ProcStatusField(stub, "State");
        return state.empty() || state[0] == 'Z';
      },
      10))
      << "the stub " << stub
      << " outlived its monitor: " << testing::ProcStatusField(stub, "State");
}

class VmContainment : public testing::PlatformTest {
 protected:
  // Runs `romulus primary` with `code` as its guest and expects it to report the stop in one
  // line and then to keep answering `romulus status` with that reason.
  void ExpectStopAndService(const std::string& code, const std::string& on_kvm,
                            const std::string& on_process) {
    const std::string& what = platform() == pb::KVM ? on_kvm : on_process;
    TempDir dir;
    std::ofstream(dir.File("guest.bin"), std::ios::binary) << testing::HandmadeImage(code);
    std::ofstream(dir.File("key")) << "containment-test-key-0123456789";
    std::ofstream(dir.File("p.conf"))
        << "vm_id: \"c\" memory_mib: 32 disk: \"" << dir.File("disk.img")
        << "\" disk_mib: 8 mirror: \"127.0.0.1:" << testing::FreePort() << "\" psk_file: \""
        << dir.File("key") << "\" run_unprotected: true ledger_port: " << testing::FreePort()
        << " control_socket: \"" << dir.File("p.sock") << "\" guest_image: \""
        << dir.File("guest.bin") << "\" platform: \"" << platform_name() << "\"\n";
    testing::Child primary({"primary", "--config", dir.File("p.conf")});
    std::string line = primary.WaitForLine("VM stopped: ", 30);
    EXPECT_NE(line.find("guest stopped: " + what), std::string::npos) << line;
    EXPECT_NE(line.find(" at rip=0x1000"), std::string::npos) << line;
    auto status = cli::QueryStatus(dir.File("p.sock"));
    ASSERT_TRUE(status.ok()) << status.status();
    EXPECT_NE(status->state().find("VM stopped: guest stopped: " + what), std::string::npos)
        << status->state();
    EXPECT_EQ(status->platform(), platform_name());
    primary.Signal(SIGTERM);
    EXPECT_EQ(primary.Wait(30), 0);
  }
};

TEST_P(VmContainment, ASystemCallStopsTheGuestAndTheHostServesOn) {
  // mov $39, %eax (getpid); syscall
  ExpectStopAndService(std::string("\xb8\x27\x00\x00\x00\x0f\x05", 7), "triple fault",
                       "system call 39");
}

TEST_P(VmContainment, AnAccessOutsideRamStopsTheGuestAndTheHostServesOn) {
  // mov %rax, 0x7ff0000 (beyond 32 MiB of RAM)
  ExpectStopAndService(std::string("\x48\x89\x04\x25\x00\x00\xff\x07", 8), "triple fault",
                       "access outside guest RAM at 0x7ff0000");
}

TEST_P(VmContainment, HltStopsTheGuestAndTheHostServesOn) {
  ExpectStopAndService("\xf4", "triple fault", "halt (hlt)");
}

TEST_P(VmContainment, Int3StopsTheGuestAndTheHostServesOn) {
  ExpectStopAndService("\xcc", "triple fault", "breakpoint (int3)");
}

TEST_P(VmContainment, Ud2StopsTheGuestAndTheHostServesOn) {
  ExpectStopAndService("\x0f\x0b", "triple fault", "invalid opcode (ud2)");
}

TEST_P(VmContainment, AnUnknownPortStopsTheGuestAndTheHostServesOn) {
  // mov $0x5f0, %dx; out %eax, (%dx). Under KVM the TSS's I/O bitmap refuses it (a #GP, so a
  // triple fault); the process platform sees the write itself.
  ExpectStopAndService(std::string("\x66\xba\xf0\x05\xef", 5), "triple fault",
                       "write to unknown port 0x5f0");
}

ROMULUS_ON_EVERY_PLATFORM(VmContainment);

}  // namespace
}  // namespace romulus::containment_test
