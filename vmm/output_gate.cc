#include "vmm/output_gate.h"

#include <vector>

namespace romulus::vmm {

void OutputGate::Push(Output output) {
  std::lock_guard<std::mutex> order(deliver_mu_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    uint64_t seq = pushed_++;
    if (holding_ || !held_.empty()) {
      held_.emplace_back(seq, std::move(output));
      return;
    }
  }
  output();
}

uint64_t OutputGate::Mark() const {
  std::lock_guard<std::mutex> lock(mu_);
  return pushed_;
}

void OutputGate::ReleaseThrough(uint64_t mark) {
  std::lock_guard<std::mutex> order(deliver_mu_);
  std::vector<Output> ready;
  {
    std::lock_guard<std::mutex> lock(mu_);
    while (!held_.empty() && held_.front().first < mark) {
      ready.push_back(std::move(held_.front().second));
      held_.pop_front();
    }
  }
  for (Output& o : ready) o();
}

void OutputGate::SetHolding(bool holding) {
  uint64_t mark;
  {
    std::lock_guard<std::mutex> lock(mu_);
    holding_ = holding;
    mark = pushed_;
  }
  if (!holding) ReleaseThrough(mark);
}

size_t OutputGate::held() const {
  std::lock_guard<std::mutex> lock(mu_);
  return held_.size();
}

}  // namespace romulus::vmm
