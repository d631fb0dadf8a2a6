#include "bench/failover_decision.h"

#include <algorithm>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>

// clang-format off
#include <utility>
#include <boost/asio.hpp>
// clang-format on

#include "absl/strings/str_cat.h"
#include "switchover/switchover.h"

namespace romulus::bench {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
namespace sw = romulus::switchover;

const char kKey[] = "failover-bench-key-0123456789";

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

absl::StatusOr<uint16_t> FreeUdpPort() {
  try {
    boost::asio::io_context io;
    boost::asio::ip::udp::socket s(
        io, boost::asio::ip::udp::endpoint(boost::asio::ip::make_address("127.0.0.1"), 0));
    return s.local_endpoint().port();
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("no free UDP port: ", e.what()));
  }
}

struct Dead {
  std::mutex mu;
  std::condition_variable cv;
  bool dead = false;
  Clock::time_point at;
};

}  // namespace

absl::StatusOr<FailoverDecision> MeasureFailoverDecision(const FailoverDecisionOptions& options) {
  uint16_t ports[4];
  for (uint16_t& port : ports) {
    auto p = FreeUdpPort();
    if (!p.ok()) return p.status();
    port = *p;
  }
  const uint16_t pa = ports[0], pb = ports[1], ma = ports[2], mb = ports[3];
  auto witness =
      sw::Witness::Start({.key = kKey, .listen = {"127.0.0.1", 0}, .lease = options.lease});
  if (!witness.ok()) return witness.status();
  sw::Endpoint w{"127.0.0.1", (*witness)->port()};

  auto heartbeat = [&](const std::string& node,
                       Dead* dead) -> absl::StatusOr<std::unique_ptr<sw::Heartbeat>> {
    sw::Heartbeat::Options o;
    o.vm_id = "bench";
    o.node = node;
    o.role = node == "p" ? "primary" : "mirror";
    o.key = kKey;
    o.interval = options.interval;
    o.timeout = options.timeout;
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
    return sw::Heartbeat::Start(o);
  };
  auto client = [&](const std::string& node) {
    return sw::LeaseClient::Start(
        {.vm_id = "bench", .node = node, .key = kKey, .witness = w, .renew = options.renew});
  };

  std::mt19937 rng(42);
  FailoverDecision result;
  Dead dead;
  auto mirror_hb = heartbeat("m", &dead);
  if (!mirror_hb.ok()) return mirror_hb.status();
  auto mirror_lease = client("m");
  if (!mirror_lease.ok()) return mirror_lease.status();
  for (int i = 0; i < options.kills; i++) {
    bool with_witness = !options.alternate_fence || i % 2 == 0;
    auto primary_hb = heartbeat("p", nullptr);
    if (!primary_hb.ok()) return primary_hb.status();
    auto primary_lease = client("p");
    if (!primary_lease.ok()) return primary_lease.status();
    // The VM moves back to p between kills, with the state of the term the mirror last held.
    (*mirror_lease)->Want(false);
    (*primary_lease)->SetStateTerm((*mirror_lease)->term());
    if (auto s = (*primary_lease)->AcquireWithin(milliseconds(5000)); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("the primary got no lease: ", s.message()));
    }
    auto deadline = Clock::now() + std::chrono::seconds(5);
    while (!(*mirror_hb)->peer_alive()) {
      if (Clock::now() > deadline)
        return absl::DeadlineExceededError("mirror never heard the primary");
      std::this_thread::sleep_for(milliseconds(1));
    }
    {
      std::lock_guard<std::mutex> lock(dead.mu);
      dead.dead = false;
    }
    uint64_t primary_term = (*primary_lease)->term();  // what the mirror's replica is of
    // The kill lands anywhere in a renewal period and a heartbeat interval.
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 100000));
    auto killed = Clock::now();
    primary_hb->reset();  // process death: no more heartbeats, no more renewals
    primary_lease->reset();
    {
      std::unique_lock<std::mutex> lock(dead.mu);
      if (!dead.cv.wait_for(lock, std::chrono::seconds(5), [&] { return dead.dead; })) {
        return absl::DeadlineExceededError("the mirror never declared the primary dead");
      }
      result.detect_ms.push_back(Ms(dead.at - killed));
    }
    sw::PromotionPolicy policy;
    policy.wait = milliseconds(2000);
    if (with_witness) {
      // A takeover, as a host's mirror asks: p released only what its mirror acknowledged.
      policy.lease = mirror_lease->get();
      policy.state_term = primary_term;
      policy.promotion.takeover = true;
    } else {
      policy.fence_command = "true";
    }
    if (auto s = sw::AuthorizePromotion(policy, false); !s.ok()) return s;
    (with_witness ? result.by_lease_ms : result.by_fence_ms).push_back(Ms(Clock::now() - killed));
  }
  return result;
}

}  // namespace romulus::bench
