// `romulus proxy` on loopback, in front of ledgers kept in this process (tests/two_host_ledger.h):
// a failover hidden from the clients with every request answered exactly once, the hold bound,
// garbage from a client, and a client that does not read.
#include "cli/proxy.h"

#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <csignal>
#include <fstream>
#include <mutex>
#include <vector>

#include "cli/ledger_client.h"
#include "cli/load.h"
#include "guest/abi.h"
#include "tests/test_util.h"
#include "tests/two_host_ledger.h"
#include "vmm/ledger_protocol.h"

namespace romulus::proxy_test {
namespace {

using ::testing::HasSubstr;
using testing::TwoHostLedger;

// A proxy whose log lines are kept for the test to read.
class ProxyTest : public ::testing::Test {
 protected:
  void Start(std::vector<uint16_t> ports, std::chrono::milliseconds hold,
             std::chrono::milliseconds answer_timeout = std::chrono::milliseconds(2000)) {
    cli::ProxyOptions o;
    for (uint16_t p : ports) o.hosts.push_back("127.0.0.1:" + std::to_string(p));
    o.hold = hold;
    o.answer_timeout = answer_timeout;
    o.log = [this](absl::string_view line) {
      std::lock_guard<std::mutex> lock(mu_);
      log_.emplace_back(line);
    };
    auto p = cli::Proxy::Start(o);
    ASSERT_TRUE(p.ok()) << p.status();
    proxy_ = std::move(*p);
  }

  std::vector<std::string> LogLines(const std::string& needle) {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::string> out;
    for (const auto& l : log_) {
      if (l.find(needle) != std::string::npos) out.push_back(l);
    }
    return out;
  }
  std::string Log() {
    std::lock_guard<std::mutex> lock(mu_);
    std::string out;
    for (const auto& l : log_) out += l + "\n";
    return out;
  }

  cli::LedgerClient Connect() {
    auto c = cli::LedgerClient::Connect("127.0.0.1", proxy_->port(),
                                        static_cast<int>(testing::ScaledMs(20).count()));
    EXPECT_TRUE(c.ok()) << c.status();
    return std::move(*c);
  }

  std::mutex mu_;
  std::vector<std::string> log_;
  std::unique_ptr<cli::Proxy> proxy_;
};

using testing::LedgerRequest;

// `romulus load` against the proxy alone (no --standby): the first host dies with a request
// applied and its answer never sent; the proxy holds, finds the second host and resends there.
// The clients see no error and no reconnect, and every invariant holds: the resent request was
// answered from the ledger's session table, not applied twice.
TEST_F(ProxyTest, LoadThroughItSeesNoFailoverAndLosesOrRepeatsNothing) {
  TwoHostLedger ledger(/*die_after=*/600);
  Start({ledger.port(0), ledger.port(1)}, std::chrono::milliseconds(10000));
  cli::LoadOptions o;
  o.port = proxy_->port();
  o.clients = 4;
  o.duration_s = 1.0;
  o.accounts = 8;
  o.seed = 7;
  o.timeout_ms = 15000;  // above the hold bound: the proxy's answer is what a client sees
  auto report = cli::RunLoad(o);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(ledger.died()) << "the first host served fewer than 600 requests";
  EXPECT_TRUE(report->ok()) << cli::FormatReport(*report) << Log();
  EXPECT_EQ(report->unresolved, 0u);
  EXPECT_EQ(report->reconnects, 0u) << cli::FormatReport(*report);
  EXPECT_EQ(report->by_status.count(RML_ERR_UNAVAILABLE), 0u) << cli::FormatReport(*report);
  EXPECT_EQ(report->lost_acknowledged, 0u);
  EXPECT_GT(report->retries_checked, 0u);
  EXPECT_GT(ledger.answered(1), 0u);
  cli::Proxy::Stats s = proxy_->stats();
  EXPECT_GE(s.resent, 1u) << "the request the first host applied went to the second";
  // The dying host's listener may take a connection or two before it closes: the proxy may
  // come back to it once before it settles on the second host.
  EXPECT_GE(s.primaries, 2u) << Log();
  EXPECT_EQ(s.primary, 1);
  EXPECT_EQ(s.expired, 0u);
  EXPECT_FALSE(LogLines("primary 127.0.0.1:" + std::to_string(ledger.port(0)) + " failed").empty())
      << Log();
  EXPECT_EQ(LogLines("primary: 127.0.0.1:" + std::to_string(ledger.port(1))).size(), 1u) << Log();
}

// One client, one request at a time: the third is applied by the first host, which dies before
// answering. The proxy resends it to the second host, which answers from its session table: the
// deposit counts once.
TEST_F(ProxyTest, ARequestAppliedByAHostThatDiedIsAnsweredOnceByTheNext) {
  TwoHostLedger ledger(/*die_after=*/3);
  Start({ledger.port(0), ledger.port(1)}, std::chrono::milliseconds(10000));
  cli::LedgerClient c = Connect();
  auto open = c.Call(LedgerRequest(42, 1, pb::OPEN));
  ASSERT_TRUE(open.ok()) << open.status();
  ASSERT_EQ(open->status(), RML_OK);
  uint32_t account = open->account();
  auto first = c.Call(LedgerRequest(42, 2, pb::DEPOSIT, account, 100));
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->balance(), 100);
  auto second = c.Call(LedgerRequest(42, 3, pb::DEPOSIT, account, 50));  // the first host dies
  ASSERT_TRUE(second.ok()) << second.status() << Log();
  EXPECT_TRUE(ledger.died());
  EXPECT_EQ(second->status(), RML_OK) << second->error();
  EXPECT_EQ(second->request_id(), 3u);
  EXPECT_EQ(second->balance(), 150);
  auto read = c.Call(LedgerRequest(42, 4, pb::READ, account));
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->balance(), 150) << "the resent deposit was applied twice";
  EXPECT_GE(proxy_->stats().resent, 1u);
  EXPECT_EQ(ledger.answered(1), 2u);  // the resend (from the table) and the read
}

