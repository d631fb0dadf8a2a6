// cli::Process (child processes read line by line, every wait bounded) and cli::LocalHosts (the
// witness and two hosts `romulus demo` runs), on every platform.
#include "cli/process.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <filesystem>
#include <mutex>
#include <string>
#include <vector>

#include "cli/control.h"
#include "cli/local_hosts.h"
#include "tests/test_util.h"
#include "vmm/vmm.h"

namespace romulus::process_test {
namespace {

using std::chrono::milliseconds;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::unique_ptr<cli::Process> Shell(const std::string& script,
                                    cli::Process::LineFn echo = nullptr) {
  auto p = cli::Process::Start("/bin/sh", {"-c", script}, std::move(echo));
  EXPECT_TRUE(p.ok()) << p.status();
  return p.ok() ? std::move(*p) : nullptr;
}

TEST(Process, ReadsLinesInOrderAndReportsTheExitCode) {
  std::mutex mu;
  std::vector<std::string> echoed;
  auto p = Shell("echo one; echo two >&2; printf three; exit 3", [&](absl::string_view l) {
    std::lock_guard<std::mutex> lock(mu);
    echoed.emplace_back(l);
  });
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(*p->WaitForLine("tw", milliseconds(10000)), "two");
  // A line already passed is not found again; the last one needs no newline.
  auto passed = p->WaitForLine("one", milliseconds(10000));
  EXPECT_EQ(passed.status().code(), absl::StatusCode::kFailedPrecondition) << passed.status();
  EXPECT_EQ(p->Wait(milliseconds(10000)), 3);
  EXPECT_EQ(p->output(), "one\ntwo\nthree");
  std::lock_guard<std::mutex> lock(mu);
  EXPECT_THAT(echoed, ElementsAre("one", "two", "three"));
}

TEST(Process, WaitsAreBoundedAndAKillIsReported) {
  auto p = Shell("echo up; exec sleep 60");
  ASSERT_NE(p, nullptr);
  ASSERT_TRUE(p->WaitForLine("up", milliseconds(10000)).ok());
  EXPECT_EQ(p->WaitForLine("never", milliseconds(50)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(p->Wait(milliseconds(50)), std::nullopt);
  p->Signal(SIGKILL);
  EXPECT_EQ(p->Wait(milliseconds(10000)), 128 + SIGKILL);
}

// The child must not inherit this thread's blocked signals: the commands block SIGTERM to take it
// synchronously, and a host they start must still die of it.
TEST(Process, TheChildDoesNotInheritBlockedSignals) {
  sigset_t term, old;
  sigemptyset(&term);
  sigaddset(&term, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &term, &old);
  auto p = Shell("echo up; exec sleep 60");
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  ASSERT_NE(p, nullptr);
  ASSERT_TRUE(p->WaitForLine("up", milliseconds(10000)).ok());
  p->Signal(SIGTERM);
  EXPECT_EQ(p->Wait(milliseconds(10000)), 128 + SIGTERM);
}

TEST(Process, AProgramThatCannotRunExitsWith127) {
  auto p = cli::Process::Start("/nonexistent/romulus", {"status"});
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ((*p)->Wait(milliseconds(10000)), 127);
  EXPECT_THAT((*p)->output(), HasSubstr("exec failed"));
}

// A grandchild that keeps the output open (a fencing command left running) must not keep the
// destructor waiting for the end of the output.
TEST(Process, AGrandchildHoldingTheOutputDoesNotHoldUpTheEnd) {
  std::string grandchild;
  {
    auto p = Shell("sleep 60 & echo grandchild $!; exit 0");
    ASSERT_NE(p, nullptr);
    auto line = p->WaitForLine("grandchild", milliseconds(10000));
    ASSERT_TRUE(line.ok()) << line.status();
    grandchild = line->substr(line->find(' ') + 1);
    EXPECT_EQ(p->Wait(milliseconds(10000)), 0);
  }  // returns although the grandchild still holds the output
  ::kill(std::stoi(grandchild), SIGKILL);
}

// The hosts' key is random and readable by this user only.
void ExpectAPrivateKey(const testing::TempDir& dir) {
  auto key = std::filesystem::status(dir.File("key")).permissions();
  EXPECT_EQ(key, std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  EXPECT_GE(std::filesystem::file_size(dir.File("key")), 33u);
}

cli::LocalHosts::Options SmallHosts(const testing::TempDir& dir, const std::string& platform) {
  cli::LocalHosts::Options o{.binary = ROMULUS_BINARY,
                             .dir = dir.path(),
                             .memory_mib = 16,
                             .disk_mib = 4,
                             .working_set_pages = 256,
                             .wait = testing::ScaledMs(30)};
  o.platform = platform;
  return o;
}

// The witness, host b's mirror and host a's primary start from the configs LocalHosts writes,
// and run the VM on the platform asked for.
class VmLocalHosts : public testing::PlatformTest {};

TEST_P(VmLocalHosts, StartsTheWitnessAndBothHostsFromTheConfigsItWrites) {
  testing::TempDir dir;
  auto hosts = cli::LocalHosts::Start(SmallHosts(dir, platform_name()));
  ExpectAPrivateKey(dir);
  ASSERT_TRUE(hosts.ok()) << hosts.status();
  auto b = cli::QueryStatus((*hosts)->control_socket(cli::LocalHosts::kB));
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->role(), "mirror");
  EXPECT_EQ(b->platform(), platform_name());
  EXPECT_EQ(b->paths_size(), 2);
  auto a = cli::QueryStatus((*hosts)->control_socket(cli::LocalHosts::kA));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->role(), "primary");
  EXPECT_EQ(a->platform(), platform_name());
  EXPECT_TRUE(a->lease_held());
  EXPECT_GT(a->last_sync().wire_bytes(), 0u);
  EXPECT_TRUE((*hosts)->Stop().ok());
}

ROMULUS_ON_EVERY_PLATFORM(VmLocalHosts);

// On a platform that cannot run VMs here, host a stops at it, which it checks only after its
// config was accepted, and the error names the host and its reason. (Where every platform runs
// VMs there is nothing to try: the test skips.)
TEST(LocalHosts, AHostWhosePlatformCannotRunHereSaysWhy) {
  std::vector<pb::Platform> missing;
  for (pb::Platform p : {pb::KVM, pb::PROCESS}) {
    if (!vmm::CheckPlatform(p).ok()) missing.push_back(p);
  }
  if (missing.empty()) GTEST_SKIP() << "every platform runs VMs here";
  for (pb::Platform p : missing) {
    std::string name(vmm::PlatformName(p));
    SCOPED_TRACE(name);
    testing::TempDir dir;
    auto hosts = cli::LocalHosts::Start(SmallHosts(dir, name));
    ExpectAPrivateKey(dir);
    ASSERT_FALSE(hosts.ok());
    EXPECT_THAT(hosts.status().message(), HasSubstr("host a: "));
    EXPECT_THAT(hosts.status().message(), HasSubstr("it said last: romulus primary: "));
    EXPECT_THAT(hosts.status().message(), HasSubstr(std::string(vmm::CheckPlatform(p).message())));
  }
}

}  // namespace
}  // namespace romulus::process_test
