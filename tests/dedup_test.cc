// Pages are sent once per content, not once per address: a page whose content the mirror holds
// (an earlier page of the stream, or a page of a base image both hosts read) travels as a
// reference. Over loopback: a guest of duplicated pages synchronises in about half its bytes, an
// epoch that copies held content sends references, a fresh mirror of a guest close to a shared
// base image receives a few percent of memory. Against a mirror session: a forged, stale,
// mismatched or malformed reference is refused and the replica stays as it was.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>

#include "replicator/mirror_session.h"
#include "replicator/replicator.h"
#include "tests/soft_vm.h"
#include "tests/test_util.h"
#include "vmm/xxhash_dispatch.h"

namespace romulus::dedup_test {
namespace {

using testing::SoftVm;
using testing::TempDir;
using testing::WaitUntil;
constexpr uint64_t kMemory = 16ull << 20, kDisk = 1ull << 20;
constexpr uint64_t kPages = kMemory / vmm::kPageSize;
const char kKey[] = "0123456789abcdef-dedup-key";

// Page contents no two alike: `page` numbers them.
std::vector<uint8_t> DistinctPage(uint64_t page, uint64_t salt = 0) {
  std::vector<uint8_t> p(vmm::kPageSize);
  uint64_t x = (page + 1) * 0x9e3779b97f4a7c15ull ^ salt;
  for (size_t i = 0; i < p.size(); i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(p.data() + i, &x, 8);
  }
  return p;
}

uint64_t NonZeroBytes(const vmm::GuestMemory& m) {
  uint64_t n = 0;
  std::vector<uint8_t> zero(vmm::kPageSize, 0);
  for (uint64_t g = 0; g < m.pages(); g++) {
    if (std::memcmp(m.data() + g * vmm::kPageSize, zero.data(), vmm::kPageSize) != 0) {
      n += vmm::kPageSize;
    }
  }
  return n;
}

class DedupReplication : public ::testing::Test {
 protected:
  // A VM that does not write on its own (the test writes for it), so that what crosses the wire
  // is what the test put in memory.
  void CreateVm(const std::function<void(vmm::GuestMemory&)>& fill) {
    SoftVm::Options o;
    o.memory_bytes = kMemory;
    o.disk_bytes = kDisk;
    o.writes_per_ms = 0;
    o.disk_write_every = 0;
    vm_ = SoftVm::Create(dir_.File("disk.img"), o);
    ASSERT_NE(vm_, nullptr);
    fill(vm_->memory());
    engine_ =
        std::make_unique<checkpoint::EpochEngine>(*vm_, gate_, checkpoint::EpochEngine::Options{});
    pauses_.Watch(*engine_, *vm_, kDisk);
    ASSERT_TRUE(vm_->Start().ok());
  }
  void TearDown() override {
    primary_.reset();
    mirror_.reset();
    engine_.reset();
    vm_.reset();
  }
  // A mirror on `port` (0: any), with a new, empty replica unless `keep_replica`.
  void StartMirror(std::shared_ptr<const checkpoint::BaseImage> base = nullptr, uint16_t port = 0,
                   bool keep_replica = false) {
    if (!keep_replica) {
      auto r = checkpoint::ReplicaStore::Create(kMemory, dir_.File("replica.img"), kDisk);
      ASSERT_TRUE(r.ok());
      replica_ = std::move(*r);
    }
    auto m =
        replicator::Mirror::Start(*replica_, {.identity = {"dedup-vm", kMemory, kDisk},
                                              .key = kKey,
                                              .port = port,
                                              .base_image = std::move(base),
                                              .log = [this](absl::string_view l) { Note(l); }});
    ASSERT_TRUE(m.ok()) << m.status();
    mirror_ = std::move(*m);
  }
  void StartPrimary(std::shared_ptr<const checkpoint::BaseImage> base = nullptr) {
    auto p = replicator::Primary::Start(*engine_, gate_,
                                        {.identity = {"dedup-vm", kMemory, kDisk},
                                         .key = kKey,
                                         .mirror_port = mirror_->port(),
                                         .epoch = std::chrono::milliseconds(10),
                                         .compression = pb::COMPRESSION_NONE,
                                         .base_image = std::move(base),
                                         .log = [this](absl::string_view l) { Note(l); }});
    ASSERT_TRUE(p.ok()) << p.status();
    primary_ = std::move(*p);
  }
  bool Protected() { return primary_->stats().state.find("protected") != std::string::npos; }
  void Note(absl::string_view line) {
    std::lock_guard<std::mutex> lock(mu_);
    log_ += std::string(line) + "\n";
  }
  std::string Logs() {
    std::lock_guard<std::mutex> lock(mu_);
    return log_;
  }

