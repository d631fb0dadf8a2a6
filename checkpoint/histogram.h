// A histogram with fixed buckets, for the figures the metrics export as Prometheus histograms
// (pause and commit times, dirty pages per epoch, promotion and migration durations). Observe()
// is lock-free, so the component that owns a figure records it on its own hot path without a
// lock; a reader takes a Snapshot, which is copyable and may be a few observations behind in
// `sum` (the buckets and `count` always agree).
#ifndef ROMULUS_CHECKPOINT_HISTOGRAM_H_
#define ROMULUS_CHECKPOINT_HISTOGRAM_H_

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <vector>

namespace romulus::checkpoint {

class Histogram {
 public:
  static constexpr size_t kMaxBounds = 24;

  struct Snapshot {
    std::vector<double> bounds;    // upper bounds (inclusive), ascending; +Inf is implied
    std::vector<uint64_t> counts;  // observations per bucket, the last one above every bound
    double sum = 0;
    uint64_t count = 0;
  };

  // `bounds` ascending, at most kMaxBounds of them (more are ignored).
  explicit Histogram(std::initializer_list<double> bounds) {
    for (double b : bounds) {
      if (n_ == kMaxBounds) break;
      bounds_[n_++] = b;
    }
  }
  Histogram(const Histogram&) = delete;
  Histogram& operator=(const Histogram&) = delete;

  void Observe(double v) {
    size_t i = 0;
    while (i < n_ && v > bounds_[i]) i++;
    counts_[i].fetch_add(1, std::memory_order_relaxed);
    sum_.fetch_add(v, std::memory_order_relaxed);
  }

  Snapshot snapshot() const {
    Snapshot s;
    s.bounds.assign(bounds_.begin(), bounds_.begin() + static_cast<std::ptrdiff_t>(n_));
    s.counts.resize(n_ + 1);
    for (size_t i = 0; i <= n_; i++) {
      s.counts[i] = counts_[i].load(std::memory_order_relaxed);
      s.count += s.counts[i];
    }
    s.sum = sum_.load(std::memory_order_relaxed);
    return s;
  }

  // The factories return a prvalue: no copy or move is made (nor could be: the counts are atomic).
  // Bounds for durations in seconds: pauses of a checkpoint (100 us up) to promotions (10 s).
  static Histogram Seconds() {
    return Histogram({0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                      0.5, 1, 2.5, 5, 10});
  }
  // Bounds for pages per epoch.
  static Histogram Pages() {
    return Histogram({0, 1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576});
  }

 private:
  size_t n_ = 0;
  std::array<double, kMaxBounds> bounds_{};
  std::array<std::atomic<uint64_t>, kMaxBounds + 1> counts_{};
  std::atomic<double> sum_{0};
};

}  // namespace romulus::checkpoint

#endif  // ROMULUS_CHECKPOINT_HISTOGRAM_H_
