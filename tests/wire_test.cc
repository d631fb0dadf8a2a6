// The page-batch codec: zero pages travel as flags, LZ4 is used when it helps, and every batch
// from the peer is checked before its pages are used. The hash-tree comparison that precedes a
// resynchronisation: what it finds, and what it refuses. No KVM needed.
#include <gtest/gtest.h>

#include <cstring>
#include <functional>

#include "replicator/replicator.h"
#include "vmm/xxhash_dispatch.h"

namespace romulus::wire_test {
namespace {

using checkpoint::PageRun;
constexpr uint64_t kPage = 4096, kMemoryPages = 4096;

// Pages 0, 3, 6... are zero; 1, 4, 7... repeat a short pattern; the rest are pseudo-random.
PageRun MixedRun(size_t n) {
  PageRun run;
  uint64_t x = 88172645463325252ull;
  for (size_t i = 0; i < n; i++) {
    run.gfns.push_back(10 + i * 2);
    std::vector<uint8_t> page(kPage, 0);
    if (i % 3 == 1) {
      for (size_t b = 0; b < kPage; b++) page[b] = static_cast<uint8_t>("romulus!"[b % 8]);
    } else if (i % 3 == 2) {
      for (size_t b = 0; b < kPage; b += 8) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        std::memcpy(&page[b], &x, 8);
      }
    }
    run.pages.insert(run.pages.end(), page.begin(), page.end());
    run.hashes.push_back(XXH3_64bits(page.data(), kPage));
  }
  return run;
}

void ExpectSame(const PageRun& a, const PageRun& b) {
  EXPECT_EQ(a.gfns, b.gfns);
  EXPECT_EQ(a.hashes, b.hashes);
  EXPECT_TRUE(a.pages == b.pages);
}

TEST(WireFormat, ZeroPagesAreFlagsAndLz4RoundTrips) {
  PageRun run = MixedRun(replicator::kPagesPerBatch);
  pb::Frame raw =
      replicator::PageBatchFrame(7, false, run, 0, run.gfns.size(), pb::COMPRESSION_NONE);
  size_t nonzero = run.gfns.size() - (run.gfns.size() + 2) / 3;
  EXPECT_EQ(raw.pages().data().size(), nonzero * kPage);  // zero pages carry no bytes
  EXPECT_EQ(raw.pages().compression(), pb::COMPRESSION_NONE);
  auto back = replicator::DecodePageBatch(raw.pages(), kMemoryPages);
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSame(*back, run);

  pb::Frame lz4 = replicator::PageBatchFrame(7, true, run, 0, run.gfns.size(), pb::LZ4);
  EXPECT_EQ(lz4.pages().compression(), pb::LZ4);
  EXPECT_TRUE(lz4.pages().sync());
  EXPECT_LT(lz4.pages().data().size(), raw.pages().data().size() * 3 / 4);
  back = replicator::DecodePageBatch(lz4.pages(), kMemoryPages);
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSame(*back, run);
}

TEST(WireFormat, IncompressiblePagesAreSentRaw) {
  PageRun run = MixedRun(30);
  PageRun random;  // only the random pages
  for (size_t i = 2; i < run.gfns.size(); i += 3) {
    random.gfns.push_back(run.gfns[i]);
    random.hashes.push_back(run.hashes[i]);
    random.pages.insert(random.pages.end(), run.pages.begin() + i * kPage,
                        run.pages.begin() + (i + 1) * kPage);
  }
  pb::Frame f = replicator::PageBatchFrame(1, false, random, 0, random.gfns.size(), pb::LZ4);
  EXPECT_EQ(f.pages().compression(), pb::COMPRESSION_NONE);
  auto back = replicator::DecodePageBatch(f.pages(), kMemoryPages);
  ASSERT_TRUE(back.ok());
  ExpectSame(*back, random);
}

TEST(WireFormat, BadBatchesAreRefusedWithOneLine) {
  PageRun run = MixedRun(40);
  pb::Frame good = replicator::PageBatchFrame(3, false, run, 0, run.gfns.size(), pb::LZ4);
  ASSERT_EQ(good.pages().compression(), pb::LZ4);
  std::vector<std::pair<std::string, pb::PageBatch>> bad;
  pb::PageBatch b = good.pages();
  b.mutable_data()->resize(b.data().size() / 2);
  bad.emplace_back("truncated LZ4 block", b);
  b = good.pages();
  b.mutable_zero()->push_back('\0');
  bad.emplace_back("zero mask of the wrong size", b);
  b = good.pages();
  b.set_zero(std::string(b.zero().size(), '\0'));  // claims no zero pages: too few bytes
  bad.emplace_back("zero mask that disagrees with the data", b);
  b = good.pages();
  b.set_gfns(5, kMemoryPages);
  bad.emplace_back("page outside memory", b);
  b = good.pages();
  b.add_hashes(1);
  bad.emplace_back("hash count", b);
  b = good.pages();
  b.set_compression(static_cast<pb::Compression>(9));
  bad.emplace_back("unknown compression", b);
  b = pb::PageBatch();
  bad.emplace_back("empty batch", b);
  b = pb::PageBatch();
  for (size_t i = 0; i <= replicator::kPagesPerBatch; i++) {
    b.add_gfns(i);
    b.add_hashes(0);
  }
  b.set_zero(std::string((replicator::kPagesPerBatch + 8) / 8, '\xff'));
  bad.emplace_back("too many pages", b);
  for (const auto& [what, batch] : bad) {
    auto r = replicator::DecodePageBatch(batch, kMemoryPages);
    ASSERT_FALSE(r.ok()) << what;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << what;
    EXPECT_EQ(std::string(r.status().message()).find('\n'), std::string::npos) << what;
  }
}

// LZ4 blocks carry no checksum: a corrupted one may decode, but never to pages that match their
// hashes, which the replica store checks before using any page.
TEST(WireFormat, ACorruptedLz4BlockNeverYieldsPagesMatchingTheirHashes) {
  PageRun run = MixedRun(40);
  pb::Frame f = replicator::PageBatchFrame(3, false, run, 0, run.gfns.size(), pb::LZ4);
  ASSERT_EQ(f.pages().compression(), pb::LZ4);
  for (size_t at : {size_t{20}, f.pages().data().size() / 2, f.pages().data().size() - 3}) {
    pb::PageBatch b = f.pages();
    (*b.mutable_data())[at] ^= 0x5a;
    auto r = replicator::DecodePageBatch(b, kMemoryPages);
    if (!r.ok()) continue;  // refused outright
    bool mismatch = false;
    for (size_t i = 0; i < r->gfns.size(); i++) {
      mismatch |= XXH3_64bits(r->pages.data() + i * kPage, kPage) != r->hashes[i];
    }
    EXPECT_TRUE(mismatch) << "byte " << at;
  }
}

TEST(WireFormat, CompressionNamesAreChecked) {
  EXPECT_EQ(*replicator::ParseCompression(""), pb::COMPRESSION_NONE);
  EXPECT_EQ(*replicator::ParseCompression("none"), pb::COMPRESSION_NONE);
  EXPECT_EQ(*replicator::ParseCompression("lz4"), pb::LZ4);
  EXPECT_FALSE(replicator::ParseCompression("zip").ok());
}

// Leaves 0..n-1 with distinct hashes.
std::vector<uint64_t> Leaves(uint64_t n) {
  std::vector<uint64_t> v(n);
  for (uint64_t i = 0; i < n; i++) v[i] = XXH3_64bits(&i, sizeof(i));
  return v;
}

TEST(HashTree, EachNodeCoversItsLeavesAndAChangedLeafChangesOnlyItsAncestors) {
  constexpr uint64_t kN = 64 * 63 + 5;  // three levels: 4037 leaves, 64 nodes, the root
  checkpoint::HashTree a(Leaves(kN));
  ASSERT_EQ(a.top(), 2u);
  EXPECT_EQ(a.width(1), 64u);
  EXPECT_EQ(a.width(2), 1u);
  EXPECT_EQ(a.Children(2, 0), std::make_pair(uint64_t{0}, uint64_t{64}));
  EXPECT_EQ(a.Children(1, 63), std::make_pair(uint64_t{4032}, kN));
  EXPECT_EQ(a.Leaves(2, 0), std::make_pair(uint64_t{0}, kN));
  EXPECT_EQ(a.Leaves(1, 3), std::make_pair(uint64_t{192}, uint64_t{256}));
  std::vector<uint64_t> changed = Leaves(kN);
  changed[200] ^= 1;
  checkpoint::HashTree b(changed);
  for (uint64_t i = 0; i < a.width(1); i++) EXPECT_EQ(a.node(1, i) != b.node(1, i), i == 3);
  EXPECT_NE(a.node(2, 0), b.node(2, 0));
  EXPECT_EQ(checkpoint::HashTree(Leaves(1)).top(), 0u);
  EXPECT_EQ(checkpoint::HashTree().width(0), 0u);
}

struct Exchange {
  checkpoint::ReplicaTrees mirror;
  uint64_t budget = 0, queries = 0, answered = 0;
  replicator::AskMirror Ask() {
    budget = replicator::TreeQueryBudget(mirror);
    return [this](const pb::TreeQuery& q) -> absl::StatusOr<pb::TreeAnswer> {
      queries++;
      auto a = replicator::AnswerTreeQuery(mirror, q, budget);
      if (a.ok()) answered += static_cast<uint64_t>(a->hashes_size());
      return a;
    };
  }
};

// The comparison finds exactly the pages that differ, the mirror's hash of every disk chunk,
// and asks about a few nodes per difference, not about every page.
TEST(HashTree, ComparingFindsWhatDiffersAndAsksAboutLittleElse) {
  constexpr uint64_t kPages = 262144, kChunks = 100;  // 1 GiB of pages
  std::vector<uint64_t> pages = Leaves(kPages), chunks = Leaves(kChunks);
  checkpoint::ReplicaTrees own{checkpoint::HashTree(pages), checkpoint::HashTree(chunks)};
  std::vector<uint64_t> differ = {0, 1, 4095, 70000, 262143};
  for (uint64_t p : differ) pages[p] ^= 1;
  chunks[7] ^= 1;
  Exchange ex{{checkpoint::HashTree(pages), checkpoint::HashTree(chunks)}};
  auto h = replicator::CompareTrees(own, replicator::RootsOf(&ex.mirror), ex.Ask());
  ASSERT_TRUE(h.ok()) << h.status();

  std::vector<bool> covered(kPages, false);
  for (auto [level, node] : h->same_pages) {
    auto [first, end] = own.pages.Leaves(level, node);
    for (uint64_t p = first; p < end; p++) {
      EXPECT_FALSE(covered[p]) << p;
      covered[p] = true;
    }
  }
  EXPECT_EQ(h->same_page_count, kPages - differ.size());
  for (uint64_t p : differ) EXPECT_FALSE(covered[p]) << p;
  EXPECT_EQ(h->chunks, chunks);  // the mirror's, including the chunk that differs
  // Three page levels below the root and two chunk levels: 64 hashes per differing node.
  EXPECT_LE(ex.answered, (differ.size() * 3 + 2) * 64);
  EXPECT_LE(ex.queries, 5u);

  // Nothing differs: the roots settle it. The mirror holds nothing: there is nothing to ask.
  Exchange same{own};
  h = replicator::CompareTrees(own, replicator::RootsOf(&own), same.Ask());
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->same_page_count, kPages);
  EXPECT_EQ(same.queries, 0u);
  h = replicator::CompareTrees(own, replicator::RootsOf(nullptr), same.Ask());
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->same_page_count, 0u);
  EXPECT_TRUE(h->chunks.empty());
}

