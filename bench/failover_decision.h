// The failover decision over loopback, in this process and without a VM: a primary's heartbeats
// and lease client are dropped at a random moment (what its death looks like from outside) and
// the mirror's side is timed from that moment to
//   - detection: every path silent past the heartbeat timeout,
//   - authorisation: the mirror holds the witness's lease (a takeover, as a host's mirror asks
//     once its primary's stream closed: granted at once, the primary having released only what
//     its mirror acknowledged), or a fencing command (`true`) succeeded. Not modelled: the replication stream, whose end (a process that died) lets a
//     host's mirror judge sooner.
// Used by romulus_failover_bench, and by romulus_switchover_bench as the baseline of a real
// failover (kill -> first answer from the promoted mirror).
#ifndef ROMULUS_BENCH_FAILOVER_DECISION_H_
#define ROMULUS_BENCH_FAILOVER_DECISION_H_

#include <chrono>
#include <vector>

#include "absl/status/statusor.h"

namespace romulus::bench {

struct FailoverDecisionOptions {
  int kills = 20;
  // The defaults are those of `romulus primary`/`mirror` (SwitchoverConfig) and `romulus
  // witness`: heartbeats every 10 ms on two paths, dead after 50 ms; lease 150 ms renewed every
  // 30 ms.
  std::chrono::milliseconds interval{10}, timeout{50}, lease{150}, renew{30};
  // Every other kill is authorised by a fencing command instead of the witness.
  bool alternate_fence = true;
};

struct FailoverDecision {
  std::vector<double> detect_ms;    // kill -> every path silent past the timeout
  std::vector<double> by_lease_ms;  // kill -> the mirror holds the lease
  std::vector<double> by_fence_ms;  // kill -> the fencing command succeeded
};

absl::StatusOr<FailoverDecision> MeasureFailoverDecision(const FailoverDecisionOptions& options);

}  // namespace romulus::bench

#endif  // ROMULUS_BENCH_FAILOVER_DECISION_H_
