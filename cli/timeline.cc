#include "cli/timeline.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace romulus::cli {
namespace {

// The picture's size and the plot area inside it, in SVG units (pixels at 100%).
constexpr double kWidth = 1200, kHeight = 640;
constexpr double kLeft = 80, kRight = kWidth - 40, kTop = 100, kBottom = 500;
constexpr double kRowHeight = 16;  // one event label's row
const char* const kSlowest = "#1f4e9c";
const char* const kMedian = "#7fb0e6";
const char* const kEventColours[] = {"#c0392b", "#d35400", "#1e8449", "#6c3483"};

std::string Escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&apos;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

// A tick step of 1, 2 or 5 times a power of ten that cuts `range` into about `ticks` parts.
double NiceStep(double range, int ticks) {
  double raw = range / ticks;
  double p = std::pow(10, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0}) {
    if (raw <= m * p) return m * p;
  }
  return 10 * p;
}

std::string Number(double v) {
  std::string s = absl::StrFormat("%g", v);
  return s;
}

}  // namespace

std::string TimelineSvg(const Timeline& t) {
  // Each bucket's slowest and median answer, in runs of buckets with answers, broken where none
  // was sent for longer than usual (three times the median gap between buckets with answers,
  // 50 ms at least: the clients waited, as in a failover) or a span ends: no line through a
  // pause, where nothing was measured.
  std::map<int64_t, std::vector<double>> buckets;
  const double bucket_s = t.bucket_s > 0 ? t.bucket_s : 0.010;
  for (const auto& p : t.points) {
    buckets[static_cast<int64_t>(std::floor(p.t_s / bucket_s))].push_back(p.latency_ms);
  }
  std::vector<double> gaps;
  for (auto it = buckets.begin(); it != buckets.end() && std::next(it) != buckets.end(); ++it) {
    gaps.push_back(static_cast<double>(std::next(it)->first - it->first) * bucket_s);
  }
  double usual_gap = 0;
  if (!gaps.empty()) {
    std::nth_element(gaps.begin(), gaps.begin() + static_cast<long>(gaps.size() / 2), gaps.end());
    usual_gap = gaps[gaps.size() / 2];
  }
  const double break_gap = std::max(0.050, 3 * usual_gap);
  struct Bucket {
    double t_s, max_ms, median_ms;
  };
  std::vector<std::vector<Bucket>> runs;
  double last_t = -INFINITY;
  for (auto& [i, v] : buckets) {
    double at = (static_cast<double>(i) + 0.5) * bucket_s;
    bool brk = runs.empty() || at - last_t > break_gap + bucket_s / 2;
    for (const auto& s : t.spans) brk = brk || (last_t < s.to_s && s.to_s <= at);
    if (brk) runs.emplace_back();
    std::nth_element(v.begin(), v.begin() + static_cast<long>(v.size() / 2), v.end());
    double median = v[v.size() / 2];
    runs.back().push_back({at, *std::max_element(v.begin(), v.end()), median});
    last_t = at;
  }
  // The time axis: from 0 to the last point, span or event.
  double t_end = 0;
  double lat_min = INFINITY, lat_max = 0;
  for (const auto& p : t.points) t_end = std::max(t_end, p.t_s);
  for (const auto& run : runs) {
    for (const auto& b : run) {
      if (b.median_ms > 0) lat_min = std::min(lat_min, b.median_ms);
      lat_max = std::max(lat_max, b.max_ms);
    }
  }
  for (const auto& s : t.spans) t_end = std::max(t_end, s.to_s);
  for (const auto& e : t.events) t_end = std::max(t_end, e.t_s);
  if (t_end <= 0) t_end = 1;
  double x_step = NiceStep(t_end, 12);
  double x_max = std::ceil(t_end / x_step) * x_step;
  auto X = [&](double s) { return kLeft + (kRight - kLeft) * std::clamp(s, 0.0, x_max) / x_max; };

  // The latency axis: log scale, whole decades (at least three) from the one below the fastest
  // median to the one above the slowest answer, so that a failover's wait of a few hundred
  // milliseconds and sub-millisecond answers both show. Slowest answers faster than the lowest
  // decade (0.01 ms at least) are drawn on it.
  double lo = lat_max > 0 ? std::pow(10, std::floor(std::log10(lat_min))) : 0.1;
  lo = std::max(lo, 0.01);
  double hi = lat_max > 0 ? std::pow(10, std::ceil(std::log10(lat_max))) : 1000;
  hi = std::max(hi, lo * 1000);
  const double y_top = kTop + kRowHeight * (static_cast<double>(t.events.size()) + 0.5);
  auto Y = [&](double ms) {
    double f = (std::log10(std::max(ms, lo)) - std::log10(lo)) / (std::log10(hi) - std::log10(lo));
    return kBottom - (kBottom - y_top) * std::clamp(f, 0.0, 1.0);
  };

  std::string svg = absl::StrFormat(
      "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%g\" height=\"%g\" viewBox=\"0 0 %g %g\" "
      "font-family=\"DejaVu Sans, Verdana, sans-serif\" font-size=\"13\">\n"
      "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
      "<text x=\"%g\" y=\"30\" font-size=\"17\" font-weight=\"bold\">%s</text>\n",
      kWidth, kHeight, kWidth, kHeight, kLeft, Escape(t.title));

  // The spans, shaded, their labels above the plot area.
  absl::StrAppend(&svg, "<g class=\"spans\">\n");
  for (size_t i = 0; i < t.spans.size(); i++) {
    const auto& s = t.spans[i];
    double x0 = X(s.from_s), x1 = X(s.to_s);
    absl::StrAppendFormat(&svg,
                          "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" "
                          "fill=\"%s\"/>\n",
                          x0, kTop, std::max(x1 - x0, 1.0), kBottom - kTop,
                          i % 2 ? "#eef3fa" : "#f4f4f4");
    absl::StrAppendFormat(&svg,
                          "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" "
                          "font-weight=\"bold\">%s</text>\n",
                          (x0 + x1) / 2, kTop - 8 - (i % 2 ? 16 : 0), Escape(s.label));
  }
  absl::StrAppend(&svg, "</g>\n");

  // The axes: decades and their minor lines on y, a nice step on x.
  absl::StrAppend(&svg, "<g class=\"axes\" stroke=\"#d0d0d0\" stroke-width=\"1\">\n");
  for (double d = lo; d <= hi * 1.001; d *= 10) {
    for (int m = 1; m < 10 && d * m <= hi * 1.001; m++) {
      absl::StrAppendFormat(&svg, "<line x1=\"%g\" x2=\"%g\" y1=\"%.1f\" y2=\"%.1f\"%s/>\n", kLeft,
                            kRight, Y(d * m), Y(d * m), m == 1 ? "" : " stroke=\"#ececec\"");
    }
  }
  for (double s = 0; s <= x_max + x_step / 2; s += x_step) {
    absl::StrAppendFormat(&svg, "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%g\"/>\n", X(s),
                          X(s), y_top, kBottom + 5);
  }
  absl::StrAppend(&svg, "</g>\n<g class=\"ticks\" fill=\"#333\">\n");
  for (double d = lo; d <= hi * 1.001; d *= 10) {
    absl::StrAppendFormat(&svg, "<text x=\"%g\" y=\"%.1f\" text-anchor=\"end\">%s</text>\n",
                          kLeft - 6, Y(d) + 4, Number(d));
  }
  for (double s = 0; s <= x_max + x_step / 2; s += x_step) {
    absl::StrAppendFormat(&svg, "<text x=\"%.1f\" y=\"%g\" text-anchor=\"middle\">%s</text>\n",
                          X(s), kBottom + 19, Number(std::round(s * 1000) / 1000));
  }
  absl::StrAppendFormat(
      &svg,
      "</g>\n<rect x=\"%g\" y=\"%g\" width=\"%g\" height=\"%g\" fill=\"none\" "
      "stroke=\"#555\"/>\n"
      "<text x=\"%g\" y=\"%g\" text-anchor=\"middle\">%s</text>\n"
      "<text transform=\"translate(24 %.1f) rotate(-90)\" text-anchor=\"middle\">request latency "
      "(ms, log scale)</text>\n",
      kLeft, kTop, kRight - kLeft, kBottom - kTop, (kLeft + kRight) / 2, kBottom + 40,
      Escape(t.x_label), (y_top + kBottom) / 2);

  // The latency: a line through each run of buckets, a dot for a bucket alone.
  for (bool slowest : {true, false}) {  // the median over the slowest, where they are one
    const char* colour = slowest ? kSlowest : kMedian;
    absl::StrAppendFormat(&svg,
                          "<g class=\"%s\" fill=\"none\" stroke=\"%s\" stroke-width=\"%s\" "
                          "stroke-linejoin=\"round\">\n",
                          slowest ? "slowest" : "median", colour, slowest ? "2" : "1.2");
    for (const auto& run : runs) {
      if (run.size() == 1) {
        double v = slowest ? run[0].max_ms : run[0].median_ms;
        absl::StrAppendFormat(&svg, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"%s\" fill=\"%s\"/>\n",
                              X(run[0].t_s), Y(v), slowest ? "2.5" : "1.5", colour);
        continue;
      }
      absl::StrAppend(&svg, "<polyline points=\"");
      for (const auto& b : run) {
        absl::StrAppendFormat(&svg, "%.1f,%.1f ", X(b.t_s), Y(slowest ? b.max_ms : b.median_ms));
      }
      svg.back() = '"';
      absl::StrAppend(&svg, "/>\n");
    }
    absl::StrAppend(&svg, "</g>\n");
  }

  // The events: a dashed line each, and its label in a row of its own (events a few
  // milliseconds apart would overwrite each other's), left of the line if it would leave the
  // plot on the right.
  absl::StrAppend(&svg, "<g class=\"events\">\n");
  for (size_t i = 0; i < t.events.size(); i++) {
    const auto& e = t.events[i];
    const char* colour = kEventColours[i % std::size(kEventColours)];
    double x = X(e.t_s), y = kTop + kRowHeight * (static_cast<double>(i) + 1) - 3;
    bool left = x > kLeft + (kRight - kLeft) * 0.6;
    absl::StrAppendFormat(
        &svg,
        "<line class=\"event\" x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%g\" stroke=\"%s\" "
        "stroke-width=\"1.6\" stroke-dasharray=\"6 3\"/>\n"
        "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"%s\" fill=\"%s\" stroke=\"white\" "
        "stroke-width=\"3\" paint-order=\"stroke\">%s</text>\n",
        x, x, y - 11, kBottom, colour, left ? x - 5 : x + 5, y, left ? "end" : "start", colour,
        Escape(absl::StrFormat("%s (%.3f s)", e.label, e.t_s)));
  }
  absl::StrAppend(&svg, "</g>\n");

  // The legend and a note on what is drawn.
  double ly = kBottom + 68;
  absl::StrAppendFormat(&svg, "<g class=\"legend\">\n");
  double lx = kLeft;
  // Text is under 7 units a character wide in the font's size.
  auto key = [&](const std::string& mark, const std::string& text) {
    absl::StrAppendFormat(&svg, "%s<text x=\"%.1f\" y=\"%.1f\">%s</text>\n", mark, lx + 30, ly + 4,
                          Escape(text));
    lx += 30 + 6.8 * static_cast<double>(text.size()) + 28;
  };
  const std::string per = absl::StrFormat("%g ms", bucket_s * 1000);
  key(absl::StrFormat("<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" "
                      "stroke-width=\"2\"/>",
                      lx, lx + 24, ly, ly, kSlowest),
      "slowest answer of the requests sent in each " + per);
  key(absl::StrFormat("<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" "
                      "stroke-width=\"2\"/>",
                      lx, lx + 24, ly, ly, kMedian),
      "their median");
  key(absl::StrFormat("<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#555\" "
                      "stroke-width=\"1.6\" stroke-dasharray=\"6 3\"/>",
                      lx, lx + 24, ly, ly),
      "an event, at the time the demo measured it");
  key(absl::StrFormat("<rect x=\"%.1f\" y=\"%.1f\" width=\"24\" height=\"12\" fill=\"#f4f4f4\" "
                      "stroke=\"#ccc\"/>",
                      lx, ly - 6),
      "an act");
  absl::StrAppend(&svg, "</g>\n");
  std::string note = absl::StrFormat(
      "%d answered requests, each at the time it was sent; no line where none was sent for %.0f "
      "ms or more. Latency on a log scale%s.",
      t.points.size(), break_gap * 1000,
      lat_min < lo ? absl::StrFormat(": answers under %g ms are drawn at %g ms", lo, lo) : "");
  if (t.points_dropped > 0) {
    absl::StrAppendFormat(&note, " %d more answers were not recorded (memory bound).",
                          t.points_dropped);
  }
  absl::StrAppendFormat(&svg, "<text x=\"%g\" y=\"%.1f\" fill=\"#555\">%s</text>\n</svg>\n", kLeft,
                        ly + 32, Escape(note));
  return svg;
}

absl::Status WriteTimelineSvg(const Timeline& timeline, const std::string& path) {
  std::string svg = TimelineSvg(timeline);
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  int e = fd < 0 ? errno : 0;
  for (size_t done = 0; fd >= 0 && e == 0 && done < svg.size();) {
    ssize_t n = ::write(fd, svg.data() + done, svg.size() - done);
    if (n < 0 && errno != EINTR) e = errno;
    if (n == 0) e = EIO;
    if (n > 0) done += static_cast<size_t>(n);
  }
  if (fd >= 0 && ::close(fd) != 0 && e == 0) e = errno;
  if (fd < 0 || e != 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot write the timeline to ", path, ": ", std::strerror(e)));
  }
  return absl::OkStatus();
}

}  // namespace romulus::cli
