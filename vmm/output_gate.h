// The output gate: everything the VM says to the outside world passes through it, in order.
// While holding, outputs queue until released up to a mark (the checkpoint layer releases an
// epoch's outputs when the mirror has committed that epoch).
#ifndef ROMULUS_VMM_OUTPUT_GATE_H_
#define ROMULUS_VMM_OUTPUT_GATE_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>

namespace romulus::vmm {

class OutputGate {
 public:
  using Output = std::function<void()>;  // delivers one output when called

  // Queues an output, or delivers it at once when the gate is open.
  void Push(Output output);
  // Number of outputs pushed so far: a mark for ReleaseThrough.
  uint64_t Mark() const;
  // Delivers, in order, every held output pushed before `mark`.
  void ReleaseThrough(uint64_t mark);
  // Closed: outputs wait for ReleaseThrough. Opening releases everything held.
  void SetHolding(bool holding);
  // Fenced: nothing at all is delivered, released or not (a primary that lost its lease). When
  // the fence lifts, what was released meanwhile leaves.
  void SetFenced(bool fenced);
  // What an open gate lets through without ReleaseThrough (no mirror proved it committed) leaves
  // only while `may_release` says so, asked right before each delivery: a primary releasing
  // without a mirror must hold the lease at that moment, not merely when its lease last said so
  // (a process frozen for a while runs on before its lease timer fires). Held otherwise, until
  // the next ReleaseThrough, SetFenced or SetHolding. nullptr: no such check.
  void SetUnprotectedCheck(std::function<bool()> may_release);
  size_t held() const;
  // Kept equal to whether every output this gate let leave has been covered by a ReleaseThrough
  // (a mirror committed it), and it lets nothing else leave: holding, not about to open, and no
  // unproven output about to be asked about. Set false before the unprotected check is asked, so
  // that whoever reads it true and then makes that check say no has stopped every unproven
  // output. Shared: it outlives the gate (a lease client reads it).
  void ShareReleasesOnlyProven(std::shared_ptr<std::atomic<bool>> flag);
  // SetHolding(false) is to follow (once the hooks that must run first agree): until
  // SetHolding(true), outputs are not only proven ones.
  void AboutToOpen();
  // The term the outputs leave in (what `term()` returns), asked as each is made; 0 without one.
  void SetTermSource(std::function<uint64_t()> term);
  uint64_t term() const;

 private:
  // Delivers, in order, held outputs below the release mark (none while fenced).
  void Deliver();
  // The shared flag's value now. With mu_ held.
  void PublishLocked();

  mutable std::mutex mu_;
  std::mutex deliver_mu_;  // keeps delivery in push order across threads
  std::deque<std::pair<uint64_t, Output>> held_;
  uint64_t pushed_ = 0;
  uint64_t released_ = 0;  // outputs below this mark may leave
  uint64_t proven_ = 0;    // outputs below this mark were released by ReleaseThrough
  uint64_t unproven_ = 0;  // outputs below this mark left before ReleaseThrough covered them
  std::function<bool()> may_release_;
  bool holding_ = false, fenced_ = false, about_to_open_ = false;
  std::shared_ptr<std::atomic<bool>> only_proven_;
  std::function<uint64_t()> term_;  // under mu_
};

}  // namespace romulus::vmm

#endif  // ROMULUS_VMM_OUTPUT_GATE_H_
