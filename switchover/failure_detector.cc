#include "switchover/failure_detector.h"

#include <algorithm>
#include <cmath>

namespace romulus::switchover {

FailureDetector::FailureDetector(Options options) : o_(options) {
  if (o_.ceiling < o_.floor) o_.ceiling = o_.floor;
  if (o_.memory < std::chrono::milliseconds(kSlices))
    o_.memory = std::chrono::milliseconds(kSlices);
  if (!(o_.margin >= 1)) o_.margin = 1;
}

void FailureDetector::Heard(Clock::time_point at) {
  if (!heard_) {
    heard_ = true;
    last_ = at;
    return;
  }
  if (at < last_) at = last_;
  Clock::duration gap = at - last_;
  last_ = at;
  Slice& newest = slices_[newest_];
  if (newest.used && at - newest.start < slice_length()) {
    newest.longest = std::max(newest.longest, gap);
    return;
  }
  newest_ = (newest_ + 1) % kSlices;  // the oldest slice gives way
  slices_[newest_] = {at, gap, true};
}

void FailureDetector::Forget() {
  heard_ = false;
  slices_ = {};
  newest_ = 0;
}

std::chrono::milliseconds FailureDetector::TimeoutAbove(Clock::time_point now,
                                                        std::chrono::milliseconds least) const {
  Clock::duration longest{0};
  for (const Slice& s : slices_) {
    // A slice counts while any of it lies within the memory.
    if (s.used && now - s.start < o_.memory + slice_length()) {
      longest = std::max(longest, s.longest);
    }
  }
  double ms = std::chrono::duration<double, std::milli>(longest).count() * o_.margin;
  if (!(ms < static_cast<double>(o_.ceiling.count()))) return o_.ceiling;
  return std::max(least, std::chrono::milliseconds(static_cast<int64_t>(std::ceil(ms))));
}

}  // namespace romulus::switchover
