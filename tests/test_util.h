// Helpers shared by the tests: skipping without KVM, temporary directories, a booted test VM,
// and child `romulus` processes whose output is read line by line with bounded waits.
#ifndef ROMULUS_TESTS_TEST_UTIL_H_
#define ROMULUS_TESTS_TEST_UTIL_H_

#include <gtest/gtest.h>

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

// Skips the calling test, with the reason, when this machine cannot run KVM VMs.
#define ROMULUS_REQUIRE_KVM()                                             \
  do {                                                                    \
    if (auto kvm_status = ::romulus::vmm::CheckKvm(); !kvm_status.ok()) { \
      GTEST_SKIP() << "needs /dev/kvm: " << kvm_status.message();         \
    }                                                                     \
  } while (0)

// The length of a long exactness run: a fifth of it in sanitizer builds. Their allocators map
// each large block afresh, and a fresh page costs a fault (about 13 us on a PVM guest), so a
// checkpoint's buffers cost far more there; the same code paths, and the memory and thread
// errors on them, are covered by fewer rounds.
constexpr int LongRun(int n) {
#ifdef ROMULUS_SANITIZED
  return n / 5 > 0 ? n / 5 : 1;
#else
  return n;
#endif
}

// Polls `pred` until it holds (true) or `seconds` pass (false).
template <typename Pred>
bool WaitUntil(Pred pred, double seconds) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
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

class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// A small VM (64 MiB, 8 MiB disk) with the reference guest, not yet started.
std::unique_ptr<vmm::Vm> BootTestVm(const TempDir& dir, vmm::WorkloadConfig workload = {});

// A `romulus` child process (cli::Process) whose failed waits fail the calling test.
class Child {
 public:
  explicit Child(const std::vector<std::string>& args);
  // The next line that contains `needle`; "" (and a test failure) if none within `seconds`.
  std::string WaitForLine(const std::string& needle, double seconds);
  void Signal(int sig) { process_->Signal(sig); }
  // Waits up to `seconds` for exit; returns the exit code, or -1 on timeout.
  int Wait(double seconds);
  std::string output() const { return process_->output(); }

 private:
  std::unique_ptr<cli::Process> process_;
};

// A loopback port that was free a moment ago (for SOCK_STREAM or SOCK_DGRAM).
uint16_t FreePort(int type = 1 /* SOCK_STREAM */);

// The value of `key=` in a `key=value ...` line ("" if absent).
std::string Field(const std::string& line, const std::string& key);
uint64_t UintField(const std::string& line, const std::string& key);
// The port at the end of "... ledger listening on HOST:PORT".
uint16_t ListeningPort(const std::string& line);

}  // namespace romulus::testing

#endif  // ROMULUS_TESTS_TEST_UTIL_H_
