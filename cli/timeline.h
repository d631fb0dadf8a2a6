// A timeline of request latency as an SVG picture (what `romulus demo --plot` writes): the
// slowest and the median answer of each short interval on a log-scale latency axis, over time,
// with shaded spans (the demo's acts) and labelled vertical lines (the events it measured).
// Written by this code alone: lines, points, axes and text need no plotting library.
#ifndef ROMULUS_CLI_TIMELINE_H_
#define ROMULUS_CLI_TIMELINE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace romulus::cli {

struct Timeline {
  struct Point {
    double t_s = 0;         // when the request was sent, in seconds from the timeline's origin
    double latency_ms = 0;  // how long its answer took
  };
  struct Span {  // shaded, its label above the plot
    double from_s = 0, to_s = 0;
    std::string label;
  };
  struct Event {  // a vertical line, its label in a row of its own at the top of the plot
    double t_s = 0;
    std::string label;
  };
  std::string title;
  std::string x_label = "time the request was sent (s)";
  std::vector<Point> points;
  uint64_t points_dropped = 0;  // answered requests not among `points` (named under the plot)
  std::vector<Span> spans;
  std::vector<Event> events;
  double bucket_s = 0.010;  // the interval whose slowest and median answers are drawn
};

// The picture, a complete SVG document.
std::string TimelineSvg(const Timeline& timeline);
// Writes TimelineSvg(timeline) to `path`; fails, naming the path and why, if it cannot.
absl::Status WriteTimelineSvg(const Timeline& timeline, const std::string& path);

}  // namespace romulus::cli

#endif  // ROMULUS_CLI_TIMELINE_H_
