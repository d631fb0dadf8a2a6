// The mirror's disk fails (a real full filesystem: a small tmpfs the test mounts, as root): a
// commit is all or nothing, the replica stays the last committed checkpoint and promotable, the
// primary says why the mirror refused; a snapshot that does not fit leaves no partial files, and
// what earlier saves left behind is removed at the next one.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mount.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "replicator/replicator.h"
#include "tests/soft_vm.h"
#include "tests/test_util.h"

namespace romulus::replica_disk_test {
namespace {

using testing::SoftVm;
using testing::TempDir;
using testing::WaitUntil;
constexpr uint64_t kMemory = 16ull << 20, kDisk = 4ull << 20;
const char kKey[] = "0123456789abcdef-disk-key";

// A software VM that writes a word a millisecond, and a disk sector every `disk_write_every`.
SoftVm::Options Quiet(uint64_t disk_write_every) {
  SoftVm::Options o;
  o.memory_bytes = kMemory;
  o.disk_bytes = kDisk;
  o.writes_per_ms = 1;
  o.disk_write_every = disk_write_every;
  return o;
}

// A tmpfs of `bytes` mounted at `path` for the test's life; why() says why not, when not.
class SmallTmpfs {
 public:
  SmallTmpfs(const std::string& path, uint64_t bytes) : path_(path) {
    if (::geteuid() != 0) {
      why_ = "mounting a small tmpfs (a real full filesystem) needs root";
      return;
    }
    std::filesystem::create_directories(path);
    std::string size = "size=" + std::to_string(bytes);
    if (::mount("romulus-test", path.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, size.c_str()) != 0) {
      why_ = std::string("cannot mount a tmpfs: ") + std::strerror(errno);
      return;
    }
    mounted_ = true;
  }
  ~SmallTmpfs() {
    if (mounted_) ::umount2(path_.c_str(), MNT_DETACH);
  }
  const std::string& why() const { return why_; }
  // Writes a file until the filesystem has no room left; returns the bytes written.
  uint64_t Fill() {
    int fd = ::open((path_ + "/filler").c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) return 0;
    std::string block(64 << 10, 'f');
    uint64_t written = 0;
    for (size_t size : {size_t{64} << 10, size_t{4096}, size_t{512}, size_t{1}}) {
      for (;;) {
        ssize_t n = ::write(fd, block.data(), size);
        if (n <= 0) break;
        written += static_cast<uint64_t>(n);
      }
    }
    ::close(fd);
    return written;
  }

 private:
  std::string path_, why_;
  bool mounted_ = false;
};

// The primary's memory, disk and state at each checkpoint's pause, by epoch.
class AtPause {
 public:
  void Watch(checkpoint::EpochEngine& engine, vmm::CheckpointableVm& vm) {
    engine.SetPauseHook([this, &vm](const checkpoint::Checkpoint& c) {
      auto entry = std::make_tuple(vm.memory().Digest(), *vmm::FileDigest(vm.disk().fd(), kDisk),
                                   c.state.SerializeAsString());
      std::lock_guard<std::mutex> lock(mu_);
      at_[c.epoch] = std::move(entry);
    });
  }
  // Fails the calling test unless `r` is exactly the primary's checkpoint at its committed epoch.
  void ExpectReplicaIsCheckpoint(checkpoint::ReplicaStore& r) {
    ASSERT_GE(r.committed_epoch(), 0);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = at_.find(static_cast<uint64_t>(r.committed_epoch()));
    ASSERT_NE(it, at_.end());
    auto [memory, disk, state] = it->second;
    EXPECT_EQ(r.MemoryDigest(), memory) << "memory, epoch " << r.committed_epoch();
    EXPECT_EQ(*r.DiskDigest(), disk) << "disk, epoch " << r.committed_epoch();
    EXPECT_EQ(r.committed_state().SerializeAsString(), state)
        << "state, epoch " << r.committed_epoch();
  }

