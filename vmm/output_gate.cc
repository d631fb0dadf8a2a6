#include "vmm/output_gate.h"

#include <algorithm>
#include <vector>

namespace romulus::vmm {

void OutputGate::Push(Output output) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    held_.emplace_back(pushed_++, std::move(output));
    if (!holding_) released_ = pushed_;
  }
  Deliver();
}

uint64_t OutputGate::Mark() const {
  std::lock_guard<std::mutex> lock(mu_);
  return pushed_;
}

void OutputGate::ReleaseThrough(uint64_t mark) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    released_ = std::max(released_, mark);
    proven_ = std::max(proven_, mark);
    PublishLocked();
  }
  Deliver();
}

void OutputGate::SetUnprotectedCheck(std::function<bool()> may_release) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    may_release_ = std::move(may_release);
  }
  Deliver();
}

void OutputGate::SetHolding(bool holding) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    holding_ = holding;
    if (holding) about_to_open_ = false;
    if (!holding) released_ = pushed_;
    PublishLocked();
  }
  Deliver();
}

void OutputGate::SetFenced(bool fenced) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    fenced_ = fenced;
    if (!holding_) released_ = pushed_;
  }
  Deliver();
}

void OutputGate::Deliver() {
  std::lock_guard<std::mutex> order(deliver_mu_);
  std::vector<Output> ready;
  std::function<bool()> check;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!held_.empty() && held_.front().first < released_ && released_ > proven_) {
      check = may_release_;
      // Said before the check is asked: unproven outputs may leave after it.
      if (only_proven_) only_proven_->store(false);
    }
  }
  // Asked without mu_: the check may take locks of its own, whose holders may push outputs.
  bool unproven_may_leave = !check || check();
  {
    std::lock_guard<std::mutex> lock(mu_);
    while (!fenced_ && !held_.empty() && held_.front().first < released_) {
      if (held_.front().first >= proven_ && !unproven_may_leave && may_release_) break;
      if (held_.front().first >= proven_) unproven_ = held_.front().first + 1;
      ready.push_back(std::move(held_.front().second));
      held_.pop_front();
    }
    PublishLocked();
  }
  for (Output& o : ready) o();
}

size_t OutputGate::held() const {
  std::lock_guard<std::mutex> lock(mu_);
  return held_.size();
}

void OutputGate::ShareReleasesOnlyProven(std::shared_ptr<std::atomic<bool>> flag) {
  std::lock_guard<std::mutex> lock(mu_);
  only_proven_ = std::move(flag);
  PublishLocked();
}

void OutputGate::AboutToOpen() {
  std::lock_guard<std::mutex> lock(mu_);
  about_to_open_ = true;
  PublishLocked();
}

void OutputGate::SetTermSource(std::function<uint64_t()> term) {
  std::lock_guard<std::mutex> lock(mu_);
  term_ = std::move(term);
}

uint64_t OutputGate::term() const {
  std::function<uint64_t()> term;
  {
    std::lock_guard<std::mutex> lock(mu_);
    term = term_;
  }
  return term ? term() : 0;  // asked without mu_: the source takes locks of its own
}

void OutputGate::PublishLocked() {
  if (only_proven_) only_proven_->store(holding_ && !about_to_open_ && unproven_ <= proven_);
}

}  // namespace romulus::vmm