// Queries come from an untrusted peer: levels, node numbers and counts are checked, and a peer
// that asks past what any comparison needs is refused. A mirror's answer of the wrong size is
// refused by the primary.
TEST(HashTree, BadQueriesAndAnswersAreRefused) {
  checkpoint::ReplicaTrees t{checkpoint::HashTree(Leaves(4096)), checkpoint::HashTree(Leaves(3))};
  uint64_t budget = replicator::TreeQueryBudget(t);
  auto query = [](bool disk, uint32_t level, std::vector<uint64_t> nodes) {
    pb::TreeQuery q;
    q.set_disk(disk);
    q.set_level(level);
    for (uint64_t n : nodes) q.add_nodes(n);
    return q;
  };
  EXPECT_TRUE(replicator::AnswerTreeQuery(t, query(false, 2, {0}), budget).ok());
  EXPECT_EQ(replicator::AnswerTreeQuery(t, query(false, 1, {63}), budget)->hashes_size(), 64);
  EXPECT_EQ(replicator::AnswerTreeQuery(t, query(true, 1, {0}), budget)->hashes_size(), 3);
  EXPECT_FALSE(replicator::AnswerTreeQuery(t, query(false, 0, {0}), budget).ok());
  EXPECT_FALSE(replicator::AnswerTreeQuery(t, query(false, 3, {0}), budget).ok());
  EXPECT_FALSE(replicator::AnswerTreeQuery(t, query(false, 1, {64}), budget).ok());
  EXPECT_FALSE(replicator::AnswerTreeQuery(t, query(true, 2, {0}), budget).ok());
  EXPECT_FALSE(replicator::AnswerTreeQuery(t, query(false, 1, {}), budget).ok());
  EXPECT_FALSE(
      replicator::AnswerTreeQuery(t, query(false, 1, std::vector<uint64_t>(4097, 0)), budget).ok());
  int answered = 0;
  while (replicator::AnswerTreeQuery(t, query(false, 1, {0}), budget).ok() && answered < 1000) {
    answered++;
  }
  EXPECT_LT(answered, 1000);  // the budget ran out

  checkpoint::ReplicaTrees own{checkpoint::HashTree(Leaves(4097)), checkpoint::HashTree()};
  auto short_answer = [](const pb::TreeQuery&) -> absl::StatusOr<pb::TreeAnswer> {
    pb::TreeAnswer a;
    a.add_hashes(1);
    return a;
  };
  EXPECT_FALSE(replicator::CompareTrees(own, replicator::RootsOf(&t), short_answer).ok());
}

