// Two hosts and a witness as network namespaces: hosts a and b joined by two veth paths, each
// with its own link to the witness w. nftables cuts paths or drops a share of their packets.
// Every wait is bounded; the lab (namespaces, links, rules) goes away with the fixture.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>

#include "switchover/switchover.h"
#include "tests/netns.h"
#include "tests/test_util.h"

namespace romulus::switchover::netns_switchover_test {
namespace {

using std::chrono::milliseconds;
using ::testing::HasSubstr;
using testing::WaitUntil;

const std::string kKey = "netns-switchover-key-0123456789";
constexpr uint16_t kHeartbeatPort = 7100, kWitnessPort = 7300;

class SwitchoverNetns : public ::testing::Test {
 protected:
  void SetUp() override {
    ROMULUS_REQUIRE_NETNS();
    for (const char* h : {"a", "b", "w"}) ASSERT_TRUE(lab_.AddHost(h).ok());
    auto link = [&](const char* a, const char* aa, const char* b, const char* ba) {
      auto l = lab_.Link(a, aa, b, ba);
      EXPECT_TRUE(l.ok()) << l.status();
      return l.ok() ? *l : -1;
    };
    path1_ = link("a", "10.201.1.1", "b", "10.201.1.2");
    path2_ = link("a", "10.201.2.1", "b", "10.201.2.2");
    a_witness_ = link("a", "10.201.3.1", "w", "10.201.3.2");
    link("b", "10.201.4.1", "w", "10.201.4.2");
    ASSERT_FALSE(HasFailure());
  }

  // Heartbeats of `node` ("a" or "b") over both paths.
  std::unique_ptr<Heartbeat> StartHeartbeat(const std::string& node, std::atomic<int>* deaths) {
    Heartbeat::Options o;
    o.vm_id = "vm1";
    o.node = node;
    o.role = node == "a" ? "primary" : "mirror";
    o.key = kKey;
    std::string me = node == "a" ? ".1" : ".2", peer = node == "a" ? ".2" : ".1";
    for (const char* net : {"10.201.1", "10.201.2"}) {
      o.paths.push_back({{net + me, kHeartbeatPort}, {net + peer, kHeartbeatPort}});
    }
    o.on_peer_dead = [deaths] { ++*deaths; };
    // These tests are about paths (cut, lossy, partitioned), not about how soon a death is seen:
    // at the 50 ms default a process stalled that long on a loaded machine (under TSan, seen
    // once) counts as a dead peer.
    o.timeout = testing::ScaledMs(0.2);
    std::unique_ptr<Heartbeat> hb;
    lab_.RunIn(node, [&] {
      auto started = Heartbeat::Start(o);
      ASSERT_TRUE(started.ok()) << started.status();
      hb = std::move(*started);
    });
    return hb;
  }

  std::unique_ptr<LeaseClient> StartLease(const std::string& node) {
    LeaseClient::Options o;
    o.vm_id = "vm1";
    o.node = node;
    o.key = kKey;
    o.witness = {node == "a" ? "10.201.3.2" : "10.201.4.2", kWitnessPort};
    o.renew = milliseconds(30);
    std::unique_ptr<LeaseClient> c;
    lab_.RunIn(node, [&] {
      auto started = LeaseClient::Start(o);
      ASSERT_TRUE(started.ok()) << started.status();
      c = std::move(*started);
    });
    return c;
  }

  std::unique_ptr<Witness> StartWitness() {
    Witness::Options o;
    o.key = kKey;
    o.listen = {"0.0.0.0", kWitnessPort};
    o.lease = milliseconds(150);
    std::unique_ptr<Witness> w;
    lab_.RunIn("w", [&] {
      auto started = Witness::Start(o);
      ASSERT_TRUE(started.ok()) << started.status();
      w = std::move(*started);
    });
    return w;
  }

  // Both peers hear each other on both paths.
  static bool BothPathsUp(const Heartbeat& hb) {
    auto p = hb.paths();
    return p.size() == 2 && p[0].up && p[1].up;
  }

