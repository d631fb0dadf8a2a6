// `romulus proxy`: one ledger address for a VM's clients, in front of its hosts. It forwards each
// request to the host that is the primary and, while the VM fails over or migrates, holds new
// and unanswered requests and sends them to the new primary once it accepts. Resending the same
// request is safe because the ledger answers a repeated (client id, request id) from its session
// table, which lives in guest memory and so moves with every checkpoint.
#ifndef ROMULUS_CLI_PROXY_H_
#define ROMULUS_CLI_PROXY_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "proto/romulus.pb.h"

namespace romulus::cli {

struct ProxyOptions {
  std::string listen = "127.0.0.1";
  uint16_t port = 0;               // 0: any free port (Proxy::port() says which)
  std::vector<std::string> hosts;  // each host's ledger "HOST:PORT" (IP literal or localhost)
  // A request not answered this long after it arrived gets RML_ERR_UNAVAILABLE.
  std::chrono::milliseconds hold{10000};
  // A host that accepted a request (or a connection) but does not answer in this time is left,
  // and the primary looked for again.
  std::chrono::milliseconds answer_timeout{2000};
  // While no host accepts, each is tried again this often.
  std::chrono::milliseconds probe_interval{5};
  uint64_t max_clients = 1024;                           // more wait in the listen backlog
  std::function<void(absl::string_view)> log = nullptr;  // one line per event worth knowing
};

// The proxy's settings from its checked config (LoadProxyConfig).
ProxyOptions ProxyOptionsFrom(const pb::ProxyConfig& config);
// A host's ledger as the proxy takes it: "ADDR:PORT" with an IPv4 address, an IPv6 one (bare or
// in brackets) or localhost; *address is then the literal to connect to.
absl::Status ParseLedgerAddress(const std::string& text, std::string* address, uint16_t* port);

class Proxy {
 public:
  struct Stats {
    uint64_t clients = 0;        // connections accepted, ever
    uint64_t requests = 0;       // requests read from clients
    uint64_t answered = 0;       // answers from a host passed on
    uint64_t resent = 0;         // requests sent to a host again after the previous one failed
    uint64_t expired = 0;        // requests answered RML_ERR_UNAVAILABLE (hold bound passed)
    uint64_t malformed = 0;      // client connections refused for a frame the proxy cannot read
    uint64_t host_failures = 0;  // host connections given up (refused, reset, garbage, silent)
    uint64_t primaries = 0;      // times a primary was found (the first included)
    uint64_t stale_answers = 0;  // answers not forwarded: of a term older than one seen
    uint64_t newest_term = 0;    // the newest term an answer carried
    int primary = -1;            // index into ProxyOptions::hosts; -1 while none is known
  };
  // What one client connection may hold: requests read but not yet answered, and answers not
  // yet written to it. Past either, the proxy stops reading from that client (and only that
  // one), so memory is bounded by max_clients times these, and a client that does not read
  // stalls nobody else.
  static constexpr size_t kMaxQueuedRequests = 64;
  static constexpr size_t kMaxQueuedRequestBytes = 16 << 10;
  static constexpr size_t kMaxQueuedReplyBytes = 16 << 10;

  static absl::StatusOr<std::unique_ptr<Proxy>> Start(ProxyOptions options);
  virtual ~Proxy() = default;
  virtual uint16_t port() const = 0;
  virtual Stats stats() const = 0;
};

}  // namespace romulus::cli

#endif  // ROMULUS_CLI_PROXY_H_