// A pre-copy disk chunk with one sector written costs about that sector on the wire, raw or
// compressed, and decodes to the chunk; masks and data that do not fit its length are refused.
TEST(WireFormat, ZeroSectorsOfADiskChunkAreFlags) {
  checkpoint::SyncChunk chunk{.offset = 0, .data = std::string(checkpoint::kDiskChunk, '\0')};
  for (size_t b = 0; b < 512; b++) chunk.data[7 * 512 + b] = static_cast<char>(b * 31 + 7);
  chunk.hash = XXH3_64bits(chunk.data.data(), chunk.data.size());
  for (pb::Compression c : {pb::COMPRESSION_NONE, pb::LZ4}) {
    pb::Frame f = replicator::SyncDiskFrame(chunk, nullptr, c);
    EXPECT_LE(f.ByteSizeLong(), 600u) << c;
    auto data = replicator::SyncDiskData(f.sync_disk());
    ASSERT_TRUE(data.ok() && data->has_value()) << data.status();
    EXPECT_EQ(**data, chunk.data);
  }
  pb::Frame f = replicator::SyncDiskFrame(chunk, nullptr, pb::COMPRESSION_NONE);
  const std::vector<std::pair<const char*, std::function<void(pb::SyncDisk&)>>> bad = {
      {"a mask of the wrong size", [](pb::SyncDisk& d) { d.mutable_zero_sectors()->pop_back(); }},
      {"a sector too few", [](pb::SyncDisk& d) { d.mutable_data()->resize(100); }},
      {"a sector too many", [](pb::SyncDisk& d) { d.mutable_data()->append(512, 'x'); }},
      {"a length past the chunk", [](pb::SyncDisk& d) { d.set_length(1u << 20); }},
      {"data with the zero flag", [](pb::SyncDisk& d) { d.set_zero(true); }},
      {"an unknown compression", [](pb::SyncDisk& d) { d.set_compression(pb::Compression(9)); }},
  };
  for (const auto& [what, change] : bad) {
    pb::SyncDisk d = f.sync_disk();
    change(d);
    EXPECT_FALSE(replicator::SyncDiskData(d).ok()) << what;
  }
}

}  // namespace
}  // namespace romulus::wire_test
