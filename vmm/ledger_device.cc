#include "vmm/ledger_device.h"

#include <atomic>
#include <vector>

#include "absl/strings/str_cat.h"

namespace romulus::vmm {
namespace {

uint32_t LoadIndex(const GuestMemory& mem, uint64_t gpa) {
  return std::atomic_ref<uint32_t>(
             *reinterpret_cast<uint32_t*>(const_cast<uint8_t*>(mem.data()) + gpa))
      .load(std::memory_order_acquire);
}

void StoreIndex(GuestMemory& mem, uint64_t gpa, uint32_t v) {
  std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(mem.data() + gpa))
      .store(v, std::memory_order_release);
  mem.MarkDirty(gpa, sizeof(v));
}

constexpr uint64_t kHead = offsetof(rml_ring_header, head);
constexpr uint64_t kTail = offsetof(rml_ring_header, tail);
constexpr uint64_t SlotGpa(uint64_t ring, uint32_t index) {
  return ring + sizeof(rml_ring_header) + (index % RML_RING_SLOTS) * 64;
}

}  // namespace

void LedgerDevice::SetResponseSink(ResponseSink sink) {
  std::lock_guard<std::mutex> lock(sink_mu_);
  sink_ = std::move(sink);
}

absl::StatusOr<uint64_t> LedgerDevice::Submit(rml_request request) {
  uint64_t tag;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (queued_.size() >= kMaxQueued) {
      return absl::ResourceExhaustedError("ledger device queue full");
    }
    tag = next_tag_++;
    request.tag = tag;
    queued_.push_back(request);
    FillRingLocked();
  }
  wake_guest_();
  return tag;
}

void LedgerDevice::FillRingLocked() {
  if (frozen_ || queued_.empty()) return;
  uint32_t head = LoadIndex(mem_, RML_REQ_RING_GPA + kHead);
  uint32_t tail = LoadIndex(mem_, RML_REQ_RING_GPA + kTail);
  uint32_t used = head - tail;
  if (used > RML_RING_SLOTS) return;  // the guest broke the ring; it will panic on its own
  while (used < RML_RING_SLOTS && !queued_.empty()) {
    mem_.Write(SlotGpa(RML_REQ_RING_GPA, head), &queued_.front(), sizeof(rml_request));
    queued_.pop_front();
    head++;
    used++;
  }
  StoreIndex(mem_, RML_REQ_RING_GPA + kHead, head);
}

absl::Status LedgerDevice::OnResponseDoorbell() {
  std::vector<rml_response> out;
  {
    std::lock_guard<std::mutex> lock(mu_);
    uint32_t head = LoadIndex(mem_, RML_RESP_RING_GPA + kHead);
    uint32_t tail = LoadIndex(mem_, RML_RESP_RING_GPA + kTail);
    if (head - tail > RML_RING_SLOTS) {
      return absl::DataLossError(
          absl::StrCat("guest response ring is corrupt (head ", head, ", tail ", tail, ")"));
    }
    for (; tail != head; tail++) {
      rml_response r;
      std::memcpy(&r, mem_.data() + SlotGpa(RML_RESP_RING_GPA, tail), sizeof(r));
      out.push_back(r);
    }
    StoreIndex(mem_, RML_RESP_RING_GPA + kTail, tail);
    responses_seen_ += out.size();
    FillRingLocked();
  }
  std::lock_guard<std::mutex> lock(sink_mu_);
  if (sink_) {
    for (const rml_response& r : out) sink_(r);
  }
  return absl::OkStatus();
}

void LedgerDevice::Freeze() {
  std::lock_guard<std::mutex> lock(mu_);
  frozen_ = true;
}

void LedgerDevice::Thaw() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    frozen_ = false;
    FillRingLocked();
  }
  wake_guest_();
}

pb::LedgerDeviceState LedgerDevice::Save() const {
  std::lock_guard<std::mutex> lock(mu_);
  pb::LedgerDeviceState s;
  s.set_responses_seen(responses_seen_);
  s.set_next_tag(next_tag_);
  return s;
}

void LedgerDevice::Restore(const pb::LedgerDeviceState& state) {
  std::lock_guard<std::mutex> lock(mu_);
  responses_seen_ = state.responses_seen();
  // Tags already in the restored rings belong to the old process; new ones must not collide.
  next_tag_ = state.next_tag() + 1;
}

}  // namespace romulus::vmm
