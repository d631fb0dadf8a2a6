#include "cli/args.h"

#include <gtest/gtest.h>

#include "tests/test_util.h"

namespace romulus::args_test {
namespace {

TEST(Args, SizesTakeSuffixes) {
  uint64_t v = 0;
  ASSERT_TRUE(cli::ParseSize("256M", &v).ok());
  EXPECT_EQ(v, 256ull << 20);
  ASSERT_TRUE(cli::ParseSize("4G", &v).ok());
  EXPECT_EQ(v, 4ull << 30);
  EXPECT_FALSE(cli::ParseSize("12Q", &v).ok());
  EXPECT_FALSE(cli::ParseSize("", &v).ok());
  EXPECT_FALSE(cli::ParseSize("99999999999999999999G", &v).ok());
}

// A whole-number option shows its default in --help (and so in romulus(8)), unless the command
// marks it "not given" with UINT64_MAX: then it has no default to show.
TEST(Args, HelpShowsDefaultsButNotTheNotGivenMark) {
  uint64_t set = 25, unset = UINT64_MAX;
  cli::Args args("t", "test");
  args.Uint("epoch-ms", &set, "an epoch");
  args.Uint("rounds", &unset, "rounds, when given");
  std::string help = args.Help();
  EXPECT_NE(help.find("an epoch [25]"), std::string::npos) << help;
  EXPECT_NE(help.find("rounds, when given\n"), std::string::npos) << help;
  EXPECT_EQ(help.find("18446744073709551615"), std::string::npos) << help;
}

TEST(Args, ParsesOptionsAndRefusesUnknownOnes) {
  uint64_t n = 1;
  std::string s = "x";
  bool b = false;
  cli::Args args("t", "test");
  args.Uint("n", &n, "a number");
  args.String("s", &s, "a string");
  args.Bool("b", &b, "a flag");
  const char* ok[] = {"--n", "5", "--s=hello", "--b"};
  ASSERT_TRUE(args.Parse(4, const_cast<char**>(ok)).ok());
  EXPECT_EQ(n, 5u);
  EXPECT_EQ(s, "hello");
  EXPECT_TRUE(b);
  const char* unknown[] = {"--nope"};
  EXPECT_FALSE(args.Parse(1, const_cast<char**>(unknown)).ok());
  const char* missing[] = {"--n"};
  EXPECT_FALSE(args.Parse(1, const_cast<char**>(missing)).ok());
  const char* bad[] = {"--n", "five"};
  EXPECT_FALSE(args.Parse(2, const_cast<char**>(bad)).ok());
  EXPECT_NE(args.Help().find("--n VALUE"), std::string::npos);
}

// Every subcommand starts the same way: --help prints its options and exits 0; a usage error
// (an unknown option, a missing required one) is one line, "romulus COMMAND: what (see romulus
// COMMAND --help)", and exit code 2, before anything runs.
TEST(Args, EverySubcommandSharesOnePrologue) {
  struct Case {
    const char* command;
    std::vector<std::string> missing_required;  // arguments that leave a required option out
  };
  const Case cases[] = {{"vm", {"--pattern", "zigzag"}},
                        {"load", {"--target", "nowhere"}},
                        {"journal", {}},
                        {"primary", {}},
                        {"mirror", {}},
                        {"demo", {"--seconds", "1"}},
                        {"status", {}},
                        {"promote", {}},
                        {"migrate", {}},
                        {"witness", {}},
                        {"proxy", {}}};
  for (const Case& c : cases) {
    SCOPED_TRACE(c.command);
    testing::Child help({c.command, "--help"});
    EXPECT_EQ(help.Wait(30), 0);
    EXPECT_NE(help.output().find("usage: romulus " + std::string(c.command)), std::string::npos)
        << help.output();
    for (const std::vector<std::string>& args :
         {std::vector<std::string>{"--no-such-option"}, c.missing_required}) {
      std::vector<std::string> argv = {c.command};
      argv.insert(argv.end(), args.begin(), args.end());
      testing::Child bad(argv);
      EXPECT_EQ(bad.Wait(30), 2) << bad.output();
      std::string out = bad.output();
      EXPECT_EQ(out.rfind("romulus " + std::string(c.command) + ": ", 0), 0u) << out;
      EXPECT_NE(out.find("(see romulus " + std::string(c.command) + " --help)\n"),
                std::string::npos)
          << out;
      EXPECT_EQ(out.find('\n'), out.size() - 1) << "more than one line: " << out;
    }
  }
}

}  // namespace
}  // namespace romulus::args_test
