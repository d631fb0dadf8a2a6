// Post-copy's memory: a page that has not arrived is waited for, by the monitor's own reads, by
// the kernel's (a write(2) from guest RAM) and through another mapping (the process platform's
// stub), and what is then read is exactly the page placed; never zeros, never what the memory
// held before.
#include "vmm/missing_pages.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "guest/abi.h"
#include "tests/test_util.h"
#include "vmm/block_device.h"

namespace romulus::missing_pages_test {
namespace {

using testing::WaitUntil;
using vmm::kPageSize;

constexpr uint64_t kMemory = 16ull << 20;

std::vector<uint8_t> PageOf(uint8_t fill, uint64_t gfn) {
  std::vector<uint8_t> page(kPageSize, fill);
  std::memcpy(page.data(), &gfn, sizeof(gfn));
  return page;
}

// Guest RAM whose pages [10, 20) are missing; every page first holds 0xaa, which must never be
// seen in a missing one. Faults are queued for the test to answer.
class MissingPagesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = vmm::GuestMemory::CreateMemfd(kMemory);
    ASSERT_TRUE(m.ok()) << m.status();
    memory_ = std::move(*m);
    std::memset(memory_->data(), 0xaa, kMemory);
    vmm::DirtyBitmap missing(memory_->pages());
    for (uint64_t gfn = 10; gfn < 20; gfn++) missing.Set(gfn);
    auto mp = vmm::MissingPages::Create(*memory_, missing, {.on_fault = [this](uint64_t gfn) {
      std::lock_guard<std::mutex> lock(mu_);
      faults_.push_back(gfn);
    }});
    ASSERT_TRUE(mp.ok()) << mp.status();
    pages_ = std::move(*mp);
  }
  void TearDown() override {
    // Whatever still waits must be let go before the memory goes.
    for (uint64_t gfn = 10; gfn < 20; gfn++) {
      if (pages_ && pages_->IsMissing(gfn)) (void)pages_->Place(gfn, PageOf(0, gfn).data());
    }
    pages_.reset();  // and a waiter a failed test left behind goes on (reading a zero page)
    for (auto& t : threads_) t.join();
    if (other_) ::munmap(other_, kMemory);
  }
  // The next page something waited for (0 when none came in time).
  uint64_t NextFault() {
    uint64_t gfn = 0;
    WaitUntil(
        [&] {
          std::lock_guard<std::mutex> lock(mu_);
          if (faults_.empty()) return false;
          gfn = faults_.front();
          faults_.pop_front();
          return true;
        },
        30);
    return gfn;
  }
  // Reads the first byte after the page number of page `gfn` through `base`, on a thread.
  void ReadOnAThread(const uint8_t* base, uint64_t gfn, std::atomic<int>& seen) {
    threads_.emplace_back([base, gfn, &seen] {
      seen.store(*reinterpret_cast<const volatile uint8_t*>(base + gfn * kPageSize + 8));
    });
  }

  std::unique_ptr<vmm::GuestMemory> memory_;
  std::unique_ptr<vmm::MissingPages> pages_;
  std::mutex mu_;
  std::deque<uint64_t> faults_;
  std::vector<std::thread> threads_;
  uint8_t* other_ = nullptr;  // another mapping of the memory, when a test makes one
};

TEST_F(MissingPagesTest, AReadWaitsForThePageAndSeesExactlyWhatWasPlaced) {
  std::atomic<int> seen{-1};
  ReadOnAThread(memory_->data(), 12, seen);
  ASSERT_EQ(NextFault(), 12u);
  EXPECT_EQ(seen.load(), -1);  // still waiting: nothing was read in place of the page
  auto page = PageOf(0x5c, 12);
  ASSERT_TRUE(pages_->Place(12, page.data()).ok());
  ASSERT_TRUE(WaitUntil([&] { return seen.load() != -1; }, 30));
  EXPECT_EQ(seen.load(), 0x5c);
  EXPECT_EQ(std::memcmp(memory_->data() + 12 * kPageSize, page.data(), kPageSize), 0);

  // Pages that were never missing are read as they are, without a fault.
  EXPECT_EQ(memory_->data()[5 * kPageSize], 0xaa);
  EXPECT_EQ(memory_->data()[20 * kPageSize], 0xaa);
  auto s = pages_->stats();
  EXPECT_EQ(s.faults, 1u);
  EXPECT_EQ(s.placed, 1u);
  EXPECT_EQ(s.missing, 9u);
  EXPECT_GT(s.wait_max.count(), 0);
}