  TempDir dir_;
  vmm::OutputGate gate_;
  std::unique_ptr<SoftVm> vm_;
  std::unique_ptr<checkpoint::EpochEngine> engine_;
  std::unique_ptr<checkpoint::ReplicaStore> replica_;
  std::unique_ptr<replicator::Mirror> mirror_;
  std::unique_ptr<replicator::Primary> primary_;
  testing::PauseDigests pauses_;
  std::mutex mu_;
  std::string log_;
};

// Half of the guest's pages repeat the other half: each content crosses the wire once.
TEST_F(DedupReplication, AGuestOfDuplicatedPagesSynchronisesInAboutHalfItsBytes) {
  CreateVm([](vmm::GuestMemory& m) {
    for (uint64_t g = 1; g < kPages / 2; g++) {
      m.Write(g * vmm::kPageSize, DistinctPage(g).data(), vmm::kPageSize);
    }
    for (uint64_t g = kPages / 2; g < kPages; g++) {
      m.Write(g * vmm::kPageSize, DistinctPage(g - kPages / 2 + 1).data(), vmm::kPageSize);
    }
  });
  uint64_t nonzero = NonZeroBytes(vm_->memory());
  StartMirror();
  StartPrimary();
  ASSERT_TRUE(WaitUntil([&] { return Protected(); }, 60)) << Logs();
  auto stats = primary_->stats();
  double ratio = static_cast<double>(stats.bytes_sent) / static_cast<double>(nonzero);
  std::printf(
      "duplicated guest: %llu bytes on the wire for %llu non-zero bytes (ratio %.3f), "
      "%llu pages as references\n",
      static_cast<unsigned long long>(stats.bytes_sent), static_cast<unsigned long long>(nonzero),
      ratio, static_cast<unsigned long long>(stats.sync.deduplicated_pages));
  EXPECT_LE(ratio, 0.55) << Logs();
  EXPECT_GE(stats.sync.deduplicated_pages, kPages / 2 - 1);
  EXPECT_EQ(stats.sync.base_pages, 0u);
  ASSERT_TRUE(WaitUntil([&] { return mirror_->stats().committed_epoch >= 3; }, 30)) << Logs();
  pauses_.ExpectReplicaMatches(*mirror_);
  EXPECT_EQ(mirror_->stats().rejected, 0u);
}

// An epoch whose dirty pages copy content the mirror holds sends references for them.
TEST_F(DedupReplication, AnEpochThatCopiesHeldContentSendsReferences) {
  CreateVm([](vmm::GuestMemory& m) {
    for (uint64_t g = 1; g < kPages; g++) {
      m.Write(g * vmm::kPageSize, DistinctPage(g).data(), vmm::kPageSize);
    }
  });
  StartMirror();
  StartPrimary();
  ASSERT_TRUE(WaitUntil([&] { return Protected(); }, 60)) << Logs();
  auto before = primary_->stats().wire;
  constexpr uint64_t kCopies = 200;
  for (uint64_t i = 0; i < kCopies; i++) {
    // Page 2000+i takes the content of page 1+i (which the mirror holds there).
    vm_->WriteAsGuest((2000 + i) * vmm::kPageSize, DistinctPage(1 + i).data(), vmm::kPageSize);
  }
  ASSERT_TRUE(WaitUntil(
      [&] {
        return primary_->stats().wire.deduplicated_pages >= before.deduplicated_pages + kCopies;
      },
      30))
      << Logs();
  auto after = primary_->stats().wire;
  std::printf("epochs copying %llu held pages: %llu page bytes, %llu reference bytes sent\n",
              static_cast<unsigned long long>(kCopies),
              static_cast<unsigned long long>(after.pages - before.pages),
              static_cast<unsigned long long>(after.references - before.references));
  EXPECT_EQ(after.pages - before.pages, 0u);  // no page went as bytes
  uint64_t epoch = static_cast<uint64_t>(engine_->stats().epochs);
  ASSERT_TRUE(WaitUntil([&] { return mirror_->stats().committed_epoch >= int64_t(epoch); }, 30))
      << Logs();
  pauses_.ExpectReplicaMatches(*mirror_);
  mirror_->WithReplica([&](checkpoint::ReplicaStore& r) {
    EXPECT_EQ(std::memcmp(r.memory().data() + 2000 * vmm::kPageSize, DistinctPage(1).data(),
                          vmm::kPageSize),
              0);
  });
  EXPECT_EQ(mirror_->stats().rejected, 0u);
}

// A mirror that comes back with its replica is re-protected by comparing trees; what the guest
// wrote meanwhile travels once per content.
TEST_F(DedupReplication, ReProtectionSendsEachNewContentOnce) {
  CreateVm([](vmm::GuestMemory& m) {
    for (uint64_t g = 1; g < kPages; g++) {
      m.Write(g * vmm::kPageSize, DistinctPage(g).data(), vmm::kPageSize);
    }
  });
  StartMirror();
  StartPrimary();
  ASSERT_TRUE(WaitUntil([&] { return Protected(); }, 60)) << Logs();
  uint16_t port = mirror_->port();
  mirror_.reset();  // its replica stays
  ASSERT_TRUE(WaitUntil([&] { return !primary_->stats().connected; }, 30)) << Logs();
  constexpr uint64_t kNew = 200;
  for (uint64_t i = 0; i < kNew; i++) {
    // New content, each at two pages.
    auto p = DistinctPage(i, 99);
    vm_->WriteAsGuest((100 + i) * vmm::kPageSize, p.data(), vmm::kPageSize);
    vm_->WriteAsGuest((2100 + i) * vmm::kPageSize, p.data(), vmm::kPageSize);
  }
  StartMirror(nullptr, port, /*keep_replica=*/true);
  ASSERT_TRUE(WaitUntil([&] { return primary_->stats().resyncs >= 2 && Protected(); }, 60))
      << Logs();
  auto sync = primary_->stats().sync;
  std::printf(
      "re-protection: %llu bytes on the wire, %llu bytes already at the mirror, %llu "
      "pages as references\n",
      static_cast<unsigned long long>(sync.wire_bytes),
      static_cast<unsigned long long>(sync.unchanged_bytes),
      static_cast<unsigned long long>(sync.deduplicated_pages));
  EXPECT_GE(sync.deduplicated_pages, kNew);
  EXPECT_GE(sync.unchanged_bytes, kMemory / 2);
  EXPECT_LT(sync.wire_bytes, (kNew + 4 * 64) * vmm::kPageSize);  // new contents once, and slack
  uint64_t epoch = engine_->stats().epochs;
  ASSERT_TRUE(WaitUntil([&] { return mirror_->stats().committed_epoch >= int64_t(epoch); }, 30))
      << Logs();
  pauses_.ExpectReplicaMatches(*mirror_);
  EXPECT_EQ(mirror_->stats().rejected, 0u);
}

// A guest started from a memory image both hosts read, barely changed since: a fresh mirror gets
// the rest of memory from that image.
TEST_F(DedupReplication, AFreshMirrorOfAGuestCloseToASharedBaseImageReceivesLittle) {
  std::string base_path = dir_.File("base.mem");
  {
    std::ofstream base(base_path, std::ios::binary);
    for (uint64_t g = 0; g < kPages; g++) {
      auto p = DistinctPage(g, 77);
      base.write(reinterpret_cast<const char*>(p.data()), static_cast<std::streamsize>(p.size()));
    }
  }
  auto base = checkpoint::BaseImage::Open(base_path, kMemory);
  ASSERT_TRUE(base.ok()) << base.status();
  CreateVm([](vmm::GuestMemory& m) {
    for (uint64_t g = 1; g < kPages; g++) {
      // The base image, but for 1 page in 256 (and page 0, the write count).
      auto p = DistinctPage(g, g % 256 == 7 ? 78 : 77);
      m.Write(g * vmm::kPageSize, p.data(), vmm::kPageSize);
    }
  });
  // Each host opens the image itself, as two hosts would.
  auto mirror_base = checkpoint::BaseImage::Open(base_path, kMemory);
  ASSERT_TRUE(mirror_base.ok());
  StartMirror(*mirror_base);
  StartPrimary(*base);
  ASSERT_TRUE(WaitUntil([&] { return Protected(); }, 60)) << Logs();
  auto stats = primary_->stats();
  double share = static_cast<double>(stats.bytes_sent) / static_cast<double>(kMemory);
  std::printf(
      "fresh mirror with a shared base image: %llu bytes on the wire for %llu bytes of "
      "memory (%.2f %%), %llu pages from the base image\n",
      static_cast<unsigned long long>(stats.bytes_sent), static_cast<unsigned long long>(kMemory),
      100 * share, static_cast<unsigned long long>(stats.sync.base_pages));
  EXPECT_LE(share, 0.05) << Logs();
  EXPECT_GE(stats.sync.base_pages, kPages - kPages / 256 - 2);
  ASSERT_TRUE(WaitUntil([&] { return mirror_->stats().committed_epoch >= 3; }, 30)) << Logs();
  pauses_.ExpectReplicaMatches(*mirror_);
  EXPECT_EQ(mirror_->stats().rejected, 0u);
}

TEST(BaseImage, AnImageThatDoesNotFitIsRefusedWithOneLine) {
  TempDir dir;
  EXPECT_FALSE(checkpoint::BaseImage::Open(dir.File("missing"), kMemory).ok());
  std::string odd = dir.File("odd");
  std::ofstream(odd, std::ios::binary) << std::string(5000, 'x');
  auto s = checkpoint::BaseImage::Open(odd, kMemory);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  std::string big = dir.File("big");
  std::ofstream(big, std::ios::binary) << std::string(3 * vmm::kPageSize, 'x');
  s = checkpoint::BaseImage::Open(big, 2 * vmm::kPageSize);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("larger than the guest's memory"), std::string::npos)
      << s.status();
  EXPECT_EQ(s.status().message().find('\n'), std::string::npos);
}

// The index stays exact through overwrites, whatever the order.
TEST(ContentIndex, FindsAHolderAfterAnyOverwrite) {
  checkpoint::ContentIndex index(8);
  checkpoint::ContentHash a{1, 2}, b{3, 4};
  for (uint64_t g : {0, 3, 5}) index.Record(g, a);
  index.Record(6, b);
  EXPECT_EQ(index.contents(), 2u);
  index.Record(0, b);  // the ring's head changes content
  ASSERT_TRUE(index.Find(a).has_value());
  EXPECT_TRUE(*index.Find(a) == 3 || *index.Find(a) == 5);
  index.Forget(3);
  EXPECT_EQ(*index.Find(a), 5u);
  index.Record(5, checkpoint::ZeroPageHash());  // a zero page holds nothing worth naming
  EXPECT_FALSE(index.Find(a).has_value());
  EXPECT_FALSE(index.Find(checkpoint::ZeroPageHash()).has_value());
  index.Forget(0);
  EXPECT_EQ(*index.Find(b), 6u);
  index.Clear();
  EXPECT_FALSE(index.Find(b).has_value());
  EXPECT_EQ(index.contents(), 0u);
}

// A mirror session fed frames the way the Mirror feeds it, against a small replica: the
// primary's side is played by CheckpointFrames with its own Dedup.
class DedupRefusal : public ::testing::Test {
 protected:
  // The smallest guest memory (16 MiB): 64 pages of contents, the rest zero.
  static constexpr uint64_t kSmallMemory = 16ull << 20, kSmallDisk = 64 * 1024;
  void SetUp() override {
    auto r = checkpoint::ReplicaStore::Create(kSmallMemory, dir_.File("replica.img"), kSmallDisk);
    ASSERT_TRUE(r.ok()) << r.status();
    replica_ = std::move(*r);
    session_ = std::make_unique<replicator::MirrorSession>(
        replicator::MirrorState{*replica_, replica_mu_, stats_, stats_mu_, options_}, "test");
    ASSERT_TRUE(session_->Start(true).ok());
    pb::Frame done;
    done.mutable_tree_query()->set_done(true);
    ASSERT_TRUE(session_->Receive(done).ok());
    // Pages 0..31 distinct, 32..63 the same again.
    for (uint64_t g = 0; g < 64; g++) memory_.push_back(DistinctPage(g % 32));
    memory_.resize(kPages, std::vector<uint8_t>(vmm::kPageSize, 0));
    checkpoint::Checkpoint full = MakeCheckpoint(0, {});
    full.full = true;
    full.disk_writes.push_back({0, std::string(kSmallDisk, '\0')});
    for (uint64_t g = 0; g < kPages; g++) AddPage(full, g);
    ASSERT_TRUE(Send(full).ok());
    ASSERT_EQ(dedup_.deduplicated, 32u);
    // Epoch 1: page 10 takes page 3's content, page 5 (and its twin 37) new content.
    checkpoint::Checkpoint one = MakeCheckpoint(1, {});
    memory_[10] = memory_[3];
    memory_[5] = memory_[37] = DistinctPage(500);
    stale_ = dedup_;  // a primary that never sent epoch 1
    for (uint64_t g : {5, 10, 37}) AddPage(one, g);
    ASSERT_TRUE(Send(one).ok());
    ASSERT_EQ(dedup_.deduplicated, 34u);  // page 10, and page 37 after page 5
    ASSERT_EQ(replica_->committed_epoch(), 1);
    ASSERT_EQ(replica_->MemoryDigest(), MemoryDigest());
    digest_ = replica_->MemoryDigest();
  }
  checkpoint::Checkpoint MakeCheckpoint(uint64_t epoch, const std::vector<uint64_t>& gfns) {
    checkpoint::Checkpoint c;
    c.epoch = epoch;
    c.state.set_format_version(vmm::kSnapshotFormatVersion);
    c.state.set_memory_bytes(kSmallMemory);
    c.state.set_disk_bytes(kSmallDisk);
    c.state.add_vcpus();
    for (uint64_t g : gfns) AddPage(c, g);
    return c;
  }
  void AddPage(checkpoint::Checkpoint& c, uint64_t gfn) {
    c.gfns.push_back(gfn);
    c.hashes.push_back(XXH3_64bits(memory_[gfn].data(), vmm::kPageSize));
    c.pages.insert(c.pages.end(), memory_[gfn].begin(), memory_[gfn].end());
  }
  std::vector<pb::Frame> Frames(checkpoint::Checkpoint& c, replicator::Dedup& dedup) {
    c.digest = checkpoint::CheckpointDigest(c);
    return replicator::CheckpointFrames(c, pb::COMPRESSION_NONE, &dedup);
  }
  absl::Status Send(const std::vector<pb::Frame>& frames) {
    for (const pb::Frame& f : frames) {
      auto r = session_->Receive(f);
      if (!r.ok()) return r.status();
    }
    return absl::OkStatus();
  }
  absl::Status Send(checkpoint::Checkpoint& c) { return Send(Frames(c, dedup_)); }
  uint64_t MemoryDigest() const {
    std::vector<uint8_t> all;
    for (const auto& p : memory_) all.insert(all.end(), p.begin(), p.end());
    return XXH3_64bits(all.data(), all.size());
  }
  // Refused with a one-line error naming `why`, counted, and the replica as it was.
  void ExpectRefused(const absl::Status& s, const std::string& why) {
    EXPECT_FALSE(s.ok());
    EXPECT_NE(s.message().find(why), std::string::npos) << s;
    EXPECT_EQ(s.message().find('\n'), std::string::npos) << s;
    EXPECT_EQ(stats_.rejected, 1u);
    EXPECT_EQ(replica_->committed_epoch(), 1);
    EXPECT_EQ(replica_->MemoryDigest(), digest_);
  }