// The fencing token. The first host answers in term 2, then dies with a request applied; the
// only host left answers in term 1, that of a VM term 2 superseded (a host that did not learn it
// yet). The proxy forwards none of its answers: the client waits, and at the hold bound hears
// that its request may have been applied, never the superseded VM's balance.
TEST_F(ProxyTest, AnAnswerOfATermOlderThanOneSeenIsNeverForwarded) {
  TwoHostLedger ledger(/*die_after=*/3, /*terms=*/{2, 1});
  Start({ledger.port(0), ledger.port(1)}, std::chrono::milliseconds(500));
  cli::LedgerClient c = Connect();
  auto open = c.Call(LedgerRequest(42, 1, pb::OPEN));
  ASSERT_TRUE(open.ok()) << open.status();
  EXPECT_EQ(open->term(), 2u);
  auto first = c.Call(LedgerRequest(42, 2, pb::DEPOSIT, open->account(), 100));
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = c.Call(LedgerRequest(42, 3, pb::DEPOSIT, open->account(), 50));  // it dies
  ASSERT_TRUE(second.ok()) << second.status() << Log();
  EXPECT_TRUE(ledger.died());
  EXPECT_EQ(second->status(), RML_ERR_UNAVAILABLE) << second->ShortDebugString();
  EXPECT_NE(second->term(), 1u);
  EXPECT_GE(ledger.answered(1), 1u) << "the older term's host was asked, and answered";
  cli::Proxy::Stats s = proxy_->stats();
  EXPECT_GE(s.stale_answers, 1u);
  EXPECT_EQ(s.newest_term, 2u);
  EXPECT_FALSE(LogLines("answered in term 1, older than term 2").empty()) << Log();
}

// Nothing listens where the host should be: the request is held for hold_ms, then answered with
// RML_ERR_UNAVAILABLE, saying it was not applied; the proxy said once that no host accepts.
TEST_F(ProxyTest, ARequestNoHostTookGetsAClearErrorAfterTheHoldBound) {
  Start({testing::FreePort()}, std::chrono::milliseconds(300));
  cli::LedgerClient c = Connect();
  auto r = c.Call(LedgerRequest(7, 1, pb::OPEN));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->status(), RML_ERR_UNAVAILABLE);
  EXPECT_EQ(r->client_id(), 7u);
  EXPECT_EQ(r->request_id(), 1u);
  EXPECT_THAT(r->error(), HasSubstr("no primary answered within 300 ms (hold_ms)"));
  EXPECT_THAT(r->error(), HasSubstr("no host had it: it was not applied"));
  EXPECT_EQ(proxy_->stats().expired, 1u);
  EXPECT_EQ(LogLines("no host accepts").size(), 1u) << Log();
  // The connection stays usable: the next request is held and answered the same way.
  auto again = c.Call(LedgerRequest(7, 2, pb::OPEN));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->status(), RML_ERR_UNAVAILABLE);
  EXPECT_EQ(again->request_id(), 2u);
}