  testing::NetnsLab lab_;
  int path1_ = -1, path2_ = -1, a_witness_ = -1;
};

TEST_F(SwitchoverNetns, OnePathCutForTheWholeRunIsNoFailure) {
  std::atomic<int> a_deaths{0}, b_deaths{0};
  ASSERT_TRUE(lab_.Cut("a", {lab_.Interface(path1_, "a")}).ok());
  auto a = StartHeartbeat("a", &a_deaths);
  auto b = StartHeartbeat("b", &b_deaths);
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(WaitUntil([&] { return a->peer_alive() && b->peer_alive(); }, 5));
  // 300 heartbeats on the surviving path: three seconds at the default interval.
  ASSERT_TRUE(WaitUntil([&] { return b->paths()[1].received >= 300; }, 20));
  EXPECT_EQ(a_deaths.load(), 0);
  EXPECT_EQ(b_deaths.load(), 0);
  for (Heartbeat* hb : {a.get(), b.get()}) {
    auto p = hb->paths();
    EXPECT_FALSE(p[0].up) << p[0].name;
    EXPECT_EQ(p[0].received, 0u) << p[0].name;
    EXPECT_TRUE(p[1].up) << p[1].name;
    EXPECT_TRUE(hb->peer_alive());
  }
}

TEST_F(SwitchoverNetns, ThirtyPercentLossOnOnePathIsNoFailureAndIsMeasured) {
  std::atomic<int> a_deaths{0}, b_deaths{0};
  // Drop 30 % of what a receives on path 1, at random.
  ASSERT_TRUE(lab_.SetRules("a",
                            "table inet loss {\n"
                            "  chain in { type filter hook input priority 0;\n"
                            "    iifname \"" +
                                lab_.Interface(path1_, "a") +
                                "\" numgen random mod 100 < 30 drop; }\n}\n")
                  .ok());
  auto a = StartHeartbeat("a", &a_deaths);
  auto b = StartHeartbeat("b", &b_deaths);
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(WaitUntil([&] { return a->peer_alive() && b->peer_alive(); }, 5));
  ASSERT_TRUE(WaitUntil([&] { return a->paths()[1].received >= 400; }, 30));
  EXPECT_EQ(a_deaths.load(), 0);
  EXPECT_EQ(b_deaths.load(), 0);
  auto p = a->paths();
  // About 280 of 400 arrived on the lossy path; the measured loss says so.
  EXPECT_GT(p[0].received, 200u);
  EXPECT_LT(p[0].received, 360u);
  if (p[0].up) {
    EXPECT_GT(p[0].loss, 0.1);
    EXPECT_LT(p[0].loss, 0.5);
  }
  EXPECT_EQ(a->paths()[1].loss, 0.0);
}

TEST_F(SwitchoverNetns, APartitionBetweenTheHostsLeavesExactlyOnePrimary) {
  auto w = StartWitness();
  ASSERT_TRUE(w);
  std::atomic<int> a_deaths{0}, b_deaths{0};
  auto a_hb = StartHeartbeat("a", &a_deaths);
  auto b_hb = StartHeartbeat("b", &b_deaths);
  auto a = StartLease("a");
  auto b = StartLease("b");
  ASSERT_TRUE(a_hb && b_hb && a && b);
  ASSERT_TRUE(a->AcquireWithin(milliseconds(5000)).ok());  // a is the primary
  ASSERT_TRUE(WaitUntil([&] { return b_hb->peer_alive(); }, 5));

  // Both paths between the hosts cut; both still reach the witness.
  ASSERT_TRUE(lab_.Cut("a", {lab_.Interface(path1_, "a"), lab_.Interface(path2_, "a")}).ok());
  ASSERT_TRUE(WaitUntil([&] { return b_deaths.load() == 1 && a_deaths.load() == 1; }, 5));
  PromotionPolicy policy;
  policy.lease = b.get();
  policy.state_term = a->term();  // b's replica holds what a runs
  policy.wait = milliseconds(300);
  for (int attempt = 0; attempt < 3; ++attempt) {
    absl::Status s = AuthorizePromotion(policy, /*force=*/false);
    EXPECT_THAT(std::string(s.message()), HasSubstr("held by a")) << s;
    EXPECT_TRUE(a->held());
  }
  b->Want(false);
  auto holders = w->holders();
  ASSERT_EQ(holders.size(), 1u);
  EXPECT_EQ(holders[0].node, "a");

  // Now a loses the witness too: its lease lapses, and only then is b granted one.
  ASSERT_TRUE(lab_.Cut("a", {lab_.Interface(path1_, "a"), lab_.Interface(path2_, "a"),
                             lab_.Interface(a_witness_, "a")})
                  .ok());
  ASSERT_TRUE(WaitUntil([&] { return !a->held(); }, 5));
  policy.wait = milliseconds(2000);
  ASSERT_TRUE(AuthorizePromotion(policy, false).ok());
  EXPECT_FALSE(a->held());
  EXPECT_GE(b->status().held_since, a->status().held_until);
  EXPECT_FALSE(a->status().witness_reachable);

  // Healed: a asks again and is told a newer term superseded it; both hear each other; still
  // one primary.
  ASSERT_TRUE(lab_.Cut("a", {}).ok());
  ASSERT_TRUE(WaitUntil([&] { return a_hb->peer_alive() && b_hb->peer_alive(); }, 5));
  absl::Status back = a->AcquireWithin(milliseconds(1000));
  EXPECT_THAT(std::string(back.message()), HasSubstr("superseded"));
  EXPECT_TRUE(b->held());
  EXPECT_FALSE(a->held());
}

}  // namespace
}  // namespace romulus::switchover::netns_switchover_test
