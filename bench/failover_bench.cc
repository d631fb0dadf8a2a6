// Failover decision time over loopback, no KVM needed: a primary (heartbeats + lease) is killed
// at a random moment and the mirror's side is timed from the kill to
//   - detection: every path silent past the timeout (baseline: the configured timeout),
//   - authorisation with the witness: the mirror holds the lease (the old one must lapse first),
//   - authorisation with a fencing command instead (`true`).
// Resuming the replica as a VM needs /dev/kvm and is not part of this figure.
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

// clang-format off
#include <utility>
#include <boost/asio.hpp>
// clang-format on

#include "switchover/switchover.h"

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
namespace sw = romulus::switchover;

const char kKey[] = "failover-bench-key-0123456789";

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }
double Pct(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[std::min(v.size() - 1, static_cast<size_t>(p * v.size()))];
}

uint16_t FreeUdpPort() {
  boost::asio::io_context io;
  boost::asio::ip::udp::socket s(
      io, boost::asio::ip::udp::endpoint(boost::asio::ip::make_address("127.0.0.1"), 0));
  return s.local_endpoint().port();
}

void Die(const std::string& what) {
  std::fprintf(stderr, "failover_bench: %s\n", what.c_str());
  std::exit(1);
}

struct Dead {
  std::mutex mu;
  std::condition_variable cv;
  bool dead = false;
  Clock::time_point at;
};

}  // namespace

int main(int argc, char** argv) {
  int kills = argc > 1 ? std::atoi(argv[1]) : 200;
  if (kills < 1 || kills > 100000) Die("usage: romulus_failover_bench [KILLS]");
  const milliseconds interval(10), timeout(50), lease(150);
  uint16_t pa = FreeUdpPort(), pb = FreeUdpPort(), ma = FreeUdpPort(), mb = FreeUdpPort();
  auto witness = sw::Witness::Start({.key = kKey, .listen = {"127.0.0.1", 0}, .lease = lease});
  if (!witness.ok()) Die(std::string(witness.status().message()));
  sw::Endpoint w{"127.0.0.1", (*witness)->port()};

  auto heartbeat = [&](const std::string& node, Dead* dead) {
    sw::Heartbeat::Options o;
    o.vm_id = "bench";
    o.node = node;
    o.role = node == "p" ? "primary" : "mirror";
    o.key = kKey;
    o.interval = interval;
    o.timeout = timeout;
    if (node == "p") {
      o.paths = {{{"127.0.0.1", pa}, {"127.0.0.1", ma}}, {{"127.0.0.1", pb}, {"127.0.0.1", mb}}};
    } else {
      o.paths = {{{"127.0.0.1", ma}, {"127.0.0.1", pa}}, {{"127.0.0.1", mb}, {"127.0.0.1", pb}}};
      o.on_peer_dead = [dead] {
        std::lock_guard<std::mutex> lock(dead->mu);
        dead->dead = true;
        dead->at = Clock::now();
        dead->cv.notify_all();
      };
    }
    auto hb = sw::Heartbeat::Start(o);
    if (!hb.ok()) Die(std::string(hb.status().message()));
    return std::move(*hb);
  };
  auto client = [&](const std::string& node) {
    auto c = sw::LeaseClient::Start(
        {.vm_id = "bench", .node = node, .key = kKey, .witness = w, .renew = milliseconds(30)});
    if (!c.ok()) Die(std::string(c.status().message()));
    return std::move(*c);
  };

  std::printf(
      "== failover decision over loopback: heartbeats every %ld ms on 2 paths, dead after %ld "
      "ms; witness lease %ld ms renewed every 30 ms; %d kills at random moments (half decided "
      "by the witness, half by a fencing command)\n",
      static_cast<long>(interval.count()), static_cast<long>(timeout.count()),
      static_cast<long>(lease.count()), kills);
  std::mt19937 rng(42);
  std::vector<double> detect, by_lease, by_fence;
  Dead dead;
  auto mirror_hb = heartbeat("m", &dead);
  auto mirror_lease = client("m");
  for (int i = 0; i < kills; i++) {
    bool with_witness = i % 2 == 0;  // alternate: lease, then fence
    auto primary_hb = heartbeat("p", nullptr);
    auto primary_lease = client("p");
    mirror_lease->Want(false);
    if (!primary_lease->AcquireWithin(milliseconds(5000)).ok()) Die("primary got no lease");
    auto deadline = Clock::now() + std::chrono::seconds(5);
    while (!mirror_hb->peer_alive()) {
      if (Clock::now() > deadline) Die("mirror never heard the primary");
      std::this_thread::sleep_for(milliseconds(1));
    }
    {
      std::lock_guard<std::mutex> lock(dead.mu);
      dead.dead = false;
    }
    // The kill lands anywhere in a renewal period and a heartbeat interval.
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 100000));
    auto killed = Clock::now();
    primary_hb.reset();  // process death: no more heartbeats, no more renewals
    primary_lease.reset();
    {
      std::unique_lock<std::mutex> lock(dead.mu);
      if (!dead.cv.wait_for(lock, std::chrono::seconds(5), [&] { return dead.dead; })) {
        Die("the mirror never declared the primary dead");
      }
      detect.push_back(Ms(dead.at - killed));
    }
    sw::PromotionPolicy policy;
    policy.wait = milliseconds(2000);
    if (with_witness) {
      policy.lease = mirror_lease.get();
    } else {
      policy.fence_command = "true";
    }
    if (auto s = sw::AuthorizePromotion(policy, false); !s.ok()) Die(std::string(s.message()));
    (with_witness ? by_lease : by_fence).push_back(Ms(Clock::now() - killed));
  }
  double t = static_cast<double>(timeout.count());
  std::printf(
      "detection (kill -> every path silent past the timeout): p50 %.1f ms, p99 %.1f ms "
      "(%.2fx / %.2fx the %.0f ms timeout)\n",
      Pct(detect, 0.5), Pct(detect, 0.99), Pct(detect, 0.5) / t, Pct(detect, 0.99) / t, t);
  std::printf(
      "authorised by the witness (kill -> lease won): p50 %.1f ms, p99 %.1f ms "
      "(detection p50 + %.1f ms: the old lease must lapse)\n",
      Pct(by_lease, 0.5), Pct(by_lease, 0.99), Pct(by_lease, 0.5) - Pct(detect, 0.5));
  std::printf(
      "authorised by a fencing command `true` (kill -> fence done): p50 %.1f ms, p99 %.1f ms\n",
      Pct(by_fence, 0.5), Pct(by_fence, 0.99));
  std::printf("not in these figures: resuming the replica as a VM (needs /dev/kvm)\n");
  return 0;
}
