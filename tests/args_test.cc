#include "cli/args.h"

#include <gtest/gtest.h>

namespace romulus {
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

}  // namespace
}  // namespace romulus
