// A blocking ledger client over one TCP connection, for `romulus load` and the tests.
#ifndef ROMULUS_CLI_LEDGER_CLIENT_H_
#define ROMULUS_CLI_LEDGER_CLIENT_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "proto/romulus.pb.h"
#include "vmm/sys.h"

namespace romulus::cli {

class LedgerClient {
 public:
  // Connects to host:port (IPv4 literal or "localhost"); every later call waits at most
  // `timeout_ms` for the peer.
  static absl::StatusOr<LedgerClient> Connect(const std::string& host, uint16_t port,
                                              int timeout_ms);
  absl::StatusOr<pb::LedgerResponse> Call(const pb::LedgerRequest& request);
  absl::Status SendBytes(const std::string& bytes);
  absl::StatusOr<pb::LedgerResponse> Receive();

 private:
  explicit LedgerClient(vmm::Fd fd) : fd_(std::move(fd)) {}
  vmm::Fd fd_;
};

// Splits "host:port".
absl::Status ParseHostPort(const std::string& text, std::string* host, uint16_t* port);

}  // namespace romulus::cli

#endif  // ROMULUS_CLI_LEDGER_CLIENT_H_
