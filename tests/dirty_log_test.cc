// The harvest reports every page the guest or the monitor wrote, and nothing else.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "tests/test_util.h"
#include "vmm/vmm.h"

namespace romulus::dirty_log_test {
namespace {

using testing::TempDir;
constexpr uint64_t kWorkloadFirstPage = RML_WORKLOAD_GPA / vmm::kPageSize;

void WaitForPages(vmm::Vm& vm, uint64_t pages) {
  auto deadline = std::chrono::steady_clock::now() + testing::Scaled(20);
  while (vm.guest_status().workload_pages < pages && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));  // polling the guest's counter
  }
  ASSERT_EQ(vm.guest_status().workload_pages, pages);
}

class VmDirtyLog : public testing::PlatformTest {};

TEST_P(VmDirtyLog, SequentialWritesAreReportedExactly) {
  TempDir dir;
  constexpr uint64_t kWs = 300;
  auto vm = testing::BootTestVm(platform(), dir,
                                {.working_set_pages = 1000,
                                 .write_rate = 0,
                                 .write_limit = kWs,
                                 .pattern = RML_PATTERN_SEQUENTIAL});
  ASSERT_NE(vm, nullptr);
  ASSERT_TRUE(vm->HarvestDirty().ok());  // forget what the loader wrote
  ASSERT_TRUE(vm->Start().ok());
  WaitForPages(*vm, kWs);
  ASSERT_TRUE(vm->Pause().ok());
  auto dirty = vm->HarvestDirty();
  ASSERT_TRUE(dirty.ok()) << dirty.status();
  // In the workload area: exactly the first kWs pages of the 1000-page working set.
  for (uint64_t p = 0; p < 1000; p++) {
    EXPECT_EQ(dirty->Test(kWorkloadFirstPage + p), p < kWs) << "workload page " << p;
  }
  // Elsewhere only pages the guest owns for its own use (stack, image, data, device pages), and
  // its page tables, where the CPU sets accessed/dirty bits as the workload touches new pages.
  dirty->ForEach([&](uint64_t page) {
    uint64_t gpa = page * vmm::kPageSize;
    bool allowed = gpa >= RML_WORKLOAD_GPA || (gpa >= RML_PML4_GPA && gpa < RML_GDT_GPA) ||
                   (gpa >= RML_BOOT_GPA && gpa < 0x40000) ||
                   (gpa >= 0x80000 && gpa < RML_IMAGE_LIMIT);
    EXPECT_TRUE(allowed) << "unexpected dirty page at gpa 0x" << std::hex << gpa;
  });
  // Nothing ran since: the next harvest is empty.
  auto empty = vm->HarvestDirty();
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(empty->Count(), 0u);
}

TEST_P(VmDirtyLog, EveryChangedPageIsReportedIncludingMonitorWrites) {
  TempDir dir;
  constexpr uint64_t kWs = 4096, kFirst = 2000, kSecond = 6000;
  auto vm = testing::BootTestVm(platform(), dir,
                                {.working_set_pages = kWs,
                                 .write_rate = 0,
                                 .write_limit = kFirst,
                                 .pattern = RML_PATTERN_UNIFORM});
  ASSERT_NE(vm, nullptr);
  ASSERT_TRUE(vm->Start().ok());
  WaitForPages(*vm, kFirst);
  ASSERT_TRUE(vm->Pause().ok());
  ASSERT_TRUE(vm->HarvestDirty().ok());
  std::vector<uint8_t> before(vm->memory().data(), vm->memory().data() + vm->memory().size());

  // Let the workload go on (the limit lives in guest memory) and ask the ledger something, so
  // that the monitor writes the request ring and the response ring's tail.
  uint64_t limit = kSecond;
  vm->memory().Write(RML_BOOT_GPA + offsetof(rml_boot, write_limit), &limit, sizeof(limit));
  rml_request req{};
  req.client_id = 7;
  req.request_id = 1;
  req.op = RML_OP_OPEN;
  std::atomic<bool> answered{false};
  vm->ledger().SetResponseSink([&](const rml_response&) { answered = true; });
  ASSERT_TRUE(vm->ledger().Submit(req).ok());
  ASSERT_TRUE(vm->Resume().ok());
  WaitForPages(*vm, kSecond);
  auto deadline = std::chrono::steady_clock::now() + testing::Scaled(10);
  while (vm->guest_status().ledger_requests < 1 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));  // polling the guest's counter
  }
  ASSERT_TRUE(vm->Pause().ok());
  EXPECT_TRUE(answered);
  auto dirty = vm->HarvestDirty();
  ASSERT_TRUE(dirty.ok());

  uint64_t changed = 0;
  for (uint64_t page = 0; page < vm->memory().pages(); page++) {
    bool differs = std::memcmp(before.data() + page * vmm::kPageSize,
                               vm->memory().data() + page * vmm::kPageSize, vmm::kPageSize) != 0;
    changed += differs;
    if (differs) {
      EXPECT_TRUE(dirty->Test(page)) << "changed page " << page << " not reported";
    }
    // Every workload write stores a new counter value, so there dirty means changed.
    if (page >= kWorkloadFirstPage) {
      EXPECT_EQ(dirty->Test(page), differs) << "page " << page;
    }
  }
  EXPECT_GT(changed, 100u);
  EXPECT_TRUE(dirty->Test(RML_REQ_RING_GPA / vmm::kPageSize));   // written by the monitor
  EXPECT_TRUE(dirty->Test(RML_RESP_RING_GPA / vmm::kPageSize));  // written by the guest
}

ROMULUS_ON_EVERY_PLATFORM(VmDirtyLog);

}  // namespace
}  // namespace romulus::dirty_log_test
