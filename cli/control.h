// The control socket: a unix socket on which `romulus primary` and `romulus mirror` answer
// `romulus status` (length-prefixed ControlRequest/ControlReply frames, one per connection).
#ifndef ROMULUS_CLI_CONTROL_H_
#define ROMULUS_CLI_CONTROL_H_

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "proto/romulus.pb.h"

namespace romulus::cli {

class ControlServer {
 public:
  // Listens on `path` (a stale socket file there is replaced) and answers each status request
  // with what `status()` returns, on a thread of its own.
  static absl::StatusOr<std::unique_ptr<ControlServer>> Start(
      const std::string& path, std::function<pb::StatusReply()> status);
  virtual ~ControlServer() = default;
};

// Asks the process behind `path` for its status.
absl::StatusOr<pb::StatusReply> QueryStatus(const std::string& path, int timeout_ms = 2000);

// Human-readable lines, one field a line.
std::string FormatStatus(const pb::StatusReply& s);

int StatusCommand(int argc, char** argv);

}  // namespace romulus::cli

#endif  // ROMULUS_CLI_CONTROL_H_
