#include "cli/config.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "cli/config_help.h"
#include "tests/test_util.h"

namespace romulus::config_test {
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
                           "vm_id: \"a\"\ndisk: \"d\"\nmirror: \"127.0.0.1:1\"\npsk_file: \"k\"\n"
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
mirror: "127.0.0.1:1"
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
  EXPECT_NE(r.status().message().find(":5: replicate_to: 'nowhere' is not HOST:PORT"),
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

struct BadValue {
  std::string text;     // from line 4 of the config on
  int line;             // where the bad value is
  std::string message;  // what follows "FILE:LINE: "
};

// Each value is refused, naming the file, the line and the field, before anything uses it.
void ExpectRefused(bool primary, const std::vector<BadValue>& cases) {
  testing::TempDir dir;
  for (const BadValue& c : cases) {
    std::string text = "vm_id: \"a\"\npsk_file: \"k\"\n";
    text += primary ? "disk: \"d\"\n" : "replica_disk: \"r\"\n";
    text += c.text + "\n";
    if (primary && c.text.find("mirror:") == std::string::npos)
      text += "mirror: \"127.0.0.1:7400\"\n";
    if (!primary && c.text.find("port:") != 0) text += "port: 7400\n";
    std::string path = Write(dir, text);
    absl::Status s =
        primary ? cli::LoadPrimaryConfig(path).status() : cli::LoadMirrorConfig(path).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.text;
    EXPECT_EQ(s.message(), absl::StrCat(path, ":", c.line, ": ", c.message)) << c.text;
  }
}

// atoi read "7A00" as 7 and wrapped 4294974296 to 7000; MiB counts shifted into bytes wrapped
// (a max_in_flight_mib of 2^44 made the in-flight budget 0: no checkpoint was ever taken); a
// fence timeout past INT_MAX became a negative poll timeout, which waits forever.
TEST(Config, NumbersThatWouldWrapOrMisbehaveAreRefusedWithFileAndLine) {
  ExpectRefused(
      true,
      {
          {"mirror: \"mirror-b.example:7400\"", 4,
           "mirror: 'mirror-b.example' is a name, not an address: give the host's IPv4 or IPv6 "
           "address (names are not resolved)"},
          {"mirror: \"127.0.0.1:7A00\"", 4,
           "mirror: '127.0.0.1:7A00' is not HOST:PORT (a port of 1 to 65535)"},
          {"mirror: \":4294974296\"", 4,
           "mirror: ':4294974296' is not HOST:PORT (a port of 1 to 65535)"},
          {"mirror: \"127.0.0.1:0\"", 4,
           "mirror: '127.0.0.1:0' is not HOST:PORT (a port of 1 to 65535)"},
          {"disk_mib: 17592186044416", 4,
           "disk_mib: 17592186044416 is out of range: 1 to 4194304 MiB (4 TiB)"},
          {"max_in_flight_mib: 17592186044416", 4,
           "max_in_flight_mib: 17592186044416 is out of range: 1 to 65536 MiB"},
          {"epoch_ms: 4000000000", 4, "epoch_ms: 4000000000 is out of range: 5 to 1000"},
          {"ledger_port: 70000", 4, "ledger_port: 70000 is out of range: 1 to 65535"},
          {"replication_port: 65536", 4, "replication_port: 65536 is out of range: 1 to 65535"},
          {"workload {\n  write_rate: 18446744073709551615\n}", 5,
           "workload.write_rate: 18446744073709551615 is out of range: 0 to 10000000 pages/s"},
          {"memory_mib: 64\nworkload { working_set_pages: 1000000 }", 5,
           "workload.working_set_pages: working set of 1000000 pages does not fit: 64 MiB of "
           "memory leaves 15360 pages for it"},
          {"switchover {\n  node: \"a\"\n  fence_timeout_ms: 2147483648\n}", 6,
           "switchover.fence_timeout_ms: 2147483648 is out of range: 1 to 3600000 ms (an hour)"},
          {"switchover {\n  node: \"a\"\n  heartbeat_interval_ms: 4294967295\n}", 6,
           "switchover.heartbeat_interval_ms: 4294967295 is out of range: 1 to 10000"},
          {"switchover {\n  node: \"a\"\n  lease_renew_ms: 4294967295\n}", 6,
           "switchover.lease_renew_ms: 4294967295 is out of range: 5 to 10000"},
          {"switchover {\n  node: \"a\"\n  heartbeat_timeout_ms: 4294967295\n}", 6,
           "switchover.heartbeat_timeout_ms: must exceed heartbeat_interval_ms and be at most "
           "60000"},
          {"switchover {\n  node: \"a\"\n  path { local: \"127.0.0.1:1\" remote: "
           "\"127.0.0.1:2\" }\n  path {\n    local: \"127.0.0.1:1\"\n    remote: "
           "\"127.0.0.1:4294974296\"\n  }\n}",
           9, "switchover.path[1].remote: '127.0.0.1:4294974296' is not ADDR:PORT"},
          {"metrics_listen: \"localhost:9100\"", 4,
           "metrics_listen: 'localhost:9100' is not ADDR:PORT (a numeric address, a port of 1 "
           "to 65535)"},
          {"metrics_listen: \"127.0.0.1:0\"", 4,
           "metrics_listen: '127.0.0.1:0' is not ADDR:PORT (a numeric address, a port of 1 to "
           "65535)"},
      });
  ExpectRefused(false,
                {
                    {"replicate_to: \"mirror-b.example:7400\"", 4,
                     "replicate_to: 'mirror-b.example' is a name, not an address: give the "
                     "host's IPv4 or IPv6 address (names are not resolved)"},
                    {"replicate_to: \"127.0.0.1:7001\"\nreplicate_to_path: \"b.example:7001\"", 5,
                     "replicate_to_path[0]: 'b.example' is a name, not an address: give the "
                     "host's IPv4 or IPv6 address (names are not resolved)"},
                    {"replicate_to: \":4294974296\"", 4,
                     "replicate_to: ':4294974296' is not HOST:PORT (a port of 1 to 65535)"},
                    {"replicate_to: \"127.0.0.1:7A00\"", 4,
                     "replicate_to: '127.0.0.1:7A00' is not HOST:PORT (a port of 1 to "
                     "65535)"},
                    {"port: 70000", 4, "port: 70000 is out of range: 1 to 65535"},
                    {"disk_mib: 17592186044416", 4,
                     "disk_mib: 17592186044416 is out of range: 1 to 4194304 MiB (4 TiB)"},
                    {"ledger_port: 65536", 4, "ledger_port: 65536 is out of range: 1 to 65535"},
                    {"epoch_ms: 1001", 4, "epoch_ms: 1001 is out of range: 5 to 1000"},
                    {"switchover {\n  node: \"a\"\n  unprotected_command: \"" +
                         std::string(4097, 'x') + "\"\n}",
                     6, "switchover.unprotected_command: is longer than 4096 bytes"},
                    {"metrics_listen: \"127.0.0.1:65536\"", 4,
                     "metrics_listen: '127.0.0.1:65536' is not ADDR:PORT (a numeric address, a "
                     "port of 1 to 65535)"},
                });
}

// A value past its type is a syntax error, also with its line.
TEST(Config, ValuesPastTheirTypeAreSyntaxErrorsWithTheirLine) {
  testing::TempDir dir;
  std::string p2 = Write(dir, "vm_id: \"a\"\nswitchover {\n  fence_timeout_ms: 4294967296\n}\n");
  auto c = cli::LoadPrimaryConfig(p2);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find(p2 + ":3:"), absl::string_view::npos) << c.status();
}

// Every bound is inclusive: a config at the limits loads.
TEST(Config, ValuesAtTheirBoundsAreAccepted) {
  testing::TempDir dir;
  auto c = cli::LoadPrimaryConfig(Write(dir, R"(
    vm_id: "a"
    disk: "d"
    disk_mib: 4194304
    mirror: "127.0.0.1:65535"
    psk_file: "k"
    epoch_ms: 1000
    max_in_flight_mib: 65536
    ledger_port: 65535
    replication_port: 1
    metrics_listen: "[::1]:65535"
    memory_mib: 64
    workload { working_set_pages: 15360 write_rate: 10000000 }
    switchover {
      node: "a"
      heartbeat_interval_ms: 10000
      heartbeat_timeout_ms: 60000
      lease_renew_ms: 10000
      fence_timeout_ms: 3600000
    }
  )"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->max_in_flight_mib() << 20, 64ull << 30);
  EXPECT_EQ(c->switchover().fence_timeout_ms(), 3600000u);
}

// A health block: defaults filled in, and every bad value named by its line and field.
TEST(Config, AHealthBlockGetsDefaultsAndBadValuesNameTheirLine) {
  testing::TempDir dir;
  const std::string head = "vm_id: \"a\"\ndisk: \"d\"\nmirror: \"127.0.0.1:1\"\npsk_file: \"k\"\n";
  auto c = cli::LoadPrimaryConfig(Write(dir, head + "health { }\n"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->has_health());
  EXPECT_EQ(c->health().sysfs_root(), "/sys");
  EXPECT_EQ(c->health().interval_ms(), 1000u);
  EXPECT_EQ(c->health().retry_ms(), 5000u);
  EXPECT_EQ(c->health().migrate_timeout_ms(), 10000u);
  c = cli::LoadPrimaryConfig(Write(dir, head + R"(health {
  interface: "eth0"
  rule { signal: "carrier_changes" count: 5 window_s: 60 }
  rule { signal: "corrected_memory" window_s: 3600 alone: true }
})"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->health().rule(1).count(), 1u);
  EXPECT_FALSE(cli::LoadPrimaryConfig(Write(dir, head)).value().has_health());
  struct Case {
    std::string block, where;
  };
  for (const Case& bad : std::vector<Case>{
           {"health {\n  interval_ms: 5\n}", ":6: health.interval_ms: 5 is out of range"},
           {"health {\n  sysfs_root: \"sys\"\n}", ":6: health.sysfs_root: must be an absolute"},
           {"health {\n  interface: \"../x\"\n}", ":6: health.interface[0]: must be a network"},
           {"health {\n  rule { signal: \"cosmic_rays\" }\n}",
            ":6: health.rule[0].signal: 'cosmic_rays' is not one of"},
           {"health {\n  rule { signal: \"link_down\" }\n}",
            "health.rule[0].signal: watches network interfaces, but health.interface names none"},
           {"health {\n  rule { signal: \"disk_failing\" }\n}",
            "health.rule[0].signal: watches a disk"},
           {"health {\n  rule { signal: \"command_failing\" }\n}",
            "health.rule[0].signal: watches a command"},
           {"health {\n  command: \"true\"\n  rule { signal: \"command_failing\" window_s: 5 }\n}",
            "health.rule[0].window_s: applies to counters only"},
           {"health {\n  interval_ms: 10\n  rule { signal: \"corrected_memory\" window_s: 604800 "
            "}\n}",
            "health.rule[0].window_s: spans more than 100000 checks"},
           {"health {\n  rule { signal: \"corrected_memory\" count: 2000000000000 }\n}",
            "health.rule[0].count: 2000000000000 is out of range"},
           {"health {\n  retry_ms: 1\n}", ":6: health.retry_ms: 1 is out of range"},
       }) {
    std::string path = Write(dir, head + bad.block + "\n");
    auto r = cli::LoadPrimaryConfig(path);
    ASSERT_FALSE(r.ok()) << bad.block;
    EXPECT_NE(r.status().message().find(bad.where), absl::string_view::npos)
        << r.status() << " wanted " << bad.where;
  }
}

TEST(Config, AProxyConfigGetsDefaultsAndRefusesBadValuesWithFileAndLine) {
  testing::TempDir dir;
  auto good = cli::LoadProxyConfig(
      Write(dir,
            "port: 7070\nhost: \"10.1.0.1:7070\"\nhost: \"localhost:7071\"\nhost: "
            "\"[::1]:7072\"\nhost: \"fe80::1:7073\"\n"));
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_EQ(good->listen(), "127.0.0.1");
  EXPECT_EQ(good->hold_ms(), 10000u);
  EXPECT_EQ(good->answer_timeout_ms(), 2000u);
  EXPECT_EQ(good->probe_interval_ms(), 5u);
  EXPECT_EQ(good->max_clients(), 1024u);
  struct Case {
    std::string text, message;
  };
  std::string nine_hosts = "port: 7070";
  for (int i = 0; i < 9; i++) absl::StrAppend(&nine_hosts, "\nhost: \"10.1.0.1:", 7000 + i, "\"");
  for (const Case& c : std::vector<Case>{
           {"host: \"10.1.0.1:7070\"", "port: is required (1 to 65535: the clients' port)"},
           {"port: 7070", "host: 1 to 8 are required (each host's ledger HOST:PORT)"},
           {nine_hosts, ":10: host[8]: 1 to 8 are required (each host's ledger HOST:PORT)"},
           {"port: 70000\nhost: \"10.1.0.1:7070\"", ":1: port: 70000 is out of range: 1 to 65535"},
           {"port: 7070\nhost: \"ledger\"",
            ":2: host[0]: 'ledger' is not HOST:PORT (a port of 1 to 65535)"},
           {"port: 7070\nhost: \"ledger.example:7070\"",
            ":2: host[0]: 'ledger.example' is not an IPv4 or IPv6 address (or localhost)"},
           {"port: 7070\nhost: \"10.1.0.1:7070\"\nhost: \"10.1.0.1:7070\"",
            ":3: host[1]: '10.1.0.1:7070' twice"},
           {"port: 7070\nhost: \"10.1.0.1:7070\"\nhold_ms: 600001",
            ":3: hold_ms: 600001 is out of range: 1 to 600000 ms"},
           {"port: 7070\nhost: \"10.1.0.1:7070\"\nlisten: \"everywhere\"",
            ":3: listen: 'everywhere' is not an IPv4 or IPv6 address"},
           {"port: 7070\nhost: \"10.1.0.1:7070\"\nmax_clients: 65537",
            ":3: max_clients: 65537 is out of range: 1 to 65536"},
           {"port: 7070\nhosts: \"10.1.0.1:7070\"", ":2:"},
       }) {
    std::string path = Write(dir, c.text + "\n");
    auto p = cli::LoadProxyConfig(path);
    ASSERT_FALSE(p.ok()) << c.text;
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << c.text;
    EXPECT_EQ(p.status().message().rfind(path + (c.message[0] == ':' ? "" : ": ") + c.message, 0),
              0u)
        << p.status() << " for " << c.text;
  }
}

// `romulus help config` documents every field of every config message, and nothing else: a
// field added to proto/romulus.proto without a line there fails this test.
TEST(Config, HelpDocumentsEveryFieldOfEveryConfigMessage) {
  const google::protobuf::Descriptor* messages[] = {
      pb::PrimaryConfig::descriptor(),    pb::MirrorConfig::descriptor(),
      pb::SwitchoverConfig::descriptor(), pb::HeartbeatPath::descriptor(),
      pb::WorkloadConfig::descriptor(),   pb::HealthConfig::descriptor(),
      pb::HealthRule::descriptor(),       pb::ProxyConfig::descriptor()};
  for (const google::protobuf::Descriptor* d : messages) {
    SCOPED_TRACE(d->name());
    std::vector<std::string> in_proto;
    for (int i = 0; i < d->field_count(); i++) in_proto.push_back(d->field(i)->name());
    std::vector<std::string> documented = cli::DocumentedConfigFields(d->name());
    std::sort(in_proto.begin(), in_proto.end());
    std::sort(documented.begin(), documented.end());
    EXPECT_EQ(documented, in_proto);
  }
  testing::Child help({"help", "config"});
  EXPECT_EQ(help.Wait(30), 0);
  for (const char* field : {"max_in_flight_mib", "heartbeat_timeout_ms", "encryption"}) {
    EXPECT_NE(help.output().find(field), std::string::npos) << field;
  }
  testing::Child unknown({"help", "nothing"});
  EXPECT_EQ(unknown.Wait(30), 2);
}

// docs/configuration.md is what `romulus help config --markdown` prints, byte for byte: the page
// cannot drift from the binary (scripts/docs.sh rewrites it after a change to the table).
TEST(Config, TheCheckedInReferenceIsWhatTheBinaryPrints) {
  const std::string path = std::string(ROMULUS_SOURCE_DIR) + "/docs/configuration.md";
  std::ifstream file(path);
  ASSERT_TRUE(file) << "cannot read " << path;
  std::stringstream page;
  page << file.rdbuf();
  testing::Child markdown({"help", "config", "--markdown"});
  ASSERT_EQ(markdown.Wait(30), 0);
  EXPECT_EQ(markdown.output(), cli::ConfigHelpMarkdown());
  EXPECT_TRUE(page.str() == markdown.output())
      << path << " is not what `romulus help config --markdown` prints now: run scripts/docs.sh";
  for (const char* field : {"max_in_flight_mib", "heartbeat_timeout_ms", "precopy_rounds"}) {
    EXPECT_NE(page.str().find(absl::StrCat("| `", field, "` |")), std::string::npos) << field;
  }
  testing::Child bad({"help", "config", "--html"});
  EXPECT_EQ(bad.Wait(30), 2);
}

// Parallel paths: each further path is HOST:PORT (an address on the listening side), none twice,
// at most 8 in all; a refusal names the element's line.
TEST(Config, ParallelPathsAreCheckedAndNameTheirLine) {
  testing::TempDir dir;
  auto good = cli::LoadPrimaryConfig(Write(dir, R"(vm_id: "a"
disk: "d"
psk_file: "k"
mirror: "10.1.0.2:7000"
mirror_path: "10.2.0.2:7000"
replication_listen: "10.1.0.1"
replication_port: 7000
replication_listen_path: "10.2.0.1"
)"));
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_EQ(good->mirror_path_size(), 1);
  auto mirror = cli::LoadMirrorConfig(Write(dir, R"(vm_id: "a"
port: 7000
psk_file: "k"
replica_disk: "r"
listen: "10.1.0.2"
listen_path: "10.2.0.2"
replicate_to: "10.1.0.1:7000"
replicate_to_path: "10.2.0.1:7000"
)"));
  ASSERT_TRUE(mirror.ok()) << mirror.status();
  ExpectRefused(true, {{"mirror_path: \"10.2.0.2\"", 4,
                        "mirror_path[0]: '10.2.0.2' is not HOST:PORT (a port of 1 to 65535)"},
                       {"mirror: \"10.1.0.2:7000\"\nmirror_path: \"10.1.0.2:7000\"", 5,
                        "mirror_path[0]: '10.1.0.2:7000' is named twice: each path is one address"},
                       {"mirror_path: \"10.2.0.2:1\"\nmirror_path: \"10.2.0.2:2\"\n"
                        "mirror_path: \"10.2.0.2:3\"\nmirror_path: \"10.2.0.2:4\"\n"
                        "mirror_path: \"10.2.0.2:5\"\nmirror_path: \"10.2.0.2:6\"\n"
                        "mirror_path: \"10.2.0.2:7\"\nmirror_path: \"10.2.0.2:8\"",
                        11, "mirror_path[7]: at most 7 further paths (8 in all)"}});
  ExpectRefused(false, {{"listen_path: \"somewhere\"", 4,
                         "listen_path[0]: 'somewhere' is not an IPv4 or IPv6 address"},
                        {"replicate_to_path: \"10.2.0.1:7000\"", 4,
                         "replicate_to_path[0]: needs replicate_to (the first path)"}});
}

}  // namespace
}  // namespace romulus::config_test
