// A busy or flooded host is not a dead host: the failure detector's timeout follows how late
// heartbeats come (deterministic, no sockets), and floods of datagrams that do not know the key
// neither make a live peer look dead nor take a lease from its holder.
// clang-format off
#include <utility>
#include <boost/asio.hpp>
// clang-format on
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "switchover/datagram.h"
#include "switchover/failure_detector.h"
#include "switchover/switchover.h"
#include "tests/test_util.h"

namespace romulus::switchover::busy_host_test {
namespace {

using std::chrono::milliseconds;
using testing::WaitUntil;
using Clock = FailureDetector::Clock;

const std::string kKey = "busy-host-test-key-0123456789";

FailureDetector Detector() {
  return FailureDetector({.floor = milliseconds(50),
                          .ceiling = milliseconds(200),
                          .memory = milliseconds(8000),
                          .margin = 2.0});
}

// Heartbeats every `every` from `from` for `count` arrivals; the time of the last.
Clock::time_point Arrivals(FailureDetector& d, Clock::time_point from, milliseconds every,
                           int count) {
  Clock::time_point t = from;
  for (int i = 0; i < count; i++, t += every) d.Heard(t);
  return t - every;
}

TEST(FailureDetector, OnACalmHostTheTimeoutIsTheConfiguredOne) {
  FailureDetector d = Detector();
  Clock::time_point t0{};
  EXPECT_FALSE(d.Alive(t0));  // never heard
  Clock::time_point last = Arrivals(d, t0, milliseconds(10), 1000);
  EXPECT_EQ(d.timeout(last), milliseconds(50));
  EXPECT_TRUE(d.Alive(last + milliseconds(49)));
  EXPECT_FALSE(d.Alive(last + milliseconds(50)));
}

TEST(FailureDetector, LateHeartbeatsRaiseTheTimeoutAboveTheGapsSeen) {
  FailureDetector d = Detector();
  Clock::time_point t = Arrivals(d, Clock::time_point{}, milliseconds(10), 100);
  // A busy host: one heartbeat 40 ms late (a gap the configured 50 ms survives)...
  t += milliseconds(40);
  d.Heard(t);
  EXPECT_EQ(d.timeout(t), milliseconds(80));
  t = Arrivals(d, t + milliseconds(10), milliseconds(10), 100);
  // ...so that a later gap of 70 ms, which the configured timeout would call a death, is not.
  EXPECT_TRUE(d.Alive(t + milliseconds(70)));
  t += milliseconds(70);
  d.Heard(t);
  EXPECT_EQ(d.timeout(t), milliseconds(140));
  // Longer silences are capped: a peer silent for the ceiling is dead, however late it was.
  t += milliseconds(150);
  d.Heard(t);
  EXPECT_EQ(d.timeout(t), milliseconds(200));
  EXPECT_TRUE(d.Alive(t + milliseconds(199)));
  EXPECT_FALSE(d.Alive(t + milliseconds(200)));
  EXPECT_FALSE(d.Alive(t + milliseconds(100000)));
}

TEST(FailureDetector, ARaiseWearsOffOnceTheHostIsCalmForTheMemory) {
  FailureDetector d = Detector();
  Clock::time_point t = Arrivals(d, Clock::time_point{}, milliseconds(10), 10);
  t += milliseconds(90);
  d.Heard(t);
  EXPECT_EQ(d.timeout(t), milliseconds(180));
  // Still raised within the memory (8 s here)...
  t = Arrivals(d, t + milliseconds(10), milliseconds(10), 700);
  EXPECT_EQ(d.timeout(t), milliseconds(180));
  // ...and back to the configured timeout after a memory (and one of its slices) of calm.
  t = Arrivals(d, t + milliseconds(10), milliseconds(10), 200 + 100);
  EXPECT_EQ(d.timeout(t), milliseconds(50));
  // The same with no heartbeats at all: the peer is long dead, the timeout back to the floor.
  FailureDetector quiet = Detector();
  Clock::time_point q = Arrivals(quiet, Clock::time_point{}, milliseconds(100), 2);
  EXPECT_EQ(quiet.timeout(q), milliseconds(200));
  EXPECT_EQ(quiet.timeout(q + milliseconds(10000)), milliseconds(50));
}

TEST(FailureDetector, ARestartedPeerStartsAfresh) {
  FailureDetector d = Detector();
  Clock::time_point t = Arrivals(d, Clock::time_point{}, milliseconds(100), 3);
  EXPECT_EQ(d.timeout(t), milliseconds(200));
  d.Forget();
  EXPECT_FALSE(d.Alive(t));
  t = Arrivals(d, t + milliseconds(5000), milliseconds(10), 10);
  EXPECT_EQ(d.timeout(t), milliseconds(50));
  EXPECT_TRUE(d.Alive(t));
}

TEST(FailureDetector, TimeGoingBackIsNoGapAndBoundsAreKept) {
  FailureDetector d = Detector();
  Clock::time_point t = Arrivals(d, Clock::time_point{} + milliseconds(1000), milliseconds(10), 5);
  d.Heard(t - milliseconds(500));  // taken as the last arrival
  EXPECT_EQ(d.last_heard(), t);
  EXPECT_EQ(d.timeout(t), milliseconds(50));
  // A ceiling below the floor is the floor: no adapting.
  FailureDetector fixed({.floor = milliseconds(50), .ceiling = milliseconds(10)});
  Arrivals(fixed, Clock::time_point{}, milliseconds(1000), 3);
  EXPECT_EQ(fixed.timeout(Clock::time_point{} + milliseconds(2000)), milliseconds(50));
}

// Sends datagrams sealed with a key nobody uses to 127.0.0.1:`port` from a thread of its own,
// as fast as it can, until `count` went or `seconds` (not scaled: it is a load) passed.
class Flood {
 public:
  Flood(uint16_t port, uint64_t count, double seconds) {
    thread_ = std::thread([this, port, count, seconds] {
      namespace asio = boost::asio;
      asio::io_context io;
      asio::ip::udp::socket s(io, asio::ip::udp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
      asio::ip::udp::endpoint to(asio::ip::make_address("127.0.0.1"), port);
      pb::SwitchoverMessage m;
      m.mutable_heartbeat()->set_vm_id("vm1");
      m.mutable_heartbeat()->set_node("b");
      m.mutable_heartbeat()->set_seq(1);
      m.mutable_lease_request()->set_vm_id("vm1");
      m.mutable_lease_request()->set_node("x");
      std::string bytes = Seal("not-the-key-of-anybody-here-0123", m);
      auto end = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                    std::chrono::duration<double>(seconds));
      for (uint64_t i = 0; i < count && !stop_; i++) {
        if (i % 1024 == 0 && Clock::now() >= end) break;
        boost::system::error_code ec;
        s.send_to(asio::buffer(bytes), to, 0, ec);
        if (!ec) sent_++;
      }
      done_ = true;
    });
  }
  ~Flood() {
    stop_ = true;
    thread_.join();
  }
  bool done() const { return done_; }
  uint64_t sent() const { return sent_; }

