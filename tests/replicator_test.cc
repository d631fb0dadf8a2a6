// Replication over loopback: the mirror's replica equals the primary's state at the pause of
// every committed checkpoint; a wrong key or a garbage stream is refused without touching the
// replica; a restarted mirror is resynchronised.
#include "replicator/replicator.h"

#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <mutex>
#include <thread>

#include "cli/ledger_client.h"
#include "cli/load.h"
#include "tests/test_util.h"
#include "vmm/ledger_endpoint.h"
#include "vmm/sys.h"

namespace romulus::replicator_test {
namespace {

using testing::TempDir;
using testing::WaitUntil;

// The pre-shared key file: one line of 16 to 4096 bytes; a larger file is refused without being
// read whole (a sparse file of a gigabyte here).
TEST(KeyFile, HoldsOneLineOfSixteenTo4096Bytes) {
  TempDir dir;
  auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream(dir.File(name), std::ios::binary) << text;
    return dir.File(name);
  };
  auto key = replicator::ReadKeyFile(write("ok", std::string(32, 'k') + "\r\n"));
  ASSERT_TRUE(key.ok()) << key.status();
  EXPECT_EQ(*key, std::string(32, 'k'));
  EXPECT_TRUE(replicator::ReadKeyFile(write("max", std::string(4096, 'k') + "\n")).ok());
  EXPECT_FALSE(replicator::ReadKeyFile(write("short", "too-short\n")).ok());
  EXPECT_FALSE(replicator::ReadKeyFile(write("long", std::string(4097, 'k'))).ok());
  EXPECT_FALSE(replicator::ReadKeyFile(dir.File("missing")).ok());
  std::string huge = write("huge", std::string(32, 'k') + "\n");
  ASSERT_EQ(::truncate(huge.c_str(), 1ll << 30), 0);
  auto refused = replicator::ReadKeyFile(huge);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("over 4098 bytes"), std::string::npos)
      << refused.status();
}
constexpr uint64_t kMemory = 64ull << 20, kDisk = 8ull << 20;
const char kKey[] = "0123456789abcdef-test-key";
// The guest's page writes a second. At 50000 under a sanitizer each held answer waited ~1 s: the
// load's 2 s run answered 9 requests.
constexpr uint64_t kWriteRate = testing::WriteRate(50000, 5000);

class VmReplication : public testing::PlatformTest {
 protected:
  void SetUp() override {
    PlatformTest::SetUp();
    if (IsSkipped()) return;
    vm_ = testing::BootTestVm(platform(), dir_,
                              {.working_set_pages = 2048, .write_rate = kWriteRate});
    ASSERT_NE(vm_, nullptr);
    engine_ =
        std::make_unique<checkpoint::EpochEngine>(*vm_, gate_, checkpoint::EpochEngine::Options{});
    pauses_.Watch(*engine_, *vm_, kDisk);
    auto ep = vmm::LedgerEndpoint::Start(vm_->ledger(), gate_, "127.0.0.1", 0, nullptr);
    ASSERT_TRUE(ep.ok());
    endpoint_ = std::move(*ep);
    ASSERT_TRUE(vm_->Start().ok());
  }
  void TearDown() override {
    primary_.reset();
    mirror_.reset();
    endpoint_.reset();
    engine_.reset();
    if (vm_) {
      EXPECT_TRUE(vm_->Stop().ok());
    }
  }
  replicator::Identity Id() const { return {"test-vm", kMemory, kDisk, platform()}; }
  // A mirror that would resume the replica on `platform` (unspecified: the test's platform).
  void StartMirror(uint16_t port = 0, pb::Platform platform = pb::PLATFORM_UNSPECIFIED,
                   std::chrono::milliseconds peer_timeout = std::chrono::milliseconds(5000)) {
    auto r = checkpoint::ReplicaStore::Create(kMemory, dir_.File("replica.img"), kDisk);
    ASSERT_TRUE(r.ok());
    replica_ = std::move(*r);
    replicator::Identity id = Id();
    if (platform != pb::PLATFORM_UNSPECIFIED) id.platform = platform;
    auto m =
        replicator::Mirror::Start(*replica_, {.identity = id,
                                              .key = kKey,
                                              .port = port,
                                              .peer_timeout = peer_timeout,
                                              .log = [this](absl::string_view l) { Note(l); }});
    ASSERT_TRUE(m.ok()) << m.status();
    mirror_ = std::move(*m);
  }
  void StartPrimary(const std::string& key) {
    auto p = replicator::Primary::Start(*engine_, gate_,
                                        {.identity = Id(),
                                         .key = key,
                                         .mirror_port = mirror_->port(),
                                         .epoch = std::chrono::milliseconds(10),
                                         .log = [this](absl::string_view l) { Note(l); }});
    ASSERT_TRUE(p.ok()) << p.status();
    primary_ = std::move(*p);
  }
  std::string Logs() {
    std::lock_guard<std::mutex> lock(mu_);
    std::string all;
    for (const auto& l : log_) all += l + "\n";
    return all;
  }
  void Note(absl::string_view line) {
    std::lock_guard<std::mutex> lock(mu_);
    log_.emplace_back(line);
  }

