// The page-batch codec: zero pages travel as flags, LZ4 is used when it helps, and every batch
// from the peer is checked before its pages are used. No KVM needed.
#include <gtest/gtest.h>
#include <xxhash.h>

#include <cstring>

#include "replicator/replicator.h"

namespace romulus {
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

// In a resynchronisation, pages the mirror's replica already holds travel as flags: the mirror
// takes them from its replica, and the page hash, checked as for any page, proves the claim.
TEST(WireFormat, PagesTheMirrorHoldsAreFlagsFilledFromItsReplica) {
  PageRun run = MixedRun(30);
  std::vector<uint8_t> replica(kMemoryPages * kPage, 0);
  std::vector<uint64_t> mirror(kMemoryPages, 0);
  for (size_t i = 0; i < run.gfns.size(); i += 2) {  // the mirror holds every other page
    std::memcpy(&replica[run.gfns[i] * kPage], &run.pages[i * kPage], kPage);
    mirror[run.gfns[i]] = run.hashes[i];
  }
  pb::Frame f =
      replicator::PageBatchFrame(0, true, run, 0, run.gfns.size(), pb::COMPRESSION_NONE, &mirror);
  size_t sent = 0;
  for (size_t i = 1; i < run.gfns.size(); i += 2) sent += i % 3 == 0 ? 0 : 1;  // odd, non-zero
  EXPECT_EQ(f.pages().data().size(), sent * kPage);
  auto back = replicator::DecodePageBatch(f.pages(), kMemoryPages, replica.data());
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSame(*back, run);

  // A mirror without a replica, or outside a synchronisation, refuses such a batch.
  EXPECT_FALSE(replicator::DecodePageBatch(f.pages(), kMemoryPages).ok());
  pb::PageBatch epoch_batch = f.pages();
  epoch_batch.set_sync(false);
  EXPECT_FALSE(replicator::DecodePageBatch(epoch_batch, kMemoryPages, replica.data()).ok());
  // A flag on a page the replica does not hold yields a page that fails its hash.
  replica[run.gfns[2] * kPage + 100] ^= 1;
  back = replicator::DecodePageBatch(f.pages(), kMemoryPages, replica.data());
  ASSERT_TRUE(back.ok());
  EXPECT_NE(XXH3_64bits(back->pages.data() + 2 * kPage, kPage), back->hashes[2]);
  // Zero and same at once, or a mask of the wrong size, is refused.
  pb::PageBatch both = f.pages();
  both.set_zero(both.same());
  EXPECT_FALSE(replicator::DecodePageBatch(both, kMemoryPages, replica.data()).ok());
  pb::PageBatch short_mask = f.pages();
  short_mask.set_same("x");
  EXPECT_FALSE(replicator::DecodePageBatch(short_mask, kMemoryPages, replica.data()).ok());
}

}  // namespace
}  // namespace romulus
