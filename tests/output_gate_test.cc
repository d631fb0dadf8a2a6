#include "vmm/output_gate.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "guest/abi.h"
#include "vmm/console.h"

namespace romulus::output_gate_test {
namespace {

TEST(OutputGate, OpenGateDeliversAtOnce) {
  vmm::OutputGate gate;
  std::vector<int> out;
  gate.Push([&] { out.push_back(1); });
  EXPECT_EQ(out, std::vector<int>{1});
  EXPECT_EQ(gate.held(), 0u);
}

TEST(OutputGate, HeldOutputsLeaveInOrderUpToTheMark) {
  vmm::OutputGate gate;
  std::vector<int> out;
  gate.SetHolding(true);
  gate.Push([&] { out.push_back(1); });
  gate.Push([&] { out.push_back(2); });
  uint64_t mark = gate.Mark();
  gate.Push([&] { out.push_back(3); });
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(gate.held(), 3u);
  gate.ReleaseThrough(mark);
  EXPECT_EQ(out, (std::vector<int>{1, 2}));
  gate.ReleaseThrough(mark);  // releasing twice changes nothing
  EXPECT_EQ(out, (std::vector<int>{1, 2}));
  gate.SetHolding(false);
  EXPECT_EQ(out, (std::vector<int>{1, 2, 3}));
  gate.Push([&] { out.push_back(4); });
  EXPECT_EQ(out, (std::vector<int>{1, 2, 3, 4}));
}

// A primary that lost its lease delivers nothing, released or not, until the fence lifts.
TEST(OutputGate, AFencedGateDeliversNothingUntilTheFenceLifts) {
  vmm::OutputGate gate;
  std::vector<int> out;
  gate.SetHolding(true);
  gate.Push([&] { out.push_back(1); });
  gate.SetFenced(true);
  gate.Push([&] { out.push_back(2); });
  uint64_t mark = gate.Mark();
  gate.Push([&] { out.push_back(3); });
  gate.ReleaseThrough(mark);
  EXPECT_TRUE(out.empty());
  gate.SetHolding(false);  // run unprotected: still nothing while fenced
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(gate.held(), 3u);
  gate.SetHolding(true);
  gate.SetFenced(false);  // what was released before the fence lifted leaves, the rest waits
  EXPECT_EQ(out, (std::vector<int>{1, 2, 3}));
  gate.Push([&] { out.push_back(4); });
  EXPECT_EQ(out, (std::vector<int>{1, 2, 3}));
  gate.SetFenced(true);
  gate.SetHolding(false);
  EXPECT_EQ(out, (std::vector<int>{1, 2, 3}));
  gate.SetFenced(false);
  EXPECT_EQ(out, (std::vector<int>{1, 2, 3, 4}));
  gate.Push([&] { out.push_back(5); });
  EXPECT_EQ(out, (std::vector<int>{1, 2, 3, 4, 5}));
}

// Console lines are output: while the gate holds, the outside world sees none of them; a release
// up to a mark delivers exactly the lines written before it, in order.
TEST(OutputGate, ConsoleLinesWaitForTheirRelease) {
  auto mem = vmm::GuestMemory::CreateMemfd(16ull << 20);
  ASSERT_TRUE(mem.ok()) << mem.status();
  vmm::OutputGate gate;
  gate.SetHolding(true);
  std::vector<std::string> seen;
  vmm::Console console([&](absl::string_view line) { seen.emplace_back(line); }, &gate);
  auto write = [&](const std::string& bytes) {
    (*mem)->Write(RML_CONSOLE_GPA, bytes.data(), bytes.size());
    ASSERT_TRUE(console.OnOut(**mem, static_cast<uint32_t>(bytes.size())).ok());
  };
  write("epoch one\nepoch ");
  uint64_t mark = gate.Mark();
  write("two\n");
  EXPECT_TRUE(seen.empty());
  EXPECT_EQ(gate.held(), 2u);
  gate.ReleaseThrough(mark);
  EXPECT_EQ(seen, std::vector<std::string>{"epoch one"});
  gate.ReleaseThrough(gate.Mark());
  EXPECT_EQ(seen, (std::vector<std::string>{"epoch one", "epoch two"}));
  EXPECT_EQ(console.Save().bytes_written(), 20u);
}

}  // namespace
}  // namespace romulus::output_gate_test
