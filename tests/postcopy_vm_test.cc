// A guest resumed before its memory has arrived (post-copy) runs exactly as it would have on all
// of it: every page it touches that is still missing is fetched on demand (here from a copy in
// this process), the rest arrives in the background, and what the guest's deterministic workload
// leaves in memory equals what the same guest left running on at the source.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <mutex>
#include <thread>
#include <vector>

#include "tests/test_util.h"
#include "vmm/missing_pages.h"
#include "vmm/vmm.h"

namespace romulus::postcopy_vm_test {
namespace {

using testing::TempDir;
using vmm::kPageSize;

constexpr uint64_t kWorkingSet = 2048;  // 8 MiB of the guest's 64 MiB
constexpr uint64_t kLimit = 200'000;    // workload writes, then the guest only idles
// Paced, so that the pause at a tenth leaves most of the workload to the destination (unpaced, the
// guest can do it all between two looks at its counter).
constexpr uint64_t kWriteRate = 1'000'000;  // pages/s

// Lets the guest run until it has done `pages` workload writes (bounded), then pauses it.
void RunUntilPages(vmm::Vm& vm, uint64_t pages) {
  auto deadline = std::chrono::steady_clock::now() + testing::Scaled(60);
  while (vm.guest_status().workload_pages < pages && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));  // polling the guest's counter
  }
  ASSERT_GE(vm.guest_status().workload_pages, pages);
  ASSERT_TRUE(vm.Pause().ok());
}

std::vector<uint8_t> WorkloadRegion(vmm::GuestMemory& memory) {
  const uint8_t* p = memory.data() + RML_WORKLOAD_GPA;
  return {p, p + kWorkingSet * kPageSize};
}

// Answers the destination's demand faults from `source`, on a thread of its own, as the source
// host will over the network.
class PageServer {
 public:
  explicit PageServer(const std::vector<uint8_t>& source) : source_(source) {}
  ~PageServer() { Stop(); }
  void OnFault(uint64_t gfn) {
    std::lock_guard<std::mutex> lock(mu_);
    asked_.push_back(gfn);
    cv_.notify_all();
  }
  void Serve(vmm::MissingPages& pages) {
    thread_ = std::thread([this, &pages] {
      std::unique_lock<std::mutex> lock(mu_);
      while (!stop_) {
        if (asked_.empty()) {
          cv_.wait(lock);
          continue;
        }
        uint64_t gfn = asked_.front();
        asked_.pop_front();
        lock.unlock();
        absl::Status s = pages.Place(gfn, source_.data() + gfn * kPageSize);
        lock.lock();
        // The background stream may have placed it first.
        if (s.ok() || absl::IsAlreadyExists(s)) {
          served_++;
        } else {
          errors_.push_back(std::string(s.message()));
        }
      }
    });
  }
  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }
  uint64_t served() {
    std::lock_guard<std::mutex> lock(mu_);
    return served_;
  }
  std::vector<std::string> errors() {
    std::lock_guard<std::mutex> lock(mu_);
    return errors_;
  }

 private:
  const std::vector<uint8_t>& source_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<uint64_t> asked_;
  bool stop_ = false;
  uint64_t served_ = 0;
  std::vector<std::string> errors_;
  std::thread thread_;
};

class VmPostCopy : public testing::PlatformTest {};

TEST_P(VmPostCopy, AGuestResumedBeforeItsMemoryArrivedRunsExactlyAsAtTheSource) {
  TempDir dir;
  auto source = testing::BootTestVm(platform(), dir,
                                    {.working_set_pages = kWorkingSet,
                                     .write_rate = kWriteRate,
                                     .write_limit = kLimit,
                                     .seed = 7});
  ASSERT_NE(source, nullptr);
  ASSERT_TRUE(source->Start().ok());
  RunUntilPages(*source, kLimit / 10);
  // Most of the workload is left for the destination: it runs on pages it has to fetch.
  ASSERT_LT(source->guest_status().workload_pages, kLimit / 2);

  // What the source sends when the VM moves: its state, and its memory (to be fetched).
  auto state = source->SaveState();
  ASSERT_TRUE(state.ok()) << state.status();
  vmm::GuestMemory& src = source->memory();
  std::vector<uint8_t> memory(src.data(), src.data() + src.size());
  std::filesystem::copy_file(dir.File("disk.img"), dir.File("dest-disk.img"));

  // The source runs on: what its workload leaves is what the destination's must leave.
  ASSERT_TRUE(source->Resume().ok());
  RunUntilPages(*source, kLimit);
  auto expected = WorkloadRegion(source->memory());
  ASSERT_TRUE(source->Stop().ok());
  source.reset();

  // The destination holds the pages below RML_IMAGE_GPA (they travel with the state); every
  // other page that is not zero is missing, the guest's code and data among them.
  auto dest_memory = vmm::GuestMemory::CreateMemfd(memory.size());
  ASSERT_TRUE(dest_memory.ok()) << dest_memory.status();
  std::memcpy((*dest_memory)->data(), memory.data(), RML_IMAGE_GPA);
  vmm::DirtyBitmap missing(memory.size() / kPageSize);
  std::vector<uint8_t> zero(kPageSize, 0);
  for (uint64_t gfn = RML_IMAGE_GPA / kPageSize; gfn < missing.pages(); gfn++) {
    if (std::memcmp(memory.data() + gfn * kPageSize, zero.data(), kPageSize) != 0) missing.Set(gfn);
  }
  uint64_t missing_pages = missing.Count();
  ASSERT_GT(missing_pages, kWorkingSet / 2);

  PageServer server(memory);
  auto dest =
      vmm::Vm::Adopt(std::move(*dest_memory), *state, dir.File("dest-disk.img"), nullptr, nullptr,
                     vmm::Vm::PostCopy{.missing = missing,
                                       .on_fault = [&](uint64_t gfn) { server.OnFault(gfn); }});
  ASSERT_TRUE(dest.ok()) << dest.status();
  vmm::MissingPages* pages = (*dest)->missing_pages();
  ASSERT_NE(pages, nullptr);
  server.Serve(*pages);
  ASSERT_TRUE((*dest)->Start().ok());

  // The guest runs on demand faults alone until it has asked for a few dozen pages; then the
  // rest streams in beside it, in address order.
  ASSERT_TRUE(testing::WaitUntil([&] { return pages->stats().faults >= 32; }, 60))
      << pages->stats().faults << " faults, " << server.served() << " served; the VM "
      << ((*dest)->exited() ? "exited: " + std::string((*dest)->Wait().message()) : "runs")
      << "; guest workload " << (*dest)->guest_status().workload_pages;
  uint64_t streamed = 0;
  for (uint64_t gfn = 0; gfn < missing.pages(); gfn++) {
    if (!missing.Test(gfn)) continue;
    absl::Status s = pages->Place(gfn, memory.data() + gfn * kPageSize);
    if (s.ok()) {
      streamed++;
    } else {
      ASSERT_TRUE(absl::IsAlreadyExists(s)) << s;  // fetched on demand meanwhile
    }
  }
  EXPECT_TRUE(pages->complete());
  RunUntilPages(**dest, kLimit);
  server.Stop();
  EXPECT_TRUE(server.errors().empty()) << server.errors().front();

  auto stats = pages->stats();
  std::printf(
      "post-copy on %s: %lu pages missing at resume, %lu fetched on demand (wait p50 %.1f us, "
      "p99 %.1f us), %lu streamed\n",
      platform_name().c_str(), missing_pages, stats.faults,
      std::chrono::duration<double, std::micro>(stats.wait_p50).count(),
      std::chrono::duration<double, std::micro>(stats.wait_p99).count(), streamed);
  EXPECT_EQ(stats.placed, missing_pages);
  EXPECT_GE(server.served(), 32u);
  EXPECT_EQ(WorkloadRegion((*dest)->memory()), expected)
      << "the guest's workload left different memory after post-copy";
  EXPECT_EQ((*dest)->guest_status().workload_pages, kLimit);
}