 private:
  std::atomic<bool> stop_{false}, done_{false};
  std::atomic<uint64_t> sent_{0};
  std::thread thread_;
};

// A flood at one host's heartbeat port: the peer stays alive there throughout, and none of it
// reaches the heartbeat's thread (the kernel drops what does not come from the peer's end of
// the path). Before, every datagram was read and its MAC checked, and the peer's heartbeats were
// lost among them: it looked dead in 4-8 % of samples.
TEST(BusyHost, AFloodAtAHeartbeatPortDoesNotMakeThePeerLookDead) {
  uint16_t a_port = testing::FreePort(SOCK_DGRAM), b_port = testing::FreePort(SOCK_DGRAM);
  std::atomic<int> a_dead{0};
  auto options = [&](const std::string& node, uint16_t local, uint16_t remote) {
    Heartbeat::Options o;
    o.vm_id = "vm1";
    o.node = node;
    o.role = node == "a" ? "primary" : "mirror";
    o.key = kKey;
    o.paths = {{{"127.0.0.1", local}, {"127.0.0.1", remote}}};
    o.interval = milliseconds(10);
    // Longer than a busy test machine's stalls, and than the adaptive ceiling would need.
    o.timeout = testing::ScaledMs(0.25);
    o.timeout_max = o.timeout;
    if (node == "a") o.on_peer_dead = [&] { ++a_dead; };
    return o;
  };
  auto a = Heartbeat::Start(options("a", a_port, b_port));
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = Heartbeat::Start(options("b", b_port, a_port));
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_TRUE(WaitUntil([&] { return (*a)->peer_alive() && (*a)->paths()[0].received > 10; }, 5));
  uint64_t received = (*a)->paths()[0].received;
  {
    Flood flood(a_port, 2'000'000, 3);
    ASSERT_TRUE(WaitUntil([&] { return flood.done(); }, 60));
    EXPECT_GT(flood.sent(), 10000u);
  }
  EXPECT_EQ(a_dead.load(), 0);
  EXPECT_TRUE((*a)->peer_alive());
  EXPECT_GT((*a)->paths()[0].received, received + 100);
  EXPECT_EQ((*a)->paths()[0].rejected, 0u);
}

// A flood at the witness: the lease's holder keeps it throughout. Before, the witness's socket
// filled with the flood and renewals were lost: a primary lost its lease 5 times in 10 s.
TEST(BusyHost, AFloodAtTheWitnessDoesNotTakeTheLeaseFromItsHolder) {
  Witness::Options wo;
  wo.key = kKey;
  wo.listen = {"127.0.0.1", 0};
  wo.lease = testing::ScaledMs(0.25);
  auto w = Witness::Start(wo);
  ASSERT_TRUE(w.ok()) << w.status();
  std::atomic<int> lost{0};
  LeaseClient::Options o;
  o.vm_id = "vm1";
  o.node = "a";
  o.key = kKey;
  o.witness = {"127.0.0.1", (*w)->port()};
  o.renew = milliseconds(20);
  o.on_lost = [&] { ++lost; };
  auto c = LeaseClient::Start(o);
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_TRUE((*c)->AcquireWithin(testing::ScaledMs(5)).ok());
  uint64_t rejected = (*w)->rejected();
  {
    Flood flood((*w)->port(), 2'000'000, 3);
    ASSERT_TRUE(WaitUntil([&] { return flood.done(); }, 60));
    EXPECT_GT(flood.sent(), 10000u);
  }
  EXPECT_EQ(lost.load(), 0);
  EXPECT_TRUE((*c)->held());
  EXPECT_GT((*w)->rejected(), rejected);  // the flood did arrive
}

}  // namespace
}  // namespace romulus::switchover::busy_host_test