TEST_F(MissingPagesTest, WhatTheMemoryHeldWhereAPageIsMissingIsNeverRead) {
  // Placed before anything reads it: no fault, and the page's own bytes, not the old 0xaa.
  auto page = PageOf(0x11, 15);
  ASSERT_TRUE(pages_->Place(15, page.data()).ok());
  EXPECT_EQ(std::memcmp(memory_->data() + 15 * kPageSize, page.data(), kPageSize), 0);
  EXPECT_EQ(pages_->stats().faults, 0u);
  EXPECT_TRUE(pages_->IsMissing(16));
  EXPECT_FALSE(pages_->IsMissing(15));
}

TEST_F(MissingPagesTest, TheKernelReadingGuestRamWaitsToo) {
  // A device writing a guest buffer to its disk: write(2) reads the page in the kernel.
  testing::TempDir dir;
  vmm::Fd file(::open(dir.File("disk").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  ASSERT_TRUE(file.valid());
  std::atomic<ssize_t> written{-2};
  threads_.emplace_back(
      [&] { written.store(::pwrite(file.get(), memory_->data() + 17 * kPageSize, kPageSize, 0)); });
  ASSERT_EQ(NextFault(), 17u);
  EXPECT_EQ(written.load(), -2);
  auto page = PageOf(0x77, 17);
  ASSERT_TRUE(pages_->Place(17, page.data()).ok());
  ASSERT_TRUE(WaitUntil([&] { return written.load() != -2; }, 30));
  ASSERT_EQ(written.load(), static_cast<ssize_t>(kPageSize));
  std::vector<uint8_t> back(kPageSize);
  ASSERT_EQ(::pread(file.get(), back.data(), kPageSize, 0), static_cast<ssize_t>(kPageSize));
  EXPECT_EQ(back, page);
}

TEST_F(MissingPagesTest, AnotherMappingOfTheMemoryWaitsAndIsWoken) {
  // As the process platform's stub maps guest RAM: its own mapping, its own userfaultfd.
  void* p = ::mmap(nullptr, kMemory, PROT_READ | PROT_WRITE, MAP_SHARED, memory_->fd(), 0);
  ASSERT_NE(p, MAP_FAILED);
  auto* other = other_ = static_cast<uint8_t*>(p);
  vmm::Fd uffd(static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | 1 /* user mode only */)));
  ASSERT_TRUE(uffd.valid()) << std::strerror(errno);
  uffdio_api api{.api = UFFD_API, .features = 0, .ioctls = 0};
  ASSERT_EQ(::ioctl(uffd.get(), UFFDIO_API, &api), 0);
  // The stub maps guest RAM from its second page on.
  uffdio_register reg{};
  reg.range = {reinterpret_cast<uint64_t>(other) + kPageSize, kMemory - kPageSize};
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  ASSERT_EQ(::ioctl(uffd.get(), UFFDIO_REGISTER, &reg), 0) << std::strerror(errno);
  ASSERT_TRUE(pages_->AddMapping(std::move(uffd), reg.range.start, 1).ok());

  std::atomic<int> seen{-1};
  ReadOnAThread(other, 13, seen);
  ASSERT_EQ(NextFault(), 13u);
  EXPECT_EQ(seen.load(), -1);
  ASSERT_TRUE(pages_->Place(13, PageOf(0x3d, 13).data()).ok());
  ASSERT_TRUE(WaitUntil([&] { return seen.load() != -1; }, 30));
  EXPECT_EQ(seen.load(), 0x3d);
  // A page placed (through the monitor's mapping) before this one reads it: there, no fault.
  ASSERT_TRUE(pages_->Place(14, PageOf(0x3e, 14).data()).ok());
  EXPECT_EQ(other[14 * kPageSize + 8], 0x3e);
  EXPECT_EQ(pages_->stats().faults, 1u);
}

