// Every piece of VM state survives Save -> Restore -> Save unchanged.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "google/protobuf/util/message_differencer.h"
#include "tests/test_util.h"
#include "vmm/vmm.h"

namespace romulus::state_roundtrip_test {
namespace {

using google::protobuf::util::MessageDifferencer;
using testing::TempDir;

class VmStateRoundTrip : public testing::PlatformTest {};

TEST_P(VmStateRoundTrip, VcpuClockAndDevicesSurviveSnapshotRestore) {
  TempDir dir;
  auto vm = testing::BootTestVm(platform(), dir,
                                {.working_set_pages = 256,
                                 .write_rate = 0,
                                 .write_limit = 5000,
                                 .pattern = RML_PATTERN_UNIFORM});
  ASSERT_NE(vm, nullptr);
  ASSERT_TRUE(vm->Start().ok());
  testing::RunGuestUntil(*vm, 5000, 20);
  auto saved = vm->SaveState();
  ASSERT_TRUE(saved.ok()) << saved.status();
  auto info = vm->SaveSnapshot(dir.File("snap"));
  ASSERT_TRUE(info.ok()) << info.status();
  ASSERT_TRUE(vm->Stop().ok());

  auto restored = vmm::Vm::Restore(dir.File("snap"), dir.File("disk2.img"), nullptr);
  ASSERT_TRUE(restored.ok()) << restored.status();
  auto again = (*restored)->SaveState();
  ASSERT_TRUE(again.ok()) << again.status();

  EXPECT_EQ(saved->platform(), platform());
  // State moves only within its platform: the other one refuses it, saying why.
  EXPECT_TRUE(vmm::CheckResumable(*saved, platform()).ok());
  pb::Platform other = platform() == pb::KVM ? pb::PROCESS : pb::KVM;
  absl::Status refused = vmm::CheckResumable(*saved, other);
  EXPECT_FALSE(refused.ok());
  EXPECT_NE(refused.message().find(absl::StrCat("saved by the ", platform_name(),
                                                " platform and this host runs the ",
                                                vmm::PlatformName(other), " platform")),
            absl::string_view::npos)
      << refused;
  EXPECT_EQ(again->platform(), platform());
  ASSERT_EQ(again->vcpus_size(), 1);
  if (platform() == pb::KVM) {
    const pb::KvmVcpuState& a = saved->vcpus(0).kvm();
    const pb::KvmVcpuState& b = again->vcpus(0).kvm();
    EXPECT_EQ(a.regs(), b.regs());
    EXPECT_EQ(a.sregs(), b.sregs());
    EXPECT_EQ(a.xsave(), b.xsave());
    EXPECT_EQ(a.xcrs(), b.xcrs());
    EXPECT_EQ(a.debugregs(), b.debugregs());
    EXPECT_EQ(a.events(), b.events());
    EXPECT_EQ(a.mp_state(), b.mp_state());
    EXPECT_EQ(a.cpuid_size(), b.cpuid_size());
    for (int i = 0; i < a.cpuid_size() && i < b.cpuid_size(); i++) {
      EXPECT_TRUE(MessageDifferencer::Equals(a.cpuid(i), b.cpuid(i))) << "CPUID entry " << i;
    }
    ASSERT_EQ(a.msrs_size(), b.msrs_size());
    constexpr uint32_t kTsc = 0x10;  // time moves on: compared below as "not earlier"
    for (int i = 0; i < a.msrs_size(); i++) {
      EXPECT_EQ(a.msrs(i).index(), b.msrs(i).index());
      if (a.msrs(i).index() == kTsc) {
        EXPECT_GE(b.msrs(i).value(), a.msrs(i).value());
      }
    }
    EXPECT_GE(again->clock().clock_ns(), saved->clock().clock_ns());
  } else {
    const pb::ProcessVcpuState& a = saved->vcpus(0).process();
    const pb::ProcessVcpuState& b = again->vcpus(0).process();
    EXPECT_FALSE(a.regs().empty());
    EXPECT_FALSE(a.xsave().empty());
    EXPECT_EQ(a.regs(), b.regs());
    EXPECT_EQ(a.xsave(), b.xsave());
    EXPECT_TRUE(MessageDifferencer::Equals(a, b));
  }
  EXPECT_TRUE(MessageDifferencer::Equals(saved->devices().console(), again->devices().console()));
  EXPECT_TRUE(MessageDifferencer::Equals(saved->devices().block(), again->devices().block()));
  EXPECT_TRUE(MessageDifferencer::Equals(saved->devices().idle(), again->devices().idle()));
  EXPECT_EQ(saved->devices().ledger().responses_seen(), again->devices().ledger().responses_seen());
  // Tags handed out after a restore never collide with ones still in the restored rings.
  EXPECT_GT(again->devices().ledger().next_tag(), saved->devices().ledger().next_tag());
  // Guest memory restored is the memory captured.
  EXPECT_EQ((*restored)->memory().Digest(), info->memory_xxh3);
  EXPECT_EQ((*restored)->guest_status().workload_pages, 5000u);
}

ROMULUS_ON_EVERY_PLATFORM(VmStateRoundTrip);

}  // namespace
}  // namespace romulus::state_roundtrip_test
