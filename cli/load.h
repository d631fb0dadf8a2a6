// `romulus load`: concurrent ledger clients that measure throughput and latency, deliberately
// retry some requests, and check the ledger's invariants when they are done.
#ifndef ROMULUS_CLI_LOAD_H_
#define ROMULUS_CLI_LOAD_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace romulus::cli {

// One answered request: when it was sent and how long its answer took (LoadOptions::max_samples).
struct LoadSample {
  std::chrono::steady_clock::time_point sent;
  float latency_us = 0;
};

struct LoadOptions {
  std::string host = "127.0.0.1";
  uint16_t port = 7070;
  // The mirror's ledger address (empty: none). After a failure a client tries the other
  // address, resending the same request id, so a failover loses and repeats nothing.
  std::string standby_host;
  uint16_t standby_port = 0;
  uint64_t clients = 4;
  double duration_s = 5;
  uint64_t rate = 0;       // requests/s over all clients; 0: as fast as answers come
  uint64_t accounts = 16;  // accounts this run opens and works on
  uint64_t transfer_pct = 70, deposit_pct = 20, read_pct = 10;
  uint64_t retry_pct = 5;  // requests sent twice on purpose to check exactly-once
  uint64_t timeout_ms = 5000;
  uint64_t attempts = 20;  // tries per request (reconnecting) before it counts as unresolved
  uint64_t seed = 0;       // 0: from the clock
  // Keep up to this many answered requests' send times and latencies in LoadReport::samples,
  // each client up to its share (0: none; a timeline of the run, as `romulus demo --plot` draws).
  uint64_t max_samples = 0;
  // Called once, when the accounts are open and the clients start (what they measure begins).
  std::function<void()> running = nullptr;
};

struct LoadReport {
  uint64_t requests = 0;    // distinct requests answered
  uint64_t unresolved = 0;  // requests never answered
  uint64_t reconnects = 0;
  uint64_t switches = 0;  // reconnects that went to the other address
  // When the first answer came from the other address (a failover's first response).
  std::optional<std::chrono::steady_clock::time_point> first_standby_answer;
  uint64_t retries_checked = 0;
  double seconds = 0;
  double ops_per_s = 0;
  double p50_us = 0, p90_us = 0, p99_us = 0, max_us = 0;
  std::map<uint32_t, uint64_t> by_status;
  int64_t expected_total = 0, final_total = 0;
  uint64_t last_seq = 0;
  // This run's accounts as the final read found them: what a later read must still find (the
  // nemesis checks that no later failure rolls them back).
  std::map<uint32_t, int64_t> final_balances;
  // Accounts whose final balance is not the newest write a client saw acknowledged: what a
  // failover lost (counted only when every request was answered).
  uint64_t lost_acknowledged = 0;
  std::vector<std::string> violations;
  // With LoadOptions::max_samples: answered requests in the order they were sent, and how many
  // more were answered than a client had room to keep.
  std::vector<LoadSample> samples;
  uint64_t samples_dropped = 0;
  bool ok() const { return violations.empty() && unresolved == 0; }
};

absl::StatusOr<LoadReport> RunLoad(const LoadOptions& options);
// The p-quantile (p in 0..1) of `v`; 0 when it is empty.
double Percentile(std::vector<double> v, double p);
std::string FormatReport(const LoadReport& report);
std::string FormatReportJson(const LoadReport& report);

}  // namespace romulus::cli

#endif  // ROMULUS_CLI_LOAD_H_