TEST_F(MissingPagesTest, APageOutsideRamOrHereAlreadyIsRefusedAndNothingChanges) {
  auto page = PageOf(0x42, 0);
  EXPECT_EQ(pages_->Place(kMemory / kPageSize, page.data()).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(pages_->Place(~0ull, page.data()).code(), absl::StatusCode::kOutOfRange);
  // Never missing.
  EXPECT_EQ(pages_->Place(5, page.data()).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(memory_->data()[5 * kPageSize + 8], 0xaa);
  // A duplicate.
  ASSERT_TRUE(pages_->Place(11, PageOf(0x01, 11).data()).ok());
  EXPECT_EQ(pages_->Place(11, page.data()).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(memory_->data()[11 * kPageSize + 8], 0x01);
  EXPECT_EQ(pages_->stats().placed, 1u);
}

TEST_F(MissingPagesTest, CompleteOnceEveryMissingPageIsPlaced) {
  for (uint64_t gfn = 10; gfn < 20; gfn++) {
    EXPECT_FALSE(pages_->complete());
    ASSERT_TRUE(pages_->Place(gfn, PageOf(static_cast<uint8_t>(gfn), gfn).data()).ok());
  }
  EXPECT_TRUE(pages_->complete());
  for (uint64_t gfn = 10; gfn < 20; gfn++) EXPECT_EQ(memory_->data()[gfn * kPageSize + 8], gfn);
}

TEST(MissingPages, APageThatIsNotMissingButWasNeverWrittenReadsAsZeros) {
  auto m = vmm::GuestMemory::CreateMemfd(kMemory);  // a fresh memfd: every page a hole
  ASSERT_TRUE(m.ok()) << m.status();
  vmm::GuestMemory& memory = **m;
  vmm::DirtyBitmap missing(memory.pages());
  missing.Set(7);
  std::atomic<int> faults{0};
  auto mp = vmm::MissingPages::Create(memory, missing, {.on_fault = [&](uint64_t) { faults++; }});
  ASSERT_TRUE(mp.ok()) << mp.status();
  // Not missing: zeros, at once, through the monitor's mapping and another one.
  EXPECT_EQ(memory.data()[8 * kPageSize + 100], 0);
  void* p = ::mmap(nullptr, kMemory, PROT_READ | PROT_WRITE, MAP_SHARED, memory.fd(), 0);
  ASSERT_NE(p, MAP_FAILED);
  auto* other = static_cast<uint8_t*>(p);
  vmm::Fd uffd(static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | 1 /* user mode only */)));
  ASSERT_TRUE(uffd.valid()) << std::strerror(errno);
  uffdio_api api{.api = UFFD_API, .features = 0, .ioctls = 0};
  ASSERT_EQ(::ioctl(uffd.get(), UFFDIO_API, &api), 0);
  uffdio_register reg{};
  reg.range = {reinterpret_cast<uint64_t>(other), kMemory};
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  ASSERT_EQ(::ioctl(uffd.get(), UFFDIO_REGISTER, &reg), 0) << std::strerror(errno);
  ASSERT_TRUE((*mp)->AddMapping(std::move(uffd), reg.range.start, 0).ok());
  other[9 * kPageSize] = 5;  // a write, through a mapping that faults on holes
  EXPECT_EQ(memory.data()[9 * kPageSize], 5);
  EXPECT_EQ(other[10 * kPageSize + 7], 0);
  EXPECT_EQ(faults.load(), 0);
  EXPECT_TRUE((*mp)->IsMissing(7));
  mp->reset();
  ::munmap(other, kMemory);
}

TEST(MissingPages, GuestRamThatCannotHaveHolesIsRefusedWithTheReason) {
  testing::TempDir dir;
  std::string path = dir.File("ram");
  {
    vmm::Fd f(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
    ASSERT_TRUE(f.valid());
    ASSERT_EQ(::ftruncate(f.get(), kMemory), 0);
  }
  auto memory = vmm::GuestMemory::MapFilePrivate(path, kMemory);
  ASSERT_TRUE(memory.ok()) << memory.status();
  vmm::DirtyBitmap missing((*memory)->pages());
  missing.Set(3);
  auto mp = vmm::MissingPages::Create(**memory, missing, {});
  ASSERT_FALSE(mp.ok());
  EXPECT_NE(mp.status().message().find("post-copy needs guest RAM"), std::string::npos)
      << mp.status();
}

// ---- The disk's chunks that have not arrived ----

// A 1 MiB disk (16 chunks) whose chunks 2 and 3 are missing, the rest holding 0x5a; a guest's
// block commands are run on threads as the vCPU thread would.
class MissingChunksTest : public ::testing::Test {
 protected:
  static constexpr uint64_t kDisk = 16 * vmm::kDiskChunkBytes;
  void SetUp() override {
    std::string path = dir_.File("disk.img");
    ASSERT_TRUE(vmm::BlockDevice::CreateImage(path, kDisk).ok());
    auto disk = vmm::BlockDevice::Open(path);
    ASSERT_TRUE(disk.ok()) << disk.status();
    disk_ = std::move(*disk);
    std::vector<uint8_t> fill(kDisk, 0x5a);
    ASSERT_EQ(::pwrite(disk_->fd(), fill.data(), kDisk, 0), static_cast<ssize_t>(kDisk));
    auto m = vmm::GuestMemory::CreateMemfd(kMemory);
    ASSERT_TRUE(m.ok());
    memory_ = std::move(*m);
    vmm::DirtyBitmap missing(16);
    missing.Set(2);
    missing.Set(3);
    ASSERT_TRUE(disk_
                    ->ExpectChunks(
                        missing,
                        [this](uint64_t chunk) {
                          std::lock_guard<std::mutex> lock(mu_);
                          asked_.push_back(chunk);
                        },
                        testing::ScaledMs(60))
                    .ok());
  }
  void TearDown() override {
    disk_->AbandonChunks();
    for (auto& t : threads_) t.join();
  }
  // Runs one command (`sectors` from `sector`) on a thread; `done` gets its result.
  void Command(uint32_t op, uint64_t sector, uint32_t sectors, absl::Status& result,
               std::atomic<bool>& done) {
    rml_block_cmd cmd{op, sectors, sector, 1, 0};
    memory_->Write(RML_BLOCK_CMD_GPA, &cmd, sizeof(cmd));
    threads_.emplace_back([this, &result, &done] {
      result = disk_->OnDoorbell(*memory_);
      done = true;
    });
  }
  int32_t CommandStatus() {
    rml_block_cmd cmd;
    std::memcpy(&cmd, memory_->data() + RML_BLOCK_CMD_GPA, sizeof(cmd));
    return cmd.status;
  }
  std::vector<uint64_t> Asked() {
    std::lock_guard<std::mutex> lock(mu_);
    return asked_;
  }
  std::string Chunk(uint8_t fill) { return std::string(vmm::kDiskChunkBytes, fill); }
  std::string ImageBytes(uint64_t offset, uint64_t length) {
    std::string b(length, '\0');
    EXPECT_EQ(::pread(disk_->fd(), b.data(), length, offset), static_cast<ssize_t>(length));
    return b;
  }

  testing::TempDir dir_;
  std::unique_ptr<vmm::BlockDevice> disk_;
  std::unique_ptr<vmm::GuestMemory> memory_;
  std::mutex mu_;
  std::vector<uint64_t> asked_;
  std::vector<std::thread> threads_;
};

TEST_F(MissingChunksTest, AReadWaitsForItsChunkAndGetsExactlyIt) {
  absl::Status result;
  std::atomic<bool> done{false};
  // Sectors 250-259: the end of chunk 1 (here) and the start of chunk 2 (missing).
  Command(RML_BLOCK_READ, 250, 10, result, done);
  ASSERT_TRUE(WaitUntil([&] { return !Asked().empty(); }, 30));
  EXPECT_EQ(Asked(), std::vector<uint64_t>{2});
  EXPECT_FALSE(done.load());
  ASSERT_TRUE(disk_->PlaceChunk(2, Chunk(0x21)).ok());
  ASSERT_TRUE(WaitUntil([&] { return done.load(); }, 30));
  ASSERT_TRUE(result.ok()) << result;
  EXPECT_EQ(CommandStatus(), 0);
  const uint8_t* buf = memory_->data() + RML_BLOCK_BUF_GPA;
  for (int i = 0; i < 6 * 512; i++) ASSERT_EQ(buf[i], 0x5a) << i;
  for (int i = 6 * 512; i < 10 * 512; i++) ASSERT_EQ(buf[i], 0x21) << i;
  EXPECT_EQ(disk_->missing_chunks(), 1u);
}

TEST_F(MissingChunksTest, AWriteLandsOnTheChunkThatArrivedNotUnderIt) {
  absl::Status result;
  std::atomic<bool> done{false};
  std::vector<uint8_t> sector(512, 0xee);
  memory_->Write(RML_BLOCK_BUF_GPA, sector.data(), sector.size());
  Command(RML_BLOCK_WRITE, 3 * 128 + 5, 1, result, done);  // sector 5 of chunk 3
  ASSERT_TRUE(WaitUntil([&] { return !Asked().empty(); }, 30));
  EXPECT_EQ(Asked(), std::vector<uint64_t>{3});
  ASSERT_TRUE(disk_->PlaceChunk(3, Chunk(0x33)).ok());
  ASSERT_TRUE(WaitUntil([&] { return done.load(); }, 30));
  ASSERT_TRUE(result.ok()) << result;
  std::string expected = Chunk(0x33);
  std::fill(expected.begin() + 5 * 512, expected.begin() + 6 * 512, '\xee');
  EXPECT_EQ(ImageBytes(3 * vmm::kDiskChunkBytes, vmm::kDiskChunkBytes), expected);
}

TEST_F(MissingChunksTest, AChunkPastTheDiskOfTheWrongSizeOrHereAlreadyIsRefused) {
  EXPECT_EQ(disk_->PlaceChunk(16, Chunk(1)).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(disk_->PlaceChunk(2, "short").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(disk_->PlaceChunk(0, Chunk(1)).code(), absl::StatusCode::kAlreadyExists);
  ASSERT_TRUE(disk_->PlaceChunk(2, Chunk(2)).ok());
  EXPECT_EQ(disk_->PlaceChunk(2, Chunk(9)).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(ImageBytes(0, vmm::kDiskChunkBytes), std::string(vmm::kDiskChunkBytes, '\x5a'));
  EXPECT_EQ(ImageBytes(2 * vmm::kDiskChunkBytes, vmm::kDiskChunkBytes), Chunk(2));
  EXPECT_EQ(disk_->missing_chunks(), 1u);
}

TEST_F(MissingChunksTest, ACommandWaitingForAChunkThatWillNeverComeFailsSayingSo) {
  absl::Status result;
  std::atomic<bool> done{false};
  std::memset(memory_->data() + RML_BLOCK_BUF_GPA, 0x77, 512);
  Command(RML_BLOCK_READ, 2 * 128, 1, result, done);
  ASSERT_TRUE(WaitUntil([&] { return !Asked().empty(); }, 30));
  disk_->AbandonChunks();  // the source is gone
  ASSERT_TRUE(WaitUntil([&] { return done.load(); }, 30));
  EXPECT_EQ(result.code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(result.message().find("2 chunks of the disk are missing"), std::string::npos) << result;
  EXPECT_EQ(memory_->data()[RML_BLOCK_BUF_GPA], 0x77);  // nothing was read in its place
}

}  // namespace
}  // namespace romulus::missing_pages_test
