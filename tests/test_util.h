// Helpers shared by the tests: VM tests on every platform, temporary directories, a booted test VM,
// and child `romulus` processes whose output is read line by line with bounded waits.
#ifndef ROMULUS_TESTS_TEST_UTIL_H_
#define ROMULUS_TESTS_TEST_UTIL_H_

#include <gtest/gtest.h>
#include <sys/resource.h>

#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cli/local_hosts.h"
#include "cli/process.h"
#include "replicator/replicator.h"
#include "vmm/vmm.h"

namespace romulus::testing {

// The platforms a VM test runs on: every one this machine can run VMs on (its name ends in
// /kvm or /process). With none, a single instance (/none) that skips and says why.
std::vector<pb::Platform> TestPlatforms();
std::string PlatformTestName(const ::testing::TestParamInfo<pb::Platform>& info);

// A test that runs a VM, once per platform.
class PlatformTest : public ::testing::TestWithParam<pb::Platform> {
 protected:
  void SetUp() override;  // skips, saying why, when no platform can run VMs here
  pb::Platform platform() const { return GetParam(); }
  std::string platform_name() const { return std::string(vmm::PlatformName(GetParam())); }
  // LongRun(n) on the process platform, or on KVM where it is the only one; a fifth of that on
  // KVM beside the process platform. The long runs drive the epoch pipeline above the platform,
  // which is the same on both; of the platforms' own dirty tracking, the process platform's
  // (userfaultfd write-protection, ours) is the one a long run looks after, KVM's is the kernel's.
  int LongRunHere(int n) const;
};

#define ROMULUS_ON_EVERY_PLATFORM(Suite)                                             \
  INSTANTIATE_TEST_SUITE_P(Platforms, Suite,                                         \
                           ::testing::ValuesIn(::romulus::testing::TestPlatforms()), \
                           ::romulus::testing::PlatformTestName)

// A sanitizer build (ASan/UBSan or TSan): everything runs several times slower.
#ifdef ROMULUS_SANITIZED
inline constexpr bool kSanitized = true;
#else
inline constexpr bool kSanitized = false;
#endif

// The length of a long exactness run: a fifth of it in sanitizer builds. Their allocators map
// each large block afresh, and a fresh page costs a fault (about 13 us on a PVM guest), so a
// checkpoint's buffers cost far more there; the same code paths, and the memory and thread
// errors on them, are covered by fewer rounds.
constexpr int LongRun(int n) { return kSanitized ? (n / 5 > 0 ? n / 5 : 1) : n; }

// How fast a test VM writes: slower in sanitizer builds, where a checkpoint of a whole working
// set takes hundreds of milliseconds to cross. At the release build's rate every epoch there
// dirtied all of it, checkpoints piled up in flight and a hand-over waited out its drain (half
// its timeout) for nothing; at the lower one the mirror keeps up, and the same paths run with
// fewer pages in each checkpoint.
constexpr uint64_t WriteRate(uint64_t release, uint64_t sanitized) {
  return kSanitized ? sanitized : release;
}

// How much longer than in a release build on an idle machine a wait may take: sanitizer builds
// run several times slower, and a loaded machine slower still. Every time limit in the tests
// goes through it; ROMULUS_TEST_TIME_SCALE (a factor) overrides it.
double TimeScale();
inline std::chrono::steady_clock::duration Scaled(double seconds) {
  return std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(seconds * TimeScale()));
}

inline std::chrono::milliseconds ScaledMs(double seconds) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Scaled(seconds));
}

// Polls `pred` until it holds (true) or `seconds` (scaled) pass (false).
template <typename Pred>
bool WaitUntil(Pred pred, double seconds) {
  auto deadline = std::chrono::steady_clock::now() + Scaled(seconds);
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // polling a condition
  }
  return true;
}

