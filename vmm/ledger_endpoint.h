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
