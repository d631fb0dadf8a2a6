// Ledger device: the monitor's side of the request and response rings in guest memory.
// Requests may be submitted from any thread; responses are collected on the vCPU thread when the
// guest rings the response doorbell.
#ifndef ROMULUS_VMM_LEDGER_DEVICE_H_
#define ROMULUS_VMM_LEDGER_DEVICE_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>

#include "absl/status/statusor.h"
#include "guest/abi.h"
#include "proto/romulus.pb.h"
#include "vmm/guest_memory.h"

namespace romulus::vmm {

class LedgerDevice {
 public:
  using ResponseSink = std::function<void(const rml_response&)>;
  static constexpr size_t kMaxQueued = 4096;

  LedgerDevice(GuestMemory& mem, std::function<void()> wake_guest)
      : mem_(mem), wake_guest_(std::move(wake_guest)) {}
  // Once this returns, the previous sink is not running and will not be called again.
  void SetResponseSink(ResponseSink sink);

  // Any thread. Stamps the request with a fresh tag (returned) and queues it for the guest.
  absl::StatusOr<uint64_t> Submit(rml_request request);
  // vCPU thread: hands every response in the ring to the sink and refills the request ring.
  absl::Status OnResponseDoorbell();
  // While frozen (VM paused), submitted requests wait in the queue and guest memory is untouched.
  void Freeze();
  void Thaw();

  pb::LedgerDeviceState Save() const;
  void Restore(const pb::LedgerDeviceState& state);

 private:
  void FillRingLocked();
  GuestMemory& mem_;
  std::function<void()> wake_guest_;
  mutable std::mutex mu_;
  std::deque<rml_request> queued_;
  bool frozen_ = false;
  uint64_t next_tag_ = 1;
  uint64_t responses_seen_ = 0;
  std::mutex sink_mu_;  // held while the sink runs
  ResponseSink sink_;
};

}  // namespace romulus::vmm

#endif  // ROMULUS_VMM_LEDGER_DEVICE_H_
