// `romulus mirror` and `romulus primary` as separate processes with config files: clients are
// served (answers released as epochs commit), and the mirror's saved replica, resumed with
// `romulus vm --restore-from`, holds every transaction the clients saw acknowledged.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fstream>

#include "cli/ledger_client.h"
#include "cli/load.h"
#include "tests/test_util.h"
#include "vmm/journal.h"

namespace romulus::replication_process_test {
namespace {

using testing::Child;
using testing::FreePort;
using testing::TempDir;
using testing::UintField;

// A port that was free a moment ago (the kernel's choice for a socket bound to port 0).

class VmReplicationProcess : public testing::PlatformTest {};

TEST_P(VmReplicationProcess, PrimaryAndMirrorFromConfigFilesAndTheReplicaResumes) {
  TempDir dir;
  std::string platform = "platform: \"" + platform_name() + "\"\n";
  std::ofstream(dir.File("key")) << "a-test-key-of-some-length\n";
  std::ofstream(dir.File("mirror.conf"))
      << "vm_id: \"t\"\nmemory_mib: 64\ndisk_mib: 8\n"
      << platform << "port: 0\npsk_file: \"" << dir.File("key") << "\"\n"
      << "replica_disk: \"" << dir.File("replica.img") << "\"\n"
      << "snapshot_dir: \"" << dir.File("snap") << "\"\n";
  // Port 0 is refused for the mirror's listener in a config: the primary must know it.
  Child probe({"mirror", "--config", dir.File("mirror.conf")});
  EXPECT_NE(probe.Wait(30), 0);
  EXPECT_NE(probe.output().find("port"), std::string::npos) << probe.output();

  uint16_t port = FreePort(), ledger_port = FreePort();
  std::ofstream(dir.File("mirror.conf"), std::ios::trunc)
      << "vm_id: \"t\"\nmemory_mib: 64\ndisk_mib: 8\nport: " << port << "\n"
      << "psk_file: \"" << dir.File("key") << "\"\nreplica_disk: \"" << dir.File("replica.img")
      << "\"\nsnapshot_dir: \"" << dir.File("snap") << "\"\n"
      << platform;
  std::ofstream(dir.File("primary.conf"))
      << "vm_id: \"t\"\nmemory_mib: 64\ndisk: \"" << dir.File("primary.img") << "\"\ndisk_mib: 8\n"
      << platform << "mirror: \"127.0.0.1:" << port << "\"\npsk_file: \"" << dir.File("key")
      << "\"\n"
      << "epoch_ms: 10\nledger_port: " << ledger_port << "\n"
      << "workload { working_set_pages: 1024 write_rate: 20000 }\n";
  Child mirror({"mirror", "--config", dir.File("mirror.conf")});
  ASSERT_FALSE(mirror.WaitForLine("romulus mirror: platform " + platform_name(), 30).empty());
  ASSERT_FALSE(mirror.WaitForLine("waiting for the primary", 30).empty());
  Child primary({"primary", "--config", dir.File("primary.conf")});
  ASSERT_FALSE(primary.WaitForLine("romulus primary: platform " + platform_name(), 30).empty());
  ASSERT_FALSE(primary.WaitForLine("protected: replicating", 60).empty());

  cli::LoadOptions o;
  o.port = ledger_port;
  o.clients = 8;
  o.duration_s = 2;
  o.accounts = 8;
  auto report = cli::RunLoad(o);
  ASSERT_TRUE(report.ok()) << report.status();
  ASSERT_TRUE(report->ok()) << cli::FormatReport(*report);
  ASSERT_GT(report->requests, 0u);

  mirror.Signal(SIGUSR1);
  std::string saved = mirror.WaitForLine("saved replica of epoch", 60);
  ASSERT_FALSE(saved.empty());
  EXPECT_GE(UintField(saved, "ledger_seq"), report->last_seq);
  primary.Signal(SIGTERM);
  EXPECT_EQ(primary.Wait(30), 0) << primary.output();
  mirror.Signal(SIGTERM);
  EXPECT_EQ(mirror.Wait(60), 0) << mirror.output();

  Child resumed({"vm", "--platform", platform_name(), "--restore-from", dir.File("snap"), "--disk",
                 dir.File("resumed.img"), "--ledger-port", "0", "--quiet", "--run-for", "1"});
  // The replica resumes on the platform the primary ran it on.
  std::string line = testing::WaitForRestore(resumed, platform_name(), 60);
  ASSERT_FALSE(line.empty());
  EXPECT_GE(UintField(line, "ledger_seq"), report->last_seq);  // every acknowledged transaction
  EXPECT_EQ(resumed.Wait(30), 0) << resumed.output();
}

// One failed accept ended the mirror's listener: with its descriptors exhausted once, no primary
// could connect after they were back. Now it logs the failure once, keeps trying (pausing after
// each failure) and accepts the primary once it can.
TEST_P(VmReplicationProcess, TheMirrorAcceptsAgainOnceItHasDescriptors) {
  TempDir dir;
  uint16_t port = FreePort();
  std::ofstream(dir.File("key")) << "a-test-key-of-some-length\n";
  std::ofstream(dir.File("mirror.conf"))
      << "vm_id: \"t\"\nmemory_mib: 32\ndisk_mib: 8\nport: " << port << "\npsk_file: \""
      << dir.File("key") << "\"\nreplica_disk: \"" << dir.File("replica.img") << "\"\n"
      << "platform: \"" << platform_name() << "\"\n";
  std::ofstream(dir.File("primary.conf"))
      << "vm_id: \"t\"\nmemory_mib: 32\ndisk: \"" << dir.File("primary.img")
      << "\"\ndisk_mib: 8\nmirror: \"127.0.0.1:" << port << "\"\npsk_file: \"" << dir.File("key")
      << "\"\nledger_port: " << FreePort() << "\nplatform: \"" << platform_name() << "\"\n";
  Child mirror({"mirror", "--config", dir.File("mirror.conf")});
  ASSERT_FALSE(mirror.WaitForLine("waiting for the primary", 30).empty());
  {
    testing::DescriptorLimit limit(mirror.pid());
    ASSERT_TRUE(limit.lowered());
    // The kernel completes the connection; the mirror cannot take it from the backlog.
    vmm::Fd client(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::connect(client.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    std::string failed = mirror.WaitForLine("accepting a primary failed", 30);
    EXPECT_NE(failed.find("Too many open files"), std::string::npos) << failed;
  }
  Child primary({"primary", "--config", dir.File("primary.conf")});
  EXPECT_FALSE(primary.WaitForLine("protected: replicating", 60).empty()) << mirror.output();
  EXPECT_NE(mirror.output().find("accepting primaries again"), std::string::npos);
  // Logged once, not once per retry.
  EXPECT_EQ(mirror.output().find("accepting a primary failed"),
            mirror.output().rfind("accepting a primary failed"));
  primary.Signal(SIGTERM);
  EXPECT_EQ(primary.Wait(30), 0) << primary.output();
  mirror.Signal(SIGTERM);
  EXPECT_EQ(mirror.Wait(60), 0) << mirror.output();
}

ROMULUS_ON_EVERY_PLATFORM(VmReplicationProcess);

}  // namespace
}  // namespace romulus::replication_process_test