 private:
  std::mutex mu_;
  std::map<uint64_t, std::tuple<uint64_t, uint64_t, std::string>> at_;
};

// The mirror's replica disk (sparse, as a synchronisation of a mostly empty disk leaves it)
// fills up while the primary streams epochs whose disk writes land in its holes. The commit
// that hits the full disk leaves the replica exactly the checkpoint before it (memory, disk,
// state) and promotable; the mirror says why and so does the primary's status.
TEST(ReplicaDiskFull, ACommitThatHitsAFullDiskLeavesTheLastCheckpointAndThePrimaryKnowsWhy) {
  TempDir dir;
  SmallTmpfs fs(dir.File("small"), 8ull << 20);
  if (!fs.why().empty()) GTEST_SKIP() << fs.why();
  vmm::OutputGate gate;
  SoftVm::Options o;
  o.memory_bytes = kMemory;
  o.disk_bytes = kDisk;
  o.working_set_pages = 512;
  o.writes_per_ms = testing::WriteRate(20, 2);
  o.disk_write_every = 10;  // most epochs write the disk
  auto vm = SoftVm::Create(dir.File("disk.img"), o);
  ASSERT_NE(vm, nullptr);
  checkpoint::EpochEngine engine(*vm, gate, {});
  AtPause at_pause;
  at_pause.Watch(engine, *vm);
  ASSERT_TRUE(vm->Start().ok());

  std::mutex mu;
  std::string logs;
  auto note = [&](const char* who) {
    return [&, who](absl::string_view line) {
      std::lock_guard<std::mutex> lock(mu);
      absl::StrAppend(&logs, who, ": ", line, "\n");
    };
  };
  auto Logs = [&] {
    std::lock_guard<std::mutex> lock(mu);
    return logs;
  };
  auto replica = checkpoint::ReplicaStore::Create(kMemory, dir.File("small/replica.img"), kDisk);
  ASSERT_TRUE(replica.ok()) << replica.status();
  auto mirror = replicator::Mirror::Start(
      **replica, {.identity = {"disk-vm", kMemory, kDisk}, .key = kKey, .log = note("mirror")});
  ASSERT_TRUE(mirror.ok()) << mirror.status();
  auto primary = replicator::Primary::Start(engine, gate,
                                            {.identity = {"disk-vm", kMemory, kDisk},
                                             .key = kKey,
                                             .mirror_port = (*mirror)->port(),
                                             .epoch = std::chrono::milliseconds(10),
                                             .log = note("primary")});
  ASSERT_TRUE(primary.ok()) << primary.status();
  ASSERT_TRUE(WaitUntil([&] { return (*mirror)->stats().committed_epoch >= 20; }, 60)) << Logs();

  ASSERT_GT(fs.Fill(), 0u);
  auto full = [&] {
    return (*primary)->stats().state.find("the replica disk is full") != std::string::npos;
  };
  ASSERT_TRUE(WaitUntil(full, 60)) << (*primary)->stats().state << "\n" << Logs();
  std::string state = (*primary)->stats().state;
  primary->reset();  // nothing more reaches the replica
  EXPECT_NE(state.find("mirror refused: "), std::string::npos) << state;
  EXPECT_NE(state.find("No space left on device"), std::string::npos) << state;
  EXPECT_EQ(state.find("Broken pipe"), std::string::npos) << state;
  std::string all = Logs();
  EXPECT_NE(all.find("primary: mirror lost, outputs held: mirror refused: checkpoint "),
            std::string::npos)
      << all;
  EXPECT_NE(all.find("not committed: the replica disk is full"), std::string::npos) << all;

  auto stats = (*mirror)->stats();
  EXPECT_TRUE(stats.unusable.empty()) << stats.unusable;
  EXPECT_GE(stats.committed_epoch, 20);
  (*mirror)->WithReplica([&](checkpoint::ReplicaStore& r) {
    EXPECT_EQ(r.committed_epoch(), stats.committed_epoch);
    EXPECT_TRUE(r.unusable().empty());
    at_pause.ExpectReplicaIsCheckpoint(r);
    EXPECT_TRUE(r.TakeCommitted().ok());  // promotable: the replica resumes as it stands
  });
  mirror->reset();
}

// A checkpoint whose first disk write fits (over blocks the image holds) and whose second does
// not (into a hole of the image, on a full filesystem): the first is taken back, and the replica
// is the checkpoint before, on disk as in memory, and takes the next checkpoint once there is
// room again.
TEST(ReplicaDiskFull, AWriteThatFitsIsTakenBackWhenALaterOneDoesNot) {
  TempDir dir;
  SmallTmpfs fs(dir.File("small"), 16ull << 20);
  if (!fs.why().empty()) GTEST_SKIP() << fs.why();
  vmm::OutputGate gate;
  auto vm = SoftVm::Create(dir.File("disk.img"), Quiet(0));
  ASSERT_NE(vm, nullptr);
  checkpoint::EpochEngine engine(*vm, gate, {});
  AtPause at_pause;
  at_pause.Watch(engine, *vm);
  ASSERT_TRUE(vm->Start().ok());
  auto replica = checkpoint::ReplicaStore::Create(kMemory, dir.File("small/replica.img"), kDisk);
  ASSERT_TRUE(replica.ok()) << replica.status();
  checkpoint::ReplicaStore& r = **replica;
  auto full = engine.TakeCheckpoint();  // the whole disk: every block of the image is held
  ASSERT_TRUE(full.ok()) << full.status();
  ASSERT_TRUE(r.Apply(**full).ok());
  // The disk's last 64 KiB is zero at the VM: a hole in the image holds the same.
  int fd = ::open(r.disk_path().c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(
      ::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, kDisk - (64 << 10), 64 << 10), 0)
      << std::strerror(errno);
  ::close(fd);
  at_pause.ExpectReplicaIsCheckpoint(r);
  uint64_t filled = fs.Fill();
  ASSERT_GT(filled, 0u);

  checkpoint::Checkpoint next;
  next.epoch = (*full)->epoch + 1;
  next.state = r.committed_state();
  next.disk_writes.push_back({0, std::string(4096, 'a')});
  next.disk_writes.push_back({kDisk / 512 - 8, std::string(4096, 'b')});
  next.digest = checkpoint::CheckpointDigest(next);
  absl::Status s = r.Apply(next);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_NE(s.message().find("checkpoint " + std::to_string(next.epoch) +
                             " not committed: the replica disk is full"),
            std::string::npos)
      << s;
  EXPECT_NE(s.message().find("the replica stays at epoch " + std::to_string((*full)->epoch)),
            std::string::npos)
      << s;
  EXPECT_TRUE(r.unusable().empty());
  EXPECT_EQ(r.committed_epoch(), static_cast<int64_t>((*full)->epoch));
  at_pause.ExpectReplicaIsCheckpoint(r);

  ASSERT_EQ(::unlink(dir.File("small/filler").c_str()), 0);
  ASSERT_TRUE(r.Apply(next).ok());  // the same checkpoint, now that it fits
  EXPECT_EQ(r.committed_epoch(), static_cast<int64_t>(next.epoch));
}

// What `dir` holds named `name` or `name`.*, sorted.
std::vector<std::string> Named(const std::string& dir, const std::string& name) {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    std::string n = e.path().filename().string();
    if (n == name || n.rfind(name + ".", 0) == 0) names.push_back(n);
  }
  std::sort(names.begin(), names.end());
  return names;
}

// A process ID that no process has now.
pid_t DeadPid() {
  for (pid_t pid = 4000000;; pid--) {
    if (::kill(pid, 0) != 0 && errno == ESRCH) return pid;
  }
}

class ReplicaSnapshot : public ::testing::Test {
 protected:
  void SetUp() override {
    vm_ = SoftVm::Create(dir_.File("disk.img"), Quiet(100));
    ASSERT_NE(vm_, nullptr);
    engine_ =
        std::make_unique<checkpoint::EpochEngine>(*vm_, gate_, checkpoint::EpochEngine::Options{});
    ASSERT_TRUE(vm_->Start().ok());
    auto r = checkpoint::ReplicaStore::Create(kMemory, dir_.File("replica.img"), kDisk);
    ASSERT_TRUE(r.ok()) << r.status();
    replica_ = std::move(*r);
    auto cp = engine_->TakeCheckpoint();
    ASSERT_TRUE(cp.ok()) << cp.status();
    ASSERT_TRUE(replica_->Apply(**cp).ok());
  }