  TempDir dir_;
  std::unique_ptr<checkpoint::ReplicaStore> replica_;
  std::mutex replica_mu_, stats_mu_;
  replicator::Mirror::Stats stats_;
  replicator::Mirror::Options options_;
  std::unique_ptr<replicator::MirrorSession> session_;
  std::vector<std::vector<uint8_t>> memory_;
  replicator::Dedup dedup_{kPages}, stale_{kPages};
  uint64_t digest_ = 0;
};

TEST_F(DedupRefusal, ReferencesResolveToTheReplicasPages) {
  EXPECT_EQ(std::memcmp(replica_->memory().data() + 10 * vmm::kPageSize, memory_[3].data(),
                        vmm::kPageSize),
            0);
  EXPECT_EQ(stats_.rejected, 0u);
}

TEST_F(DedupRefusal, AForgedReferenceIsRefused) {
  memory_[11] = memory_[4];  // sent as a reference to page 4's content, then forged
  auto c = MakeCheckpoint(2, {11});
  auto frames = Frames(c, dedup_);
  ASSERT_EQ(frames[0].pages().ref_hashes().size(), 16u);
  frames[0].mutable_pages()->set_ref_hashes(std::string(16, '\x5a'));
  ExpectRefused(Send(frames), "refers to content this replica does not hold");
}

TEST_F(DedupRefusal, AStaleReferenceIsRefused) {
  // Page 5's old content was overwritten at both pages that held it in epoch 1: a primary that
  // missed that still names it.
  memory_[12] = DistinctPage(5);
  auto c = MakeCheckpoint(2, {12});
  auto frames = Frames(c, stale_);
  ASSERT_EQ(frames[0].pages().ref_hashes().size(), 16u);
  ExpectRefused(Send(frames), "refers to content this replica does not hold");
}

TEST_F(DedupRefusal, AReferenceWhoseBytesDoNotMatchThePageHashIsRefused) {
  memory_[13] = memory_[6];  // a reference to page 6's content...
  auto c = MakeCheckpoint(2, {13});
  c.hashes[0] = XXH3_64bits(memory_[7].data(), vmm::kPageSize);  // ...declared as page 7's
  auto frames = Frames(c, dedup_);
  ASSERT_EQ(frames[0].pages().ref_hashes().size(), 16u);
  ExpectRefused(Send(frames), "page 13 does not match its hash");
}

TEST_F(DedupRefusal, AMalformedReferenceFieldIsRefused) {
  memory_[14] = memory_[8];
  auto c = MakeCheckpoint(2, {14});
  auto frames = Frames(c, dedup_);
  frames[0].mutable_pages()->mutable_ref_hashes()->resize(15);
  ExpectRefused(Send(frames), "references but 15 bytes");
  // A mask of the wrong size, and a page flagged both zero and a reference, likewise (decoded
  // alone: the session is closed).
  pb::PageBatch b = frames[0].pages();
  b.set_ref_hashes(std::string(16, '\1'));
  b.set_ref(std::string(2, '\1'));
  EXPECT_NE(replicator::DecodePageBatch(b, 64).status().message().find("reference mask"),
            std::string::npos);
  b.set_ref(std::string(1, '\1'));
  b.set_zero(std::string(1, '\1'));
  EXPECT_NE(replicator::DecodePageBatch(b, 64).status().message().find("both zero"),
            std::string::npos);
}

TEST_F(DedupRefusal, AForgedReferenceInPreCopyIsRefused) {
  // A new connection: its synchronisation starts a fresh index, which holds nothing yet.
  session_ = std::make_unique<replicator::MirrorSession>(
      replicator::MirrorState{*replica_, replica_mu_, stats_, stats_mu_, options_}, "test");
  ASSERT_TRUE(session_->Start(true).ok());
  pb::Frame done;
  done.mutable_tree_query()->set_done(true);
  ASSERT_TRUE(session_->Receive(done).ok());
  auto c = MakeCheckpoint(0, {3});
  ExpectRefused(Send({replicator::PageBatchFrame(0, true, c, 0, 1, pb::COMPRESSION_NONE,
                                                 &dedup_)}),  // dedup_ still holds page 3's
                "pre-copy rejected: page 3 refers to content this replica does not hold");
}

}  // namespace
}  // namespace romulus::dedup_test
