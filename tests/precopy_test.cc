// The checkpoint pipeline driven by a software VM (no KVM needed): pre-copy while memory keeps
// changing, then thousands of epochs, with the replica equal to the primary at every commit; a
// tampered or incomplete pre-copy stream never touches the replica.
#include <gtest/gtest.h>

#include <atomic>

#include "checkpoint/checkpoint.h"
#include "tests/soft_vm.h"
#include "tests/test_util.h"
#include "vmm/xxhash_dispatch.h"

namespace romulus::precopy_test {
namespace {

using checkpoint::Checkpoint;
using checkpoint::EpochEngine;
using checkpoint::PageRun;
using checkpoint::ReplicaStore;
using testing::SoftVm;
using testing::TempDir;

class PreCopy : public ::testing::Test {
 protected:
  PreCopy() {
    options_.writes_per_ms = 200;
    options_.disk_write_every = 50;
  }
  void SetUp() override {
    vm_ = SoftVm::Create(dir_.File("disk.img"), options_);
    ASSERT_NE(vm_, nullptr);
    engine_ = std::make_unique<EpochEngine>(*vm_, gate_, EpochEngine::Options{});
    engine_->SetPauseHook([this](const Checkpoint&) {
      at_pause_ = {vm_->memory().Digest(), *vmm::FileDigest(vm_->disk().fd(), kDisk)};
    });
    auto r = ReplicaStore::Create(kMemory, dir_.File("replica.img"), kDisk);
    ASSERT_TRUE(r.ok()) << r.status();
    replica_ = std::move(*r);
    ASSERT_TRUE(vm_->Start().ok());
  }

  // How a resynchronisation treats what the replica already holds.
  enum class Claims {
    kNone,         // every page travels
    kHonest,       // groups of 64 pages equal to the replica's are claimed, not sent
    kUnannounced,  // the replica takes a group as claimed that the primary then sends anyway
  };

  // Pre-copy into the replica's staging copy while the VM writes, as the replicator does; then
  // the full checkpoint. `tamper` may alter a run before it is staged. Returns Apply's status.
  absl::Status Synchronise(const std::function<void(PageRun&)>& tamper = nullptr,
                           Claims claims = Claims::kNone) {
    if (auto s = engine_->BeginSync(); !s.ok()) return s;
    const checkpoint::ReplicaTrees* replica_trees = nullptr;
    if (claims != Claims::kNone) {
      auto own = engine_->SyncTrees();
      auto theirs = replica_->CommittedTrees();
      if (!own.ok() || !theirs.ok()) return !own.ok() ? own.status() : theirs.status();
      replica_trees = *theirs;
      for (uint64_t i = 0; i < own->pages.width(1); i++) {
        bool same = own->pages.node(1, i) == (*theirs)->pages.node(1, i);
        if (claims == Claims::kUnannounced ? i != 0 : !same) continue;
        if (claims == Claims::kHonest) engine_->SkipSyncPages(own->pages, 1, i);
        auto s = replica_->StageSamePages(1, i, (*theirs)->pages.node(1, i));
        if (!s.ok()) return s;
        claimed_pages_ += 64;
      }
    }
    while (true) {
      auto chunk = engine_->NextSyncDisk();
      if (!chunk.ok()) return chunk.status();
      if (!chunk->has_value()) break;
      auto& c = **chunk;
      if (claims == Claims::kHonest &&
          c.hash == replica_trees->chunks.leaves()[c.offset / checkpoint::kDiskChunk]) {
        if (auto s = replica_->StageSameDisk(c.offset, c.data.size(), c.hash); !s.ok()) return s;
        same_chunks_++;
        continue;
      }
      if (auto s = replica_->StageSyncDisk(c.offset, c.data.size(), &c.data, c.hash); !s.ok())
        return s;
    }
    for (int round = 0; round < 4; round++) {
      for (PageRun run = engine_->NextSyncPages(256); !run.gfns.empty();
           run = engine_->NextSyncPages(256)) {
        if (tamper) tamper(run);
        if (auto s = replica_->StageSyncPages(run); !s.ok()) return s;
        staged_pages_ += run.gfns.size();
        if (round == 0) first_pass_pages_ += run.gfns.size();
      }
      auto left = engine_->RefreshSync();
      if (!left.ok()) return left.status();
      pending_after_rounds_ = *left;
    }
    auto full = engine_->TakeCheckpoint();
    if (!full.ok()) return full.status();
    EXPECT_TRUE((*full)->full);
    final_pages_ = (*full)->gfns.size();
    absl::Status s = replica_->Apply(**full);
    if (s.ok()) engine_->Acknowledge((*full)->epoch);
    return s;
  }
  // A first synchronisation, then `epochs` checkpoints applied and acknowledged.
  void SynchroniseThenEpochs(int epochs) {
    ASSERT_TRUE(Synchronise().ok());
    for (int i = 0; i < epochs; i++) {
      auto cp = engine_->TakeCheckpoint();
      ASSERT_TRUE(cp.ok());
      ASSERT_TRUE(replica_->Apply(**cp).ok());
      engine_->Acknowledge((*cp)->epoch);
    }
  }
  void ExpectReplicaEqualsPause(int epoch) {
    ASSERT_EQ(replica_->MemoryDigest(), at_pause_.first) << "epoch " << epoch;
    ASSERT_EQ(*replica_->DiskDigest(), at_pause_.second) << "epoch " << epoch;
  }

