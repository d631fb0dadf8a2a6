// Prometheus metrics: `metrics_listen: "ADDR:PORT"` serves GET /metrics over HTTP, in the text
// exposition format, from the same figures `romulus status` shows (plus the histograms the
// components keep).
#ifndef ROMULUS_CLI_METRICS_H_
#define ROMULUS_CLI_METRICS_H_

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "proto/romulus.pb.h"
#include "replicator/replicator.h"
#include "switchover/switchover.h"

namespace romulus::cli {

class MetricsServer {
 public:
  // `listen` is a numeric "ADDR:PORT" (port 0: any free port). `render` makes the exposition
  // text; it is called on the server's own thread, once per scrape.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(const std::string& listen,
                                                              std::function<std::string()> render,
                                                              replicator::LogFn log);
  virtual ~MetricsServer() = default;
  virtual uint16_t port() const = 0;
};

// Whether `listen` names a numeric address and a port of 1 to 65535 (a one-line error if not).
absl::Status CheckMetricsListen(const std::string& listen);

// The exposition text of a primary's or mirror's node: `status` as `romulus status` answers it
// and `node` the node's status it was made from (for the histograms and byte counts).
std::string NodeMetrics(const pb::StatusReply& status, const switchover::Node::Status& node);
// The witness's: the leases it holds and the datagrams it refused.
std::string WitnessMetrics(const switchover::Witness& witness);

}  // namespace romulus::cli

#endif  // ROMULUS_CLI_METRICS_H_