// The digests of a primary's memory and disk at each checkpoint's pause, recorded by the
// engine's pause hook; a mirror's replica, read between two applies, must equal them for its
// committed epoch.
class PauseDigests {
 public:
  // Installs the pause hook on `engine`, which checkpoints `vm` (whose disk has `disk_bytes`).
  void Watch(checkpoint::EpochEngine& engine, vmm::CheckpointableVm& vm, uint64_t disk_bytes);
  // Fails the calling test unless the mirror's committed replica equals the primary's memory
  // and disk at that epoch's pause.
  void ExpectReplicaMatches(replicator::Mirror& mirror);

 private:
  std::mutex mu_;
  std::map<uint64_t, std::pair<uint64_t, uint64_t>> at_pause_;
};

// The whole file, or "" when it cannot be read.
std::string ReadFile(const std::string& path);

class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// A small VM (64 MiB, 8 MiB disk) with the reference guest on `platform`, not yet started.
std::unique_ptr<vmm::Vm> BootTestVm(pb::Platform platform, const TempDir& dir,
                                    vmm::WorkloadConfig workload = {});

// Lets `vm`'s guest run until it has done `pages` workload writes (at most `seconds`, scaled),
// then pauses it; fails the test if it did not get there.
void RunGuestUntil(vmm::Vm& vm, uint64_t pages, double seconds = 60);

// A guest image built by hand: the ABI header, then `code` at the entry point (0x100020);
// `image_end` (default: the end of the code) is where it says its bss ends.
std::string HandmadeImage(const std::string& code, uint64_t image_end = 0);

// A `romulus` child process (cli::Process) whose failed waits fail the calling test.
class Child {
 public:
  explicit Child(const std::vector<std::string>& args);
  // The next line that contains `needle`; "" (and a test failure) if none within `seconds`.
  std::string WaitForLine(const std::string& needle, double seconds);
  void Signal(int sig) { process_->Signal(sig); }
  pid_t pid() const { return process_->pid(); }
  // Waits up to `seconds` for exit; returns the exit code, or -1 on timeout.
  int Wait(double seconds);
  std::string output() const { return process_->output(); }

 private:
  std::unique_ptr<cli::Process> process_;
};

// `romulus vm --restore-from`: waits for its line naming the platform it runs on, which must be
// `platform` (the one that wrote the snapshot), and returns the line that says what it restored
// ("... restored DIR memory_xxh3=... workload_pages=..."); "" (and a test failure) if none.
std::string WaitForRestore(Child& vm, const std::string& platform, double seconds);

// The value of `key` in /proc/PID/status ("" if absent), e.g. "VmRSS" -> "12345 kB".
std::string ProcStatusField(pid_t pid, const std::string& key);

// Lowers another process's RLIMIT_NOFILE to its lowest free descriptor number, so that the next
// descriptor it opens fails with EMFILE, until Restore() or destruction puts the limit back.
class DescriptorLimit {
 public:
  explicit DescriptorLimit(pid_t pid);
  ~DescriptorLimit() { Restore(); }
  DescriptorLimit(const DescriptorLimit&) = delete;
  DescriptorLimit& operator=(const DescriptorLimit&) = delete;
  bool lowered() const { return lowered_; }
  void Restore();

 private:
  pid_t pid_;
  bool lowered_ = false;
  int limit_ = 0;
  struct rlimit saved_ {};
};

// A loopback port that was free a moment ago (for SOCK_STREAM or SOCK_DGRAM).
uint16_t FreePort(int type = 1 /* SOCK_STREAM */);

// A ledger request as a client sends it.
pb::LedgerRequest LedgerRequest(uint64_t client, uint64_t id, pb::LedgerOp op, uint32_t account = 0,
                                int64_t amount = 0);

// The value of `key=` in a `key=value ...` line ("" if absent).
std::string Field(const std::string& line, const std::string& key);
uint64_t UintField(const std::string& line, const std::string& key);
// The port at the end of "... ledger listening on HOST:PORT".
uint16_t ListeningPort(const std::string& line);

}  // namespace romulus::testing

#endif  // ROMULUS_TESTS_TEST_UTIL_H_
