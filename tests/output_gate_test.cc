#include "vmm/output_gate.h"

#include <gtest/gtest.h>

#include <vector>

namespace romulus {
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

}  // namespace
}  // namespace romulus