  TempDir dir_;
  vmm::OutputGate gate_;
  std::unique_ptr<SoftVm> vm_;
  std::unique_ptr<checkpoint::EpochEngine> engine_;
  std::unique_ptr<checkpoint::ReplicaStore> replica_;
};

// The snapshot (16 MiB of memory, 4 MiB of disk) does not fit the 8 MiB filesystem: the save
// fails saying so, and leaves nothing of itself; a snapshot saved before it is still there.
TEST_F(ReplicaSnapshot, ASaveThatDoesNotFitLeavesNoPartialFiles) {
  SmallTmpfs fs(dir_.File("small"), 8ull << 20);
  if (!fs.why().empty()) GTEST_SKIP() << fs.why();
  std::string snap = dir_.File("small/snap");
  std::filesystem::create_directories(snap);  // the "previous snapshot"
  std::ofstream(snap + "/state.pb") << "previous";
  auto info = replica_->SaveSnapshot(snap);
  ASSERT_FALSE(info.ok());
  EXPECT_NE(info.status().message().find("No space left on device"), std::string::npos)
      << info.status();
  EXPECT_EQ(Named(dir_.File("small"), "snap"), std::vector<std::string>{"snap"});
  EXPECT_EQ(testing::ReadFile(snap + "/state.pb"), "previous");
}

// DIR.tmp-PID of a process that is gone is what a save that crashed left: the next save removes
// it. The same name with the PID of a process that runs, and other names, are left alone.
TEST_F(ReplicaSnapshot, WhatASaveThatCrashedLeftIsRemovedAtTheNext) {
  std::string snap = dir_.File("snap");
  std::string dead = "snap.tmp-" + std::to_string(DeadPid());
  std::string running = "snap.tmp-" + std::to_string(::getppid());
  for (const std::string& name : {dead, running, std::string("snap.tmp-x1"),
                                  std::string("snapshot.tmp-1"), std::string("other.tmp-1")}) {
    std::filesystem::create_directories(dir_.File(name));
    std::ofstream(dir_.File(name + "/memory.bin")) << "partial";
  }
  auto info = replica_->SaveSnapshot(snap);
  ASSERT_TRUE(info.ok()) << info.status();
  std::vector<std::string> expected = {"snap", "snap.tmp-x1", running};
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(Named(dir_.path(), "snap"), (std::vector<std::string>{expected}));
  EXPECT_TRUE(std::filesystem::exists(dir_.File("snapshot.tmp-1")));
  EXPECT_TRUE(std::filesystem::exists(dir_.File("other.tmp-1")));
}

}  // namespace
}  // namespace romulus::replica_disk_test