// The source died: the pages it held will never come. A guest waiting for one is stopped, and it
// never ran on anything in place of the page.
TEST_P(VmPostCopy, AGuestWaitingForAPageThatNeverComesIsStopped) {
  TempDir dir;
  auto source = testing::BootTestVm(platform(), dir, {.working_set_pages = kWorkingSet});
  ASSERT_NE(source, nullptr);
  ASSERT_TRUE(source->Start().ok());
  RunUntilPages(*source, 1000);
  auto state = source->SaveState();
  ASSERT_TRUE(state.ok()) << state.status();
  uint64_t at_pause = source->guest_status().workload_pages;
  auto memory = vmm::GuestMemory::CreateMemfd(source->memory().size());
  ASSERT_TRUE(memory.ok());
  std::memcpy((*memory)->data(), source->memory().data(), RML_IMAGE_GPA);
  ASSERT_TRUE(source->Stop().ok());
  source.reset();
  vmm::DirtyBitmap missing((*memory)->pages());
  for (uint64_t gfn = RML_IMAGE_GPA / kPageSize; gfn < missing.pages(); gfn++) missing.Set(gfn);

  std::atomic<uint64_t> faults{0};
  auto dest = vmm::Vm::Adopt(
      std::move(*memory), *state, dir.File("disk.img"), nullptr, nullptr,
      vmm::Vm::PostCopy{.missing = missing, .on_fault = [&](uint64_t) { faults++; }});
  ASSERT_TRUE(dest.ok()) << dest.status();
  ASSERT_TRUE((*dest)->Start().ok());
  ASSERT_TRUE(testing::WaitUntil([&] { return faults.load() >= 1; }, 30));
  // It waits in the fault; a pause takes it out (the instruction restarts on resume), and so
  // does a stop.
  ASSERT_TRUE((*dest)->Pause().ok());
  EXPECT_EQ((*dest)->guest_status().workload_pages, at_pause);
  ASSERT_TRUE((*dest)->Stop().ok());
  EXPECT_TRUE((*dest)->exited());
  EXPECT_EQ((*dest)->guest_status().workload_pages, at_pause);
  EXPECT_EQ(faults.load(), 1u);  // its first instruction's page, and nothing after it
  EXPECT_EQ((*dest)->missing_pages()->stats().missing, missing.Count());
}

TEST_P(VmPostCopy, PagesTheMonitorReadsAsItResumesMustNotBeMissing) {
  TempDir dir;
  auto source = testing::BootTestVm(platform(), dir);
  ASSERT_NE(source, nullptr);
  auto state = source->SaveState();
  ASSERT_TRUE(state.ok()) << state.status();
  auto memory = vmm::GuestMemory::CreateMemfd(source->memory().size());
  ASSERT_TRUE(memory.ok());
  vmm::DirtyBitmap missing((*memory)->pages());
  missing.Set(RML_BOOT_GPA / kPageSize);
  auto dest = vmm::Vm::Adopt(std::move(*memory), *state, dir.File("disk.img"), nullptr, nullptr,
                             vmm::Vm::PostCopy{.missing = missing, .on_fault = nullptr});
  ASSERT_FALSE(dest.ok());
  EXPECT_NE(dest.status().message().find("travel with the state"), std::string::npos)
      << dest.status();
}

ROMULUS_ON_EVERY_PLATFORM(VmPostCopy);

}  // namespace
}  // namespace romulus::postcopy_vm_test
