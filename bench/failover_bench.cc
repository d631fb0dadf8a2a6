// Failover decision time over loopback, no VM needed: a primary (heartbeats + lease) is killed
// at a random moment and the mirror's side is timed from the kill to
//   - detection: every path silent past the timeout (baseline: the configured timeout),
//   - authorisation with the witness: the mirror holds the lease (a takeover, granted at once),
//   - authorisation with a fencing command instead (`true`).
// Resuming the replica as a VM is not part of these figures: romulus_switchover_bench measures a
// whole failover with `romulus` processes, on every platform.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "bench/bench_util.h"
#include "bench/failover_decision.h"

int main(int argc, char** argv) {
  int kills = argc > 1 ? std::atoi(argv[1]) : 200;
  if (kills < 1 || kills > 100000) {
    std::fprintf(stderr, "usage: romulus_failover_bench [KILLS 1-100000]\n");
    return 2;
  }
  romulus::bench::FailoverDecisionOptions o;
  o.kills = kills;
  std::printf(
      "== failover decision over loopback: heartbeats every %ld ms on 2 paths, dead after %ld "
      "ms; witness lease %ld ms renewed every %ld ms; %d kills at random moments (half decided "
      "by the witness, half by a fencing command)\n",
      static_cast<long>(o.interval.count()), static_cast<long>(o.timeout.count()),
      static_cast<long>(o.lease.count()), static_cast<long>(o.renew.count()), kills);
  auto r = romulus::bench::MeasureFailoverDecision(o);
  if (!r.ok()) {
    std::fprintf(stderr, "failover_bench: %s\n", std::string(r.status().message()).c_str());
    return 1;
  }
  using romulus::bench::Quantile;
  double t = static_cast<double>(o.timeout.count());
  std::printf(
      "detection (kill -> every path silent past the timeout): p50 %.1f ms, p99 %.1f ms "
      "(%.2fx / %.2fx the %.0f ms timeout)\n",
      Quantile(r->detect_ms, 0.5), Quantile(r->detect_ms, 0.99), Quantile(r->detect_ms, 0.5) / t,
      Quantile(r->detect_ms, 0.99) / t, t);
  std::printf(
      "authorised by the witness (kill -> lease won by a takeover): p50 %.1f ms, p99 %.1f ms "
      "(detection p50 + %.1f ms)\n",
      Quantile(r->by_lease_ms, 0.5), Quantile(r->by_lease_ms, 0.99),
      Quantile(r->by_lease_ms, 0.5) - Quantile(r->detect_ms, 0.5));
  std::printf(
      "authorised by a fencing command `true` (kill -> fence done): p50 %.1f ms, p99 %.1f ms\n",
      Quantile(r->by_fence_ms, 0.5), Quantile(r->by_fence_ms, 0.99));
  std::printf(
      "not in these figures: resuming the replica as a VM (romulus_switchover_bench measures "
      "kill -> first answer with romulus processes)\n");
  return 0;
}
