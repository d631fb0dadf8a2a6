// Switchover pieces over loopback: the witness and its leases, heartbeats, the fencing command
// and the promotion rule. The network-partition tests are in netns_switchover_test.cc.
// clang-format off
#include <utility>
#include <boost/asio.hpp>
// clang-format on
#include "switchover/switchover.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <optional>
#include <string>

#include "absl/strings/str_cat.h"
#include "switchover/datagram.h"
#include "tests/test_util.h"

namespace romulus::switchover::switchover_test {
namespace {

using std::chrono::milliseconds;
using ::testing::HasSubstr;
using testing::ReadFile;
using testing::TempDir;
using testing::WaitUntil;

const std::string kKey = "switchover-test-key-0123456789";
constexpr milliseconds kLease{100};

std::unique_ptr<Witness> StartWitness(const std::string& key = kKey) {
  Witness::Options o;
  o.key = key;
  o.listen = {"127.0.0.1", 0};
  o.lease = kLease;
  auto w = Witness::Start(o);
  EXPECT_TRUE(w.ok()) << w.status();
  return w.ok() ? std::move(*w) : nullptr;
}

std::unique_ptr<LeaseClient> StartClient(const Witness& w, const std::string& node,
                                         const std::string& key = kKey) {
  LeaseClient::Options o;
  o.vm_id = "vm1";
  o.node = node;
  o.key = key;
  o.witness = {"127.0.0.1", w.port()};
  o.renew = milliseconds(20);
  auto c = LeaseClient::Start(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? std::move(*c) : nullptr;
}

TEST(Witness, GrantsTheLeaseToOneNodeAtATimeAndNothingInItsFirstLeasePeriod) {
  auto started = Clock::now();
  auto w = StartWitness();
  auto a = StartClient(*w, "a");
  auto b = StartClient(*w, "b");
  ASSERT_TRUE(a->AcquireWithin(milliseconds(3000)).ok());
  // A restarted witness cannot know who held the lease before: it waits one lease period.
  EXPECT_GE(a->status().held_since, started + kLease);

  // b's state is a's (b would run a replica of what a runs in its term).
  b->SetStateTerm(a->term());
  absl::Status refused = b->AcquireWithin(milliseconds(150));
  EXPECT_FALSE(refused.ok());
  EXPECT_THAT(std::string(refused.message()), HasSubstr("held by a"));
  EXPECT_TRUE(a->held());  // renewed throughout
  auto holders = w->holders();
  ASSERT_EQ(holders.size(), 1u);
  EXPECT_EQ(holders[0].node, "a");
  EXPECT_EQ(holders[0].vm_id, "vm1");

  a->Want(false);  // releases
  ASSERT_TRUE(b->AcquireWithin(milliseconds(2000)).ok());
  EXPECT_FALSE(a->held());
  EXPECT_GE(b->status().held_since, a->status().held_until);
  // Each grant to another node is a new term; the witness's holders say which.
  EXPECT_EQ(b->term(), a->term() + 1);
  ASSERT_EQ(w->holders().size(), 1u);
  EXPECT_EQ(w->holders()[0].term, b->term());
  b->Want(false);
}

TEST(Witness, RefusesGarbageForgedAndReplayedRequests) {
  auto w = StartWitness();
  namespace asio = boost::asio;
  asio::io_context io;
  asio::ip::udp::socket s(io, asio::ip::udp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
  s.connect({asio::ip::make_address("127.0.0.1"), w->port()});
  auto reply = [&](const std::string& bytes) -> std::optional<pb::LeaseReply> {
    s.send(asio::buffer(bytes));
    // The witness answers at once or never; a bounded wait for a datagram.
    std::array<char, 2048> buf;
    s.non_blocking(true);
    auto deadline = Clock::now() + milliseconds(300);
    while (Clock::now() < deadline) {
      boost::system::error_code ec;
      size_t n = s.receive(asio::buffer(buf), 0, ec);
      if (!ec) {
        auto m = Open(kKey, absl::string_view(buf.data(), n));
        if (m.ok() && m->has_lease_reply()) return m->lease_reply();
      }
      std::this_thread::sleep_for(milliseconds(2));  // polling a non-blocking socket
    }
    return std::nullopt;
  };
  auto request = [&](const std::string& nonce, uint64_t id, const std::string& key) {
    pb::SwitchoverMessage m;
    auto* r = m.mutable_lease_request();
    r->set_vm_id("vm1");
    r->set_node("c");
    r->set_request_id(id);
    r->set_nonce(nonce);
    return Seal(key, m);
  };

  EXPECT_FALSE(reply("not a datagram").has_value());
  EXPECT_FALSE(reply(request("", 1, "some-other-key-0123456789")).has_value());
  EXPECT_FALSE(reply(std::string(4096, 'x')).has_value());
  EXPECT_EQ(w->rejected(), 3u);

  auto challenge = reply(request("", 2, kKey));
  ASSERT_TRUE(challenge.has_value());
  EXPECT_FALSE(challenge->granted());
  EXPECT_EQ(challenge->next_nonce().size(), 16u);
  // Past the witness's first lease period, a request with the challenge is granted.
  std::string genuine = request(challenge->next_nonce(), 3, kKey);
  std::optional<pb::LeaseReply> granted;
  ASSERT_TRUE(WaitUntil(
      [&] {
        granted = reply(genuine);
        if (granted && !granted->granted()) {  // inside its first lease period
          genuine = request(granted->next_nonce(), 3, kKey);
        }
        return granted && granted->granted();
      },
      3));
  EXPECT_EQ(granted->holder(), "c");
  // The same bytes again: the challenge has moved on, so they are refused, not a renewal.
  uint64_t before = w->rejected();
  auto replayed = reply(genuine);
  ASSERT_TRUE(replayed.has_value());
  EXPECT_FALSE(replayed->granted());
  EXPECT_EQ(replayed->reason(), "challenge");
  EXPECT_EQ(w->rejected(), before + 1);

  // A client with the wrong key hears nothing and says so.
  auto stranger = StartClient(*w, "d", "some-other-key-0123456789");
  absl::Status s2 = stranger->AcquireWithin(milliseconds(200));
  EXPECT_THAT(std::string(s2.message()), HasSubstr("no reply"));
}

TEST(Lease, AHandOverGivesTheLeaseToTheNamedNodeAndTakesItFromTheGiver) {
  auto w = StartWitness();
  auto a = StartClient(*w, "a");
  auto b = StartClient(*w, "b");
  ASSERT_TRUE(a->AcquireWithin(milliseconds(3000)).ok());
  EXPECT_FALSE(b->TransferTo("a", milliseconds(100)).ok());  // b holds nothing to hand over
  ASSERT_TRUE(a->TransferTo("b", milliseconds(1000)).ok());
  EXPECT_FALSE(a->held());
  // The recipient takes it tentatively, then confirms it from the handed term (a request from
  // its replica's term alone, a promotion's, would not: Authority.APromotionThatRaces...).
  b->SetStateTerm(a->term());
  b->SetTentative(true);
  absl::Status taken = b->AcquireWithin(milliseconds(1000));  // b renews what it was handed
  ASSERT_TRUE(taken.ok()) << taken;
  EXPECT_EQ(b->term(), a->term() + 1);  // in a term of its own
  ASSERT_TRUE(b->Confirm(milliseconds(1000)).ok());
  // b ran in its term: a's state (the VM it handed over) is superseded, for good.
  absl::Status back = a->AcquireWithin(milliseconds(1000));
  EXPECT_THAT(std::string(back.message()), HasSubstr("superseded"));
  EXPECT_GE(b->status().held_since, a->status().held_until);
}

TEST(Heartbeat, PeersOnTwoLoopbackPathsSeeEachOtherAndNoticeWhenOneIsGone) {
  // Claimed below the ephemeral range (cli::FreePort): a port that binding 0 gave, released and
  // bound again later, is one the kernel may meanwhile give any outgoing connection.
  auto port = [] { return testing::FreePort(SOCK_DGRAM); };
  uint16_t a1 = port(), a2 = port(), b1 = port(), b2 = port();
  std::atomic<int> a_dead{0};
  auto options = [&](const std::string& node, std::vector<PathConfig> paths) {
    Heartbeat::Options o;
    o.vm_id = "vm1";
    o.node = node;
    o.role = node == "a" ? "primary" : "mirror";
    o.key = kKey;
    o.paths = std::move(paths);
    if (node == "a") o.on_peer_dead = [&] { ++a_dead; };
    return o;
  };
  auto a = Heartbeat::Start(options(
      "a", {{{"127.0.0.1", a1}, {"127.0.0.1", b1}}, {{"127.0.0.1", a2}, {"127.0.0.1", b2}}}));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_TRUE((*a)->never_heard());
  auto b = Heartbeat::Start(options(
      "b", {{{"127.0.0.1", b1}, {"127.0.0.1", a1}}, {{"127.0.0.1", b2}, {"127.0.0.1", a2}}}));
  ASSERT_TRUE(b.ok()) << b.status();

  ASSERT_TRUE(WaitUntil(
      [&] {
        auto paths = (*a)->paths();
        return paths[0].up && paths[1].up && paths[0].rtt_ms >= 0 && paths[1].received > 20;
      },
      5));
  EXPECT_TRUE((*a)->peer_alive());
  EXPECT_EQ((*a)->peer_role(), "mirror");
  EXPECT_EQ((*b)->peer_role(), "primary");
  EXPECT_EQ((*a)->peer_node(), "b");  // the name a planned migration hands the lease to
  EXPECT_EQ((*b)->peer_node(), "a");
  (*a)->SetRole("mirror");  // a handed its VM over to b
  (*b)->SetRole("primary");
  EXPECT_TRUE(WaitUntil([&] { return (*b)->peer_role() == "mirror"; }, 5));
  EXPECT_TRUE(WaitUntil([&] { return (*a)->peer_role() == "primary"; }, 5));

  // Heartbeats from anywhere but b's end of the path never reach a (the kernel drops them: a's
  // sockets are connected to b's ends), and do not keep b alive once it is gone.
  Heartbeat::Options co = options("c", {{{"127.0.0.1", 0}, {"127.0.0.1", a1}}});
  auto c = Heartbeat::Start(co);
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(WaitUntil([&] { return (*c)->paths()[0].sent >= 5; }, 5));
  EXPECT_EQ(a_dead.load(), 0);

  b->reset();  // b's process is gone
  ASSERT_TRUE(WaitUntil([&] { return a_dead.load() == 1; }, 5));
  uint64_t c_sent = (*c)->paths()[0].sent;
  ASSERT_TRUE(WaitUntil([&] { return (*c)->paths()[0].sent >= c_sent + 5; }, 5));
  EXPECT_FALSE((*a)->peer_alive());
  for (const auto& p : (*a)->paths()) EXPECT_FALSE(p.up) << p.name;
  EXPECT_EQ((*a)->paths()[0].rejected, 0u);
  c->reset();

  // Replication traffic alone keeps the peer alive.
  (*a)->NoteTrafficFromPeer();
  EXPECT_TRUE((*a)->peer_alive());
}

// A UDP socket on loopback that plays the peer (or the witness), with bounded waits.
class FakePeer {
 public:
  FakePeer() : socket_(io_, {boost::asio::ip::make_address("127.0.0.1"), 0}) {
    socket_.non_blocking(true);
  }
  uint16_t port() const { return socket_.local_endpoint().port(); }
  // Waits for the next heartbeat from `a_port` and answers it as peer "b" in `role`, numbered
  // `seq`, echoing it with `echo_hold_us` when given: a peer at a's pace.
  bool AnswerHeartbeat(uint16_t a_port, uint64_t seq, const std::string& role,
                       std::optional<uint64_t> echo_hold_us = std::nullopt) {
    auto heard = Receive(5);
    if (!heard.has_value() || !heard->has_heartbeat()) return false;
    pb::SwitchoverMessage m;
    pb::Heartbeat* h = m.mutable_heartbeat();
    h->set_vm_id("vm1");
    h->set_node("b");
    h->set_role(role);
    h->set_session(7);
    h->set_seq(seq);
    if (echo_hold_us) {
      h->set_echo_seq(heard->heartbeat().seq());
      h->set_echo_hold_us(*echo_hold_us);
    }
    SendTo(a_port, m);
    return true;
  }
  void SendTo(uint16_t port, const pb::SwitchoverMessage& m) {
    socket_.send_to(boost::asio::buffer(Seal(kKey, m)),
                    {boost::asio::ip::make_address("127.0.0.1"), port});
  }
  // The next authentic message within `seconds` (scaled), and the port it came from.
  std::optional<pb::SwitchoverMessage> Receive(double seconds, uint16_t* from = nullptr) {
    std::optional<pb::SwitchoverMessage> out;
    WaitUntil(
        [&] {
          std::array<char, 2048> buf;
          boost::asio::ip::udp::endpoint sender;
          boost::system::error_code ec;
          size_t n = socket_.receive_from(boost::asio::buffer(buf), sender, 0, ec);
          if (ec) return false;
          auto m = Open(kKey, absl::string_view(buf.data(), n));
          if (!m.ok()) return false;
          if (from) *from = sender.port();
          out = std::move(*m);
          return true;
        },
        seconds);
    return out;
  }

 private:
  boost::asio::io_context io_;
  boost::asio::ip::udp::socket socket_;
};

// A path to a fake peer "b" with a short interval and a long timeout (the path stays up between
// the fake peer's heartbeats).
// `on_peer_dead` and `log` as in Heartbeat::Options.
std::unique_ptr<Heartbeat> HeartbeatTo(const FakePeer& b, uint16_t a_port,
                                       std::function<void()> on_peer_dead = nullptr,
                                       LogFn log = nullptr) {
  Heartbeat::Options o;
  o.vm_id = "vm1";
  o.node = "a";
  o.role = "primary";
  o.key = kKey;
  o.paths = {{{"127.0.0.1", a_port}, {"127.0.0.1", b.port()}}};
  o.interval = milliseconds(10);
  o.timeout = milliseconds(5000);
  o.on_peer_dead = std::move(on_peer_dead);
  o.log = std::move(log);
  auto a = Heartbeat::Start(o);
  EXPECT_TRUE(a.ok()) << a.status();
  return a.ok() ? std::move(*a) : nullptr;
}

// echo_hold_us comes from the peer: a hold of 2^62 us, converted to the clock's nanoseconds,
// overflowed. A hold longer than the time since the echoed heartbeat was sent measures nothing:
// the heartbeat counts, its round trip does not.
TEST(Heartbeat, AnImpossibleEchoHoldGivesNoRoundTrip) {
  FakePeer b;
  uint16_t a_port = testing::FreePort(SOCK_DGRAM);
  auto a = HeartbeatTo(b, a_port);
  ASSERT_NE(a, nullptr);
  uint64_t seq = 0;
  auto reply = [&](uint64_t hold_us) {
    return b.AnswerHeartbeat(a_port, ++seq, "mirror", hold_us);
  };
  for (uint64_t hold : {uint64_t{1} << 62, ~uint64_t{0}, uint64_t{1} << 40}) {
    uint64_t received = a->paths()[0].received;
    ASSERT_TRUE(reply(hold));
    ASSERT_TRUE(WaitUntil([&] { return a->paths()[0].received > received; }, 5)) << hold;
    EXPECT_TRUE(a->paths()[0].up);
    EXPECT_EQ(a->paths()[0].rtt_ms, -1) << "hold " << hold;
  }
  // A hold that fits gives a round trip.
  ASSERT_TRUE(reply(0));
  EXPECT_TRUE(WaitUntil([&] { return a->paths()[0].rtt_ms >= 0; }, 5));
}

// Heartbeats are numbered from 1: one numbered 0 (its loss window would start at 2^64 - 1) is
// refused, even as the first a path hears.
TEST(Heartbeat, AHeartbeatNumberedZeroIsRefused) {
  FakePeer b;
  uint16_t a_port = testing::FreePort(SOCK_DGRAM);
  auto a = HeartbeatTo(b, a_port);
  ASSERT_NE(a, nullptr);
  pb::SwitchoverMessage zero;
  zero.mutable_heartbeat()->set_vm_id("vm1");
  zero.mutable_heartbeat()->set_node("b");
  zero.mutable_heartbeat()->set_session(7);
  b.SendTo(a_port, zero);
  EXPECT_TRUE(WaitUntil([&] { return a->paths()[0].rejected == 1; }, 5));
  EXPECT_EQ(a->paths()[0].received, 0u);
  EXPECT_FALSE(a->paths()[0].up);
}

// A peer whose replication stream ended from its side (a process that died closes it) is dead
// once its heartbeats' own gaps say so, not after the configured timeout (5 s here); heard again,
// the configured timeout is back.
TEST(Heartbeat, APeerWhoseStreamClosedIsJudgedByItsGapsNotTheConfiguredTimeout) {
  FakePeer b;
  uint16_t a_port = testing::FreePort(SOCK_DGRAM);
  std::atomic<int> dead{0};
  std::mutex mu;
  std::string lines;
  auto started = HeartbeatTo(
      b, a_port, [&] { ++dead; },
      [&](absl::string_view line) {
        std::lock_guard<std::mutex> lock(mu);
        absl::StrAppend(&lines, line, "\n");
      });
  ASSERT_NE(started, nullptr);
  Heartbeat& a = *started;
  uint64_t seq = 0;
  auto reply = [&] { return b.AnswerHeartbeat(a_port, ++seq, "primary"); };
  for (int i = 0; i < 20; i++) ASSERT_TRUE(reply());
  ASSERT_TRUE(WaitUntil([&] { return a.peer_alive() && a.paths()[0].received == 20; }, 5));
  EXPECT_GE(a.timeout(), milliseconds(5000));
  EXPECT_FALSE(a.peer_closed_stream());
  a.NotePeerClosedStream();
  EXPECT_TRUE(a.peer_closed_stream());
  EXPECT_LT(a.timeout(), milliseconds(5000));
  // Heartbeats still on their way when the stream closed.
  ASSERT_TRUE(reply());
  ASSERT_TRUE(reply());
  ASSERT_TRUE(WaitUntil([&] { return dead.load() == 1; }, 5))
      << a.timeout().count() << " ms; up " << a.paths()[0].up << "; " << lines;
  {
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_THAT(lines, ::testing::HasSubstr("and its replication stream closed")) << lines;
  }
  for (int i = 0; i < 4; i++) ASSERT_TRUE(reply());
  ASSERT_TRUE(WaitUntil([&] { return a.peer_alive(); }, 5));
  EXPECT_GE(a.timeout(), milliseconds(5000));
  EXPECT_FALSE(a.peer_closed_stream());
}

// A peer whose process died: its stream closed, and its host answers our next heartbeat with
// "port unreachable". That is enough; the silence its gaps call for is not waited for.
TEST(Heartbeat, APeerWhoseStreamClosedAndWhosePortsRefuseIsDeadAtOnce) {
  std::optional<FakePeer> b(std::in_place);
  uint16_t a_port = testing::FreePort(SOCK_DGRAM);
  std::atomic<int> dead{0};
  std::mutex mu;
  std::string lines;
  Heartbeat::Options o;
  o.vm_id = "vm1";
  o.node = "a";
  o.role = "mirror";
  o.key = kKey;
  o.paths = {{{"127.0.0.1", a_port}, {"127.0.0.1", b->port()}}};
  // Long enough that the gaps' judgment (at least two intervals of silence) comes a whole
  // interval after the first heartbeat sent into the closed port.
  o.interval = milliseconds(200);
  o.timeout = milliseconds(5000);
  o.on_peer_dead = [&] { ++dead; };
  o.log = [&](absl::string_view line) {
    std::lock_guard<std::mutex> lock(mu);
    absl::StrAppend(&lines, line, "\n");
  };
  auto started = Heartbeat::Start(o);
  ASSERT_TRUE(started.ok()) << started.status();
  Heartbeat& a = **started;
  for (uint64_t seq = 1; seq <= 3; seq++) ASSERT_TRUE(b->AnswerHeartbeat(a_port, seq, "primary"));
  ASSERT_TRUE(WaitUntil([&] { return a.peer_alive() && a.paths()[0].received == 3; }, 5));
  a.NotePeerClosedStream();
  b.reset();
  ASSERT_TRUE(WaitUntil([&] { return dead.load() == 1; }, 10)) << lines;
  std::lock_guard<std::mutex> lock(mu);
  EXPECT_THAT(lines, ::testing::HasSubstr("peer dead: its process is gone")) << lines;
}

// A lease longer than any witness grants (ttl_ms up to 49 days) is not believed.
TEST(Lease, AGrantLongerThanAnyWitnessGivesIsNotBelieved) {
  FakePeer witness;
  LeaseClient::Options o;
  o.vm_id = "vm1";
  o.node = "a";
  o.key = kKey;
  o.witness = {"127.0.0.1", witness.port()};
  o.renew = milliseconds(20);
  auto c = LeaseClient::Start(o);
  ASSERT_TRUE(c.ok()) << c.status();
  (*c)->Want(true);
  auto grant = [&](uint32_t ttl_ms) {
    uint16_t from = 0;
    auto asked = witness.Receive(5, &from);
    if (!asked.has_value() || !asked->has_lease_request()) return false;
    pb::SwitchoverMessage m;
    pb::LeaseReply* r = m.mutable_lease_reply();
    r->set_request_id(asked->lease_request().request_id());
    r->set_granted(true);
    r->set_holder("a");
    r->set_ttl_ms(ttl_ms);
    r->set_next_nonce("n");
    witness.SendTo(from, m);
    return true;
  };
  for (uint32_t ttl : {kMaxLeaseMs + 1, ~uint32_t{0}}) {
    ASSERT_TRUE(grant(ttl));
    // The client renews every 20 ms, on the thread that handles replies: two requests later the
    // reply (on loopback, there in microseconds) has been handled.
    ASSERT_TRUE(witness.Receive(5).has_value());
    ASSERT_TRUE(witness.Receive(5).has_value());
    EXPECT_FALSE((*c)->held()) << ttl;
  }
  ASSERT_TRUE(grant(5000));
  EXPECT_TRUE(WaitUntil([&] { return (*c)->held(); }, 5));
  (*c)->Want(false);
}

TEST(Fence, TheCommandDecidesAndIsKilledWhenItHangs) {
  EXPECT_TRUE(RunFenceCommand("true", milliseconds(2000)).ok());
  absl::Status failed = RunFenceCommand("exit 3", milliseconds(2000));
  EXPECT_EQ(failed.code(), absl::StatusCode::kAborted);
  EXPECT_THAT(std::string(failed.message()), HasSubstr("exit 3"));
  // Killed with what it started: the shell's child (whose pid it wrote) goes too.
  TempDir dir;
  std::string pid_file = dir.File("child.pid");
  absl::Status hung =
      RunFenceCommand("sleep 30 & echo $! > " + pid_file + "; wait", milliseconds(300));
  EXPECT_EQ(hung.code(), absl::StatusCode::kDeadlineExceeded);
  int child = std::atoi(ReadFile(pid_file).c_str());
  ASSERT_GT(child, 1);
  // Gone, or a zombie its new parent has yet to reap.
  EXPECT_TRUE(WaitUntil(
      [&] {
        std::string stat = ReadFile("/proc/" + std::to_string(child) + "/stat");
        size_t paren = stat.rfind(')');
        return stat.empty() || (paren != std::string::npos && stat.substr(paren + 2, 1) == "Z");
      },
      5));
  // A negative timeout was handed to poll as is, which then waits for as long as the command
  // runs: now it is no wait at all (and one past INT_MAX ms is INT_MAX, not negative).
  absl::Status negative = RunFenceCommand("sleep 30", milliseconds(-1));
  EXPECT_EQ(negative.code(), absl::StatusCode::kDeadlineExceeded);
}

// A health check's program (smartctl): its output is captured up to the bound, and a child it left
// running with the output still open is not waited for.
TEST(RunProgram, CapturesABoundedOutputAndDoesNotWaitForWhatTheProgramLeftBehind) {
  auto big = RunProgram({"/bin/sh", "-c", "head -c 100000 /dev/zero"}, milliseconds(30'000), 1000);
  ASSERT_TRUE(big.ok()) << big.status();
  EXPECT_EQ(big->exit_code, 0);
  EXPECT_EQ(big->output.size(), 1000u);
  auto left =
      RunProgram({"/bin/sh", "-c", "sleep 600 & echo $!; exit 4"}, testing::ScaledMs(60), 100);
  ASSERT_TRUE(left.ok()) << left.status();
  EXPECT_FALSE(left->timed_out);
  EXPECT_EQ(left->exit_code, 4);
  int child = std::atoi(left->output.c_str());
  ASSERT_GT(child, 1) << left->output;
  ::kill(child, SIGKILL);
  auto missing = RunProgram({"/nonexistent/smartctl"}, milliseconds(1000), 100);
  EXPECT_FALSE(missing.ok());
}

TEST(Promotion, NeedsALeaseOrAFenceOrAnOperatorsForce) {
  PromotionPolicy none;
  absl::Status refused = AuthorizePromotion(none, /*force=*/false);
  EXPECT_EQ(refused.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(refused.message()), HasSubstr("romulus promote --force"));
  EXPECT_TRUE(AuthorizePromotion(none, /*force=*/true).ok());

  PromotionPolicy fence;
  fence.fence_command = "exit 1";
  EXPECT_FALSE(AuthorizePromotion(fence, false).ok());
  fence.fence_command = "true";
  EXPECT_TRUE(AuthorizePromotion(fence, false).ok());

  auto w = StartWitness();
  auto a = StartClient(*w, "a");
  auto b = StartClient(*w, "b");
  ASSERT_TRUE(a->AcquireWithin(milliseconds(3000)).ok());
  PromotionPolicy lease;
  lease.lease = b.get();
  lease.state_term = a->term();  // b's replica holds what a runs
  lease.wait = milliseconds(100);
  absl::Status held = AuthorizePromotion(lease, false);
  EXPECT_THAT(std::string(held.message()), HasSubstr("held by a"));
  EXPECT_TRUE(a->held());

  // A refused promotion stops asking (issue 26, finding 3): when a's lease lapses, b, which
  // does not run the VM, must not take it (it used to, fencing the live primary at its next
  // renewal gap).
  a.reset();
  ASSERT_TRUE(WaitUntil([&] { return w->holders().empty(); }, 5));
  // Long enough for many of b's renewal ticks (20 ms), had it kept asking.
  auto until = Clock::now() + milliseconds(300);
  while (Clock::now() < until) {
    EXPECT_FALSE(b->held());
    EXPECT_TRUE(w->holders().empty());
    std::this_thread::sleep_for(milliseconds(10));
  }
}

TEST(Endpoint, ParsesAddressAndPortAndRefusesTheRest) {
  auto e = ParseEndpoint("10.0.0.1:7000");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->host, "10.0.0.1");
  EXPECT_EQ(e->port, 7000);
  auto v6 = ParseEndpoint("[::1]:9");
  ASSERT_TRUE(v6.ok());
  EXPECT_EQ(v6->host, "::1");
  for (const char* bad : {"", "10.0.0.1", ":80", "10.0.0.1:", "10.0.0.1:65536", "h:1x", "[::1:5"}) {
    EXPECT_FALSE(ParseEndpoint(bad).ok()) << bad;
  }
}

}  // namespace
}  // namespace romulus::switchover::switchover_test
