// The ledger's TCP endpoint: decodes client frames, hands requests to the ledger device and
// sends each response back, through the output gate, to the connection that asked.
#ifndef ROMULUS_VMM_LEDGER_ENDPOINT_H_
#define ROMULUS_VMM_LEDGER_ENDPOINT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "vmm/ledger_device.h"
#include "vmm/output_gate.h"

namespace romulus::vmm {

class LedgerEndpoint {
 public:
  struct Stats {
    uint64_t connections = 0;
    uint64_t requests = 0;
    uint64_t rejected = 0;  // frames refused by the monitor itself
  };
  // What one connection may have waiting for it: replies not yet written to its socket, and its
  // requests in the guest or in the output gate (counted at the largest reply each). A client
  // whose replies would pass this has stopped reading them and is dropped, so a client that
  // sends without reading costs the monitor at most this much.
  static constexpr uint64_t kMaxQueuedBytes = 256 << 10;
  // Listens on `address`:`port` (0: any free port). `log` receives one line per client error.
  static absl::StatusOr<std::unique_ptr<LedgerEndpoint>> Start(
      LedgerDevice& ledger, OutputGate& gate, const std::string& address, uint16_t port,
      std::function<void(absl::string_view)> log);
  virtual ~LedgerEndpoint() = default;
  virtual uint16_t port() const = 0;
  virtual Stats stats() const = 0;
};

}  // namespace romulus::vmm

#endif  // ROMULUS_VMM_LEDGER_ENDPOINT_H_
