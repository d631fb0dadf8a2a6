// When the peer's silence on a path means it is gone. Deterministic: it is handed the arrival
// times of the peer's heartbeats and the time to judge at, and keeps no clock of its own.
#ifndef ROMULUS_SWITCHOVER_FAILURE_DETECTOR_H_
#define ROMULUS_SWITCHOVER_FAILURE_DETECTOR_H_

#include <array>
#include <chrono>
#include <cstddef>

namespace romulus::switchover {

// On a busy host (this one, or the peer) heartbeats arrive late, in bursts: a timeout fixed
// just above the interval calls a live peer dead and starts a failover. So the timeout follows
// the gaps between the heartbeats that arrive: `margin` times the longest gap of the last
// `memory`, never below `floor` (the configured timeout: all it is on a calm host) and never
// above `ceiling` (so that a peer that died is found dead within it, however busy the hosts
// were).
class FailureDetector {
 public:
  using Clock = std::chrono::steady_clock;
  struct Options {
    std::chrono::milliseconds floor{50};
    std::chrono::milliseconds ceiling{200};
    // How long one late heartbeat keeps the timeout raised: load comes and goes in bursts
    // further apart than the stalls within them.
    std::chrono::milliseconds memory{60000};
    double margin = 2.0;
  };

  explicit FailureDetector(Options options);

  // A heartbeat arrived at `at` (times earlier than the last are taken as the last).
  void Heard(Clock::time_point at);
  // The peer restarted (a new session): how late the one before was says nothing of it.
  void Forget();

  bool heard() const { return heard_; }
  Clock::time_point last_heard() const { return last_; }
  // The timeout in force at `now`: the silence after which the peer is dead.
  std::chrono::milliseconds timeout(Clock::time_point now) const {
    return TimeoutAbove(now, o_.floor);
  }
  // The same with another least value (below the floor: when other signs say the peer is gone).
  std::chrono::milliseconds TimeoutAbove(Clock::time_point now,
                                         std::chrono::milliseconds least) const;
  // Heard from within the timeout in force at `now`.
  bool Alive(Clock::time_point now) const { return heard_ && now - last_ < timeout(now); }
  const Options& options() const { return o_; }

 private:
  // The longest gap seen in each of the last kSlices slices of `memory`: a sliding maximum in
  // constant space.
  static constexpr size_t kSlices = 8;
  struct Slice {
    Clock::time_point start{};
    Clock::duration longest{0};
    bool used = false;
  };
  Clock::duration slice_length() const { return o_.memory / kSlices; }

  Options o_;
  bool heard_ = false;
  Clock::time_point last_{};
  std::array<Slice, kSlices> slices_{};
  size_t newest_ = 0;  // index of the newest slice in slices_
};

}  // namespace romulus::switchover

#endif  // ROMULUS_SWITCHOVER_FAILURE_DETECTOR_H_
