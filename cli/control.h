// The control socket: a unix socket on which `romulus primary` and `romulus mirror` answer
// `romulus status` (length-prefixed ControlRequest/ControlReply frames, one per connection).
#ifndef ROMULUS_CLI_CONTROL_H_
#define ROMULUS_CLI_CONTROL_H_

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "proto/romulus.pb.h"

namespace romulus::cli {

// What a planned migration did: one line for the operator, and its downtime.
struct Migrated {
  std::string line;
  double downtime_ms = 0;
};

// What a process answers on its control socket.
struct ControlHandlers {
  std::function<pb::StatusReply()> status = nullptr;
  // Promotes this host (a mirror); returns what it did. Unset: the process cannot be promoted.
  std::function<absl::StatusOr<std::string>(bool force)> promote = nullptr;
  // Moves the VM away (a primary), as the request says; returns what it did. Unset: not a
  // primary. Status requests are answered while it runs.
  std::function<absl::StatusOr<Migrated>(const pb::MigrateRequest& request)> migrate = nullptr;
};

class ControlServer {
 public:
  // Listens on `path` (a stale socket file there is replaced) and answers each request with
  // the handlers, one request at a time, on a thread of its own; a migration runs on another,
  // one at a time, so that `romulus status` shows its progress.
  static absl::StatusOr<std::unique_ptr<ControlServer>> Start(const std::string& path,
                                                              ControlHandlers handlers);
  virtual ~ControlServer() = default;
};

// Asks the process behind `path` for its status.
absl::StatusOr<pb::StatusReply> QueryStatus(const std::string& path, int timeout_ms = 2000);
// Asks the process behind `path` (a mirror) to promote itself; returns what it did.
absl::StatusOr<std::string> RequestPromotion(const std::string& path, bool force,
                                             int timeout_ms = 15000);

// Human-readable lines, one field a line.
std::string FormatStatus(const pb::StatusReply& s);
// A post-copy migration's progress in one line.
std::string PostcopyLine(const pb::PostcopyStatus& p);

int StatusCommand(int argc, char** argv);
// Asks the process behind `path` (a primary) to hand its VM over to its mirror.
absl::StatusOr<Migrated> RequestMigration(const std::string& path,
                                          std::chrono::milliseconds timeout);
absl::StatusOr<Migrated> RequestMigration(const std::string& path, const pb::MigrateRequest& req,
                                          int reply_timeout_ms);

int PromoteCommand(int argc, char** argv);
int MigrateCommand(int argc, char** argv);

}  // namespace romulus::cli

#endif  // ROMULUS_CLI_CONTROL_H_