  TempDir dir_;
  vmm::OutputGate gate_;
  std::unique_ptr<vmm::Vm> vm_;
  std::unique_ptr<checkpoint::EpochEngine> engine_;
  std::unique_ptr<vmm::LedgerEndpoint> endpoint_;
  std::unique_ptr<checkpoint::ReplicaStore> replica_;
  std::unique_ptr<replicator::Mirror> mirror_;
  std::unique_ptr<replicator::Primary> primary_;
  std::mutex mu_;
  testing::PauseDigests pauses_;
  std::vector<std::string> log_;
};

TEST_P(VmReplication, ReplicaEqualsThePrimaryAtEachCommittedPause) {
  StartMirror();
  StartPrimary(kKey);
  ASSERT_TRUE(WaitUntil([&] { return mirror_->stats().committed_epoch >= 0; }, 30));
  // Clients make progress only as checkpoints are acknowledged (their answers are held).
  cli::LoadOptions o;
  o.port = endpoint_->port();
  o.clients = 4;
  o.duration_s = 2;
  o.accounts = 8;
  auto report = cli::RunLoad(o);
  ASSERT_TRUE(report.ok()) << report.status() << "\n" << Logs();
  EXPECT_TRUE(report->ok()) << cli::FormatReport(*report) << Logs();
  EXPECT_GT(report->requests, 0u);
  // Plenty of epochs commit (bounded wait, not a rate).
  EXPECT_TRUE(WaitUntil([&] { return primary_->stats().acked >= 50; }, 120)) << Logs();
  for (int i = 0; i < 20; i++) {
    pauses_.ExpectReplicaMatches(*mirror_);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // let more epochs commit
  }
  auto st = primary_->stats();
  EXPECT_TRUE(st.connected);
  EXPECT_GE(mirror_->stats().checkpoints, 50u);
  EXPECT_EQ(mirror_->stats().rejected, 0u);
}

TEST_P(VmReplication, AWrongKeyIsRefusedAndNothingIsApplied) {
  StartMirror();
  StartPrimary("not-the-right-key-at-all");
  ASSERT_TRUE(WaitUntil([&] { return mirror_->stats().rejected >= 2; }, 30));
  EXPECT_EQ(mirror_->stats().committed_epoch, -1);
  EXPECT_EQ(mirror_->stats().checkpoints, 0u);
  EXPECT_FALSE(primary_->stats().connected);
  std::lock_guard<std::mutex> lock(mu_);
  bool said = false;
  for (const auto& l : log_) said |= l.find("authentication failed") != std::string::npos;
  EXPECT_TRUE(said);
}

TEST_P(VmReplication, GarbageFromAnUnauthenticatedPeerIsRefused) {
  StartMirror();
  for (const std::string& junk : {std::string("\x10\x00\x00\x00garbage-garbage!", 20),
                                  std::string("\xff\xff\xff\x7f", 4), std::string(3, '\0')}) {
    auto c = cli::LedgerClient::Connect("127.0.0.1", mirror_->port(), 2000);
    ASSERT_TRUE(c.ok());
    ASSERT_TRUE(c->SendBytes(junk).ok());
    EXPECT_FALSE(c->Receive().ok());  // the mirror closes the connection
  }
  EXPECT_TRUE(WaitUntil([&] { return mirror_->stats().rejected >= 2; }, 30));
  EXPECT_EQ(mirror_->stats().committed_epoch, -1);
  // A genuine primary is still served afterwards.
  StartPrimary(kKey);
  ASSERT_TRUE(WaitUntil([&] { return mirror_->stats().committed_epoch >= 3; }, 30));
  pauses_.ExpectReplicaMatches(*mirror_);
}