// A host that accepts the connection and the request but never answers: after hold_ms the
// client is told that its request may have been applied, and how to learn its outcome.
TEST_F(ProxyTest, ARequestAHostTookButNeverAnsweredMayHaveBeenAppliedAndSaysSo) {
  vmm::Fd silent(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  ASSERT_EQ(::bind(silent.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  ASSERT_EQ(::listen(silent.get(), 16), 0);  // the kernel accepts; nobody reads
  ASSERT_EQ(::getsockname(silent.get(), reinterpret_cast<sockaddr*>(&a), &len), 0);
  Start({ntohs(a.sin_port)}, std::chrono::milliseconds(300), std::chrono::milliseconds(600000));
  cli::LedgerClient c = Connect();
  auto r = c.Call(LedgerRequest(7, 1, pb::OPEN));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->status(), RML_ERR_UNAVAILABLE);
  EXPECT_THAT(r->error(), HasSubstr("it may have been applied: send the same request id again"));
  EXPECT_EQ(proxy_->stats().expired, 1u);
}

// Garbage from two clients (a frame too long, and a body that is no request): each gets the
// answers to what it sent before, one error frame saying why, and its connection closes; one
// log line each. Another client is served before, meanwhile and after.
TEST_F(ProxyTest, GarbageFromAClientClosesOnlyItAfterAnsweringWhatItSentBefore) {
  TwoHostLedger ledger(/*die_after=*/0);
  Start({ledger.port(0), ledger.port(1)}, std::chrono::milliseconds(10000));
  cli::LedgerClient good = Connect();
  auto open = good.Call(LedgerRequest(1, 1, pb::OPEN));
  ASSERT_TRUE(open.ok()) << open.status();
  ASSERT_EQ(open->status(), RML_OK);

  std::string too_long("\xa0\x86\x01\x00", 4);  // 100000 bytes
  std::string not_a_request = std::string("\x08\x00\x00\x00", 4) + std::string(8, '\xff');
  struct Case {
    std::string garbage, why;
  };
  uint64_t id = 1;
  for (const Case& k : {Case{too_long, "frame of 100000 bytes (1 to 4096 allowed)"},
                        Case{not_a_request, "malformed request frame"}}) {
    SCOPED_TRACE(k.why);
    cli::LedgerClient bad = Connect();
    // A good request, then the garbage, in one write: the first is still answered.
    std::string bytes =
        vmm::EncodeFrame(LedgerRequest(2, ++id, pb::READ, open->account())) + k.garbage;
    ASSERT_TRUE(bad.SendBytes(bytes).ok());
    auto answer = bad.Receive();
    ASSERT_TRUE(answer.ok()) << answer.status();
    EXPECT_EQ(answer->status(), RML_OK);
    EXPECT_EQ(answer->request_id(), id);
    auto error = bad.Receive();
    ASSERT_TRUE(error.ok()) << error.status();
    EXPECT_EQ(error->status(), RML_ERR_MALFORMED);
    EXPECT_EQ(error->request_id(), 0u);
    EXPECT_THAT(error->error(), HasSubstr(k.why));
    EXPECT_FALSE(bad.Receive().ok()) << "the connection should be closed";
    EXPECT_EQ(LogLines(k.why).size(), 1u) << Log();
    auto served = good.Call(LedgerRequest(1, ++id, pb::DEPOSIT, open->account(), 5));
    ASSERT_TRUE(served.ok()) << served.status();
    EXPECT_EQ(served->status(), RML_OK);
  }
  EXPECT_EQ(proxy_->stats().malformed, 2u);
}

// A client that sends without reading its answers: the proxy stops reading it once its bounded
// queues are full (its writes then block), while another client is served all along.
TEST_F(ProxyTest, AClientThatDoesNotReadStallsOnlyItself) {
  TwoHostLedger ledger(/*die_after=*/0);
  Start({ledger.port(0), ledger.port(1)}, std::chrono::milliseconds(60000));
  vmm::Fd slow(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  int small = 4096;
  ::setsockopt(slow.get(), SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
  ::setsockopt(slow.get(), SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(proxy_->port());
  ASSERT_EQ(::connect(slow.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  ASSERT_EQ(::fcntl(slow.get(), F_SETFL, O_NONBLOCK), 0);

  // Writes until the proxy has not taken a byte for half a second (scaled), or 200000 requests.
  const uint64_t kMax = 200000;
  uint64_t written = 0;
  std::string pending;
  bool stalled = false;
  auto deadline = std::chrono::steady_clock::now() + testing::Scaled(60);
  while (written < kMax && std::chrono::steady_clock::now() < deadline) {
    if (pending.empty()) pending = vmm::EncodeFrame(LedgerRequest(9, written + 1, pb::READ));
    ssize_t n = ::send(slow.get(), pending.data(), pending.size(), MSG_NOSIGNAL);
    if (n > 0) {
      pending.erase(0, static_cast<size_t>(n));
      if (pending.empty()) written++;
      continue;
    }
    ASSERT_TRUE(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) << std::strerror(errno);
    pollfd p{slow.get(), POLLOUT, 0};
    if (::poll(&p, 1, static_cast<int>(testing::ScaledMs(0.5).count())) == 0) {
      stalled = true;
      break;
    }
  }
  ASSERT_TRUE(stalled) << "the proxy read " << written << " requests from a client that reads "
                       << "none of its answers";
  uint64_t read_from_slow = proxy_->stats().requests;
  EXPECT_LT(read_from_slow, written);

  cli::LedgerClient other = Connect();
  for (uint64_t i = 1; i <= 100; i++) {
    auto r = other.Call(LedgerRequest(10, i, pb::OPEN));
    ASSERT_TRUE(r.ok()) << r.status() << " at request " << i;
    ASSERT_EQ(r->request_id(), i);
    ASSERT_EQ(r->status(), RML_OK);
  }
  // The slow client is still held: without reading answers it can never have all its
  // requests taken.
  EXPECT_LT(proxy_->stats().requests - 100, written);
  std::printf("a client that does not read: the proxy took %lu of the %lu requests it sent\n",
              static_cast<unsigned long>(read_from_slow), static_cast<unsigned long>(written));
}

// The command: a config it cannot use is one line naming FILE:LINE and exit code 1; a good one
// serves until SIGTERM, then says what it did.
TEST(ProxyCommand, RefusesABadConfigInOneLineAndServesAGoodOneUntilStopped) {
  testing::TempDir dir;
  std::ofstream(dir.File("bad.conf")) << "port: 7070\nhost: \"10.0.0.1:7070\"\nhold_ms: 0.5\n";
  testing::Child bad({"proxy", "--config", dir.File("bad.conf")});
  EXPECT_EQ(bad.Wait(30), 1);
  EXPECT_THAT(bad.output(), HasSubstr("romulus proxy: " + dir.File("bad.conf") + ":3:"));
  std::string said = bad.output();
  EXPECT_EQ(std::count(said.begin(), said.end(), '\n'), 1) << said;

  TwoHostLedger ledger(/*die_after=*/0);
  uint16_t port = testing::FreePort();
  std::ofstream(dir.File("good.conf"))
      << "port: " << port << "\nhost: \"127.0.0.1:" << ledger.port(0)
      << "\"\nhost: \"localhost:" << ledger.port(1) << "\"\n";
  testing::Child proxy({"proxy", "--config", dir.File("good.conf")});
  ASSERT_EQ(testing::ListeningPort(proxy.WaitForLine("ledger listening on", 30)), port);
  auto c = cli::LedgerClient::Connect("127.0.0.1", port,
                                      static_cast<int>(testing::ScaledMs(20).count()));
  ASSERT_TRUE(c.ok()) << c.status();
  auto r = c->Call(LedgerRequest(5, 1, pb::OPEN));
  ASSERT_TRUE(r.ok()) << r.status() << proxy.output();
  EXPECT_EQ(r->status(), RML_OK);
  proxy.Signal(SIGTERM);
  EXPECT_EQ(proxy.Wait(30), 0) << proxy.output();
  EXPECT_THAT(proxy.output(), HasSubstr("stopped: 1 requests, 1 answered, 0 resent"));
}

}  // namespace
}  // namespace romulus::proxy_test
