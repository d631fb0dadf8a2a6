#include "cli/config.h"

#include <gtest/gtest.h>

#include <fstream>

#include "tests/test_util.h"

namespace romulus {
namespace {

std::string Write(const testing::TempDir& dir, const std::string& text) {
  std::string path = dir.File("x.conf");
  std::ofstream(path, std::ios::trunc) << text;
  return path;
}

TEST(Config, AGoodPrimaryConfigGetsDefaults) {
  testing::TempDir dir;
  auto c = cli::LoadPrimaryConfig(Write(dir, R"(
    vm_id: "ledger-1"
    disk: "/tmp/d.img"
    mirror: "10.0.0.2:7400"
    psk_file: "/etc/romulus/key"
  )"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->epoch_ms(), 25u);
  EXPECT_EQ(c->memory_mib(), 256u);
  EXPECT_EQ(c->ledger_port(), 7070u);
  EXPECT_EQ(c->compression(), "lz4");
}

TEST(Config, AnUnknownCompressionNamesItsLine) {
  testing::TempDir dir;
  std::string path = Write(dir,
                           "vm_id: \"a\"\ndisk: \"d\"\nmirror: \"m:1\"\npsk_file: \"k\"\n"
                           "compression: \"zip\"\n");
  auto c = cli::LoadPrimaryConfig(path);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find(path + ":5: compression"), absl::string_view::npos)
      << c.status();
}

TEST(Config, SyntaxErrorsNameFileAndLine) {
  testing::TempDir dir;
  std::string path = Write(dir, "vm_id: \"a\"\nnot_a_field: 3\n");
  auto c = cli::LoadPrimaryConfig(path);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find(path + ":2:"), absl::string_view::npos) << c.status();
  EXPECT_NE(c.status().message().find("not_a_field"), absl::string_view::npos) << c.status();
}

TEST(Config, BadValuesNameFileLineAndField) {
  testing::TempDir dir;
  std::string path = Write(dir, R"(vm_id: "a"
disk: "d"
mirror: "m:1"
psk_file: "k"
epoch_ms: 2
)");
  auto c = cli::LoadPrimaryConfig(path);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find(path + ":5: epoch_ms"), absl::string_view::npos)
      << c.status();
  auto m = cli::LoadMirrorConfig(Write(dir, "vm_id: \"a\"\nport: 70000\n"));
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find(":2: port"), absl::string_view::npos) << m.status();
  EXPECT_FALSE(cli::LoadMirrorConfig(dir.File("missing.conf")).ok());
  // Where a host replicates once it is the primary is an address, like the primary's mirror.
  auto r = cli::LoadMirrorConfig(Write(dir,
                                       "vm_id: \"a\"\nport: 7000\npsk_file: \"k\"\nreplica_disk: "
                                       "\"r\"\nreplicate_to: \"nowhere\"\n"));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find(":5: replicate_to: must be HOST:PORT"),
            absl::string_view::npos)
      << r.status();
  auto good =
      cli::LoadMirrorConfig(Write(dir,
                                  "vm_id: \"a\"\nport: 7000\npsk_file: \"k\"\nreplica_disk: "
                                  "\"r\"\nreplicate_to: \"127.0.0.1:7001\"\n"));
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_EQ(good->epoch_ms(), 25u);
  EXPECT_EQ(good->compression(), "lz4");
}

}  // namespace
}  // namespace romulus