  static constexpr uint64_t kMemory = 16ull << 20, kDisk = 4ull << 20;
  SoftVm::Options options_;
  TempDir dir_;
  vmm::OutputGate gate_;
  std::unique_ptr<SoftVm> vm_;
  std::unique_ptr<EpochEngine> engine_;
  std::unique_ptr<ReplicaStore> replica_;
  std::pair<uint64_t, uint64_t> at_pause_;
  uint64_t staged_pages_ = 0, pending_after_rounds_ = 0, final_pages_ = 0, claimed_pages_ = 0,
           first_pass_pages_ = 0, same_chunks_ = 0;
};

TEST_F(PreCopy, ReplicaEqualsThePrimaryAtEveryCommitWhileMemoryChanges) {
  ASSERT_TRUE(Synchronise().ok());
  ExpectReplicaEqualsPause(0);
  // Every page went once in the first pass, and the VM wrote meanwhile, so some went again; the
  // full checkpoint's pause copied only what changed after the last round.
  EXPECT_GT(staged_pages_, kMemory / vmm::kPageSize);
  EXPECT_LT(final_pages_, kMemory / vmm::kPageSize / 4);
  uint64_t pages = 0, disk_writes = 0, writes_before = vm_->writes();
  const int epochs = testing::LongRun(2000);
  for (int epoch = 1; epoch <= epochs; epoch++) {
    auto cp = engine_->TakeCheckpoint();
    ASSERT_TRUE(cp.ok()) << cp.status();
    ASSERT_FALSE((*cp)->full);
    ASSERT_TRUE(replica_->Apply(**cp).ok());
    ExpectReplicaEqualsPause(epoch);
    engine_->Acknowledge((*cp)->epoch);
    pages += (*cp)->gfns.size();
    disk_writes += (*cp)->disk_writes.size();
  }
  EXPECT_EQ(replica_->committed_epoch(), epochs);
  EXPECT_GT(vm_->writes(), writes_before);  // the VM ran between the pauses
  EXPECT_GT(pages, static_cast<uint64_t>(epochs));
  EXPECT_GT(disk_writes, 10u);
}

TEST_F(PreCopy, AResynchronisationReplacesTheReplicaOnlyWhenComplete) {
  ASSERT_NO_FATAL_FAILURE(SynchroniseThenEpochs(20));
  uint64_t memory = replica_->MemoryDigest(), disk = *replica_->DiskDigest();
  int64_t epoch = replica_->committed_epoch();
  auto expect_unchanged = [&](const absl::Status& s, const char* what) {
    EXPECT_FALSE(s.ok()) << what;
    EXPECT_EQ(std::string(s.message()).find('\n'), std::string::npos) << what;
    EXPECT_EQ(replica_->committed_epoch(), epoch) << what;
    EXPECT_EQ(replica_->MemoryDigest(), memory) << what;
    EXPECT_EQ(*replica_->DiskDigest(), disk) << what;
  };

  // A page altered in transit, with a hash that matches the altered page: the stream digest
  // no longer matches the one the full checkpoint carries.
  engine_->Restart();
  replica_->ExpectFullCheckpoint();
  bool altered = false;
  expect_unchanged(Synchronise([&](PageRun& run) {
                     if (altered) return;
                     run.pages[100] ^= 1;
                     run.hashes[0] = XXH3_64bits(run.pages.data(), vmm::kPageSize);
                     altered = true;
                   }),
                   "altered page");
  ASSERT_TRUE(altered);

  // A batch lost in transit.
  engine_->Restart();
  bool dropped = false;
  expect_unchanged(Synchronise([&](PageRun& run) {
                     if (dropped || run.gfns.size() < 2) return;
                     run.gfns.resize(1), run.hashes.resize(1), run.pages.resize(vmm::kPageSize);
                     dropped = true;
                   }),
                   "dropped pages");

  // A page whose hash does not match is refused as it arrives.
  engine_->Restart();
  bool corrupted = false;
  expect_unchanged(Synchronise([&](PageRun& run) {
                     if (corrupted) return;
                     run.pages[5] ^= 0x80;
                     corrupted = true;
                   }),
                   "corrupted page");
  replica_->DiscardSync();

  // A disk chunk outside the disk, or not matching its hash.
  std::string chunk(checkpoint::kDiskChunk, 'x');
  uint64_t h = XXH3_64bits(chunk.data(), chunk.size());
  expect_unchanged(replica_->StageSyncDisk(kDisk, chunk.size(), &chunk, h), "chunk past the end");
  expect_unchanged(replica_->StageSyncDisk(0, chunk.size(), &chunk, h ^ 1), "chunk hash");
  expect_unchanged(replica_->StageSyncDisk(100, chunk.size(), &chunk, h), "unaligned chunk");
  replica_->DiscardSync();

  // A claim that pages equal the replica's that does not match the replica's tree, or names no
  // node of it, is refused as it arrives.
  auto trees = replica_->CommittedTrees();
  ASSERT_TRUE(trees.ok());
  uint64_t node = (*trees)->pages.node(1, 5);
  expect_unchanged(replica_->StageSamePages(1, 5, node ^ 1), "claim with another hash");
  expect_unchanged(replica_->StageSamePages(1, (*trees)->pages.width(1), node), "no such node");
  expect_unchanged(replica_->StageSamePages(9, 0, node), "no such level");
  replica_->DiscardSync();

  // Pages the replica takes as claimed that the primary never claimed: the stream digests
  // differ, so the full checkpoint is refused.
  engine_->Restart();
  expect_unchanged(Synchronise(nullptr, Claims::kUnannounced), "unannounced claim");

  // And a complete, genuine one replaces the replica.
  engine_->Restart();
  ASSERT_TRUE(Synchronise().ok());
  ExpectReplicaEqualsPause(-1);
  EXPECT_GT(replica_->committed_epoch(), epoch);
}

// Against a replica that holds an earlier state of the VM, whole groups of pages the VM has not
// written since are claimed instead of sent (and disk chunks flagged the same), and the result is
// still exactly the VM, disk writes during the synchronisation included.
// A disk write every 10 ms: some chunks stay the same as the replica's during a synchronisation,
// and some of the writes the full checkpoint carries fall into them.
class PreCopyQuietDisk : public PreCopy {
 protected:
  PreCopyQuietDisk() { options_.disk_write_every = 2000; }
};

TEST_F(PreCopyQuietDisk, PagesTheReplicaHoldsAreClaimedByTreeNodeAndNotSent) {
  ASSERT_NO_FATAL_FAILURE(SynchroniseThenEpochs(20));
  engine_->Restart();
  replica_->ExpectFullCheckpoint();
  first_pass_pages_ = 0;
  ASSERT_TRUE(Synchronise(nullptr, Claims::kHonest).ok());
  ExpectReplicaEqualsPause(-1);
  EXPECT_GT(same_chunks_, 0u);
  // Each page is either claimed or sent once by the first pass. The workload writes 8 groups of
  // 64 pages (its working set) and the first group (counters, block-device buffers) only.
  constexpr uint64_t kPages = kMemory / vmm::kPageSize;
  EXPECT_EQ(claimed_pages_ + first_pass_pages_, kPages);
  EXPECT_LE(first_pass_pages_, 9 * 64u);
}

TEST_F(PreCopy, WithoutPreCopyTheFullCheckpointCarriesEverything) {
  auto full = engine_->TakeCheckpoint();
  ASSERT_TRUE(full.ok());
  EXPECT_TRUE((*full)->full);
  EXPECT_EQ((*full)->gfns.size(), kMemory / vmm::kPageSize);
  ASSERT_TRUE(replica_->Apply(**full).ok());
  ExpectReplicaEqualsPause(0);
}

// A primary that lost its lease: the VM stops and stays stopped across checkpoints, and nothing
// leaves the gate even when the mirror acknowledges; both come back when the suspension ends.
TEST_F(PreCopy, ASuspendedEngineKeepsTheVmPausedAndReleasesNothing) {
  std::atomic<int> delivered{0};
  auto first = engine_->TakeCheckpoint();
  ASSERT_TRUE(first.ok()) << first.status();
  engine_->Acknowledge((*first)->epoch);
  ASSERT_TRUE(testing::WaitUntil([&] { return vm_->writes() > 1000; }, 10));

  ASSERT_TRUE(engine_->Suspend(true).ok());
  uint64_t frozen = vm_->writes(), digest = vm_->memory().Digest();
  for (int i = 0; i < 3; i++) gate_.Push([&] { ++delivered; });
  auto during = engine_->TakeCheckpoint();  // pauses and, suspended, does not resume
  ASSERT_TRUE(during.ok()) << during.status();
  engine_->Acknowledge((*during)->epoch);
  EXPECT_EQ(delivered.load(), 0);
  EXPECT_EQ(vm_->writes(), frozen);
  EXPECT_EQ(vm_->memory().Digest(), digest);

  ASSERT_TRUE(engine_->Suspend(false).ok());
  EXPECT_EQ(delivered.load(), 3);  // acknowledged while suspended: they leave now
  ASSERT_TRUE(testing::WaitUntil([&] { return vm_->writes() > frozen + 1000; }, 10));
}

}  // namespace
}  // namespace romulus::precopy_test
