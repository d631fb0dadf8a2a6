// The nemesis's short schedule (scripts/nemesis.sh runs long ones): romulus_nemesis with a fixed
// seed, a few rounds of faults on real `romulus` processes, on each platform. It must run every
// round, print its table and the summary line, and exit non-zero exactly when it found
// violations.
//
// Strict: any violation fails it. Before authority had terms (issue 26), this seed broke the
// invariants in some runs: round 8 on the process platform (the witness frozen 1.4 s, then
// stress-ng) made both hosts release answers and the ledger's sequence went back by about 20000.
// ROMULUS_NEMESIS_LENIENT=1 in the environment prints violations instead of failing on them (to
// look at a run of a change that is known to break them).
#include <gtest/gtest.h>

#include <cstdlib>
#include <iostream>
#include <regex>

#include "absl/strings/str_cat.h"
#include "cli/process.h"
#include "tests/test_util.h"

namespace romulus::nemesis_test {
namespace {

constexpr int kRounds = 8;
constexpr int kSeed = 7;

bool Strict() {
  const char* env = std::getenv("ROMULUS_NEMESIS_LENIENT");
  return !(env && std::string(env) == "1");
}

class VmNemesis : public testing::PlatformTest {};

TEST_P(VmNemesis, AShortScheduleBreaksNothing) {
  if (testing::kSanitized) {
    GTEST_SKIP() << "the nemesis runs the release build's processes (its rounds take minutes in "
                    "a sanitizer build)";
  }
  testing::TempDir dir;
  auto p = cli::Process::Start(
      ROMULUS_NEMESIS_BINARY,
      {"--rounds", std::to_string(kRounds), "--seed", std::to_string(kSeed), "--platform",
       platform_name(), "--binary", ROMULUS_BINARY, "--dir", dir.path()});
  ASSERT_TRUE(p.ok()) << p.status();
  auto last =
      (*p)->WaitForLine("nemesis: " + std::to_string(kRounds) + " rounds", testing::ScaledMs(600));
  ASSERT_TRUE(last.ok()) << last.status() << "\n" << (*p)->output();
  auto code = (*p)->Wait(testing::ScaledMs(60));
  ASSERT_TRUE(code.has_value());
  std::smatch m;
  std::regex summary(
      "nemesis: (\\d+) rounds, (\\d+) violations, (\\d+) unrecovered, seed (\\d+), platform "
      "(\\w+)");
  ASSERT_TRUE(std::regex_search(*last, m, summary)) << *last;
  int violations = std::stoi(m[2]), unrecovered = std::stoi(m[3]);
  EXPECT_EQ(std::stoi(m[4]), kSeed);
  EXPECT_EQ(m[5].str(), platform_name());
  // One row in the table per round.
  std::string out = (*p)->output();
  int rows = 0;
  for (int r = 1; r <= kRounds; r++) {
    if (std::regex_search(out, std::regex(absl::StrCat("\\n", r, " +\\| ")))) rows++;
  }
  EXPECT_EQ(rows, kRounds) << out;
  // The exit status says whether anything was violated.
  EXPECT_EQ(*code, violations > 0 ? 1 : 0) << out;
  // The harness brought the cluster back after at least one round.
  EXPECT_LT(unrecovered, kRounds) << out;
  if (Strict()) {
    EXPECT_EQ(violations, 0) << out;
  } else if (violations > 0) {
    std::cout << "nemesis (lenient, see the comment at the top): " << *last << "\n" << out;
  }
}

ROMULUS_ON_EVERY_PLATFORM(VmNemesis);

}  // namespace
}  // namespace romulus::nemesis_test