// Saved state resumes only on the platform that wrote it: a mirror on another platform could
// never take over, so the pair refuses to connect and nothing is applied.
TEST_P(VmReplication, AMirrorOnAnotherPlatformIsRefused) {
  StartMirror(0, platform() == pb::KVM ? pb::PROCESS : pb::KVM);
  StartPrimary(kKey);
  ASSERT_TRUE(WaitUntil([&] { return mirror_->stats().rejected >= 2; }, 30)) << Logs();
  EXPECT_EQ(mirror_->stats().committed_epoch, -1);
  EXPECT_EQ(mirror_->stats().checkpoints, 0u);
  EXPECT_FALSE(primary_->stats().connected);
  EXPECT_NE(Logs().find("neither could resume the other's state"), std::string::npos) << Logs();
}

TEST_P(VmReplication, ARestartedMirrorIsResynchronised) {
  StartMirror();
  StartPrimary(kKey);
  ASSERT_TRUE(WaitUntil([&] { return mirror_->stats().committed_epoch >= 5; }, 30));
  uint16_t port = mirror_->port();
  mirror_.reset();  // the mirror dies mid-stream
  replica_.reset();
  ASSERT_TRUE(WaitUntil([&] { return !primary_->stats().connected; }, 30)) << Logs();
  StartMirror(port);  // a new mirror with an empty replica
  ASSERT_TRUE(WaitUntil([&] { return mirror_->stats().committed_epoch >= 5; }, 30)) << Logs();
  pauses_.ExpectReplicaMatches(*mirror_);
  EXPECT_GE(primary_->stats().resyncs, 2u);
}

// Connections that never send a byte (8, each given the whole handshake timeout) do not hold
// back a primary's: it connects and commits while they all still wait for their handshakes.
// (Handshakes were served one at a time: the primary waited for every idle one to time out.)
TEST_P(VmReplication, IdleConnectionsDoNotHoldBackAPrimary) {
  // Far longer than the primary's first synchronisation takes, and than the waits below.
  StartMirror(0, pb::PLATFORM_UNSPECIFIED, testing::ScaledMs(120));
  std::vector<vmm::Fd> idle;
  for (int i = 0; i < 8; i++) {
    vmm::Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    ASSERT_TRUE(fd.valid());
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(mirror_->port());
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int r = ::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a));
    ASSERT_TRUE(r == 0 || errno == EINPROGRESS) << std::strerror(errno);
    idle.push_back(std::move(fd));
  }
  auto connected = [&] {
    for (const vmm::Fd& fd : idle) {
      pollfd p{fd.get(), POLLOUT, 0};
      if (::poll(&p, 1, 0) != 1 || (p.revents & POLLOUT) == 0) return false;
    }
    return true;
  };
  EXPECT_TRUE(WaitUntil(connected, 10)) << Logs();
  // Still waiting: the mirror has neither ended the connection nor sent anything on it.
  auto waiting = [](const vmm::Fd& fd) {
    char c;
    return ::recv(fd.get(), &c, 1, MSG_DONTWAIT) < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
  };
  StartPrimary(kKey);
  ASSERT_TRUE(WaitUntil([&] { return mirror_->stats().committed_epoch >= 0; }, 30)) << Logs();
  for (size_t i = 0; i < idle.size(); i++) {
    EXPECT_TRUE(waiting(idle[i])) << "idle connection " << i << "\n" << Logs();
  }
  EXPECT_EQ(mirror_->stats().rejected, 0u) << Logs();
  pauses_.ExpectReplicaMatches(*mirror_);
}

ROMULUS_ON_EVERY_PLATFORM(VmReplication);

}  // namespace
}  // namespace romulus::replicator_test
