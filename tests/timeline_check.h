// Checks on a timeline picture (cli/timeline.h), shared by its own test and the demo's.
#ifndef ROMULUS_TESTS_TIMELINE_CHECK_H_
#define ROMULUS_TESTS_TIMELINE_CHECK_H_

#include <cstdio>
#include <regex>
#include <string>
#include <vector>

namespace romulus::testing {

struct TimelineMarker {
  double x = 0;    // the line's place in the picture
  double t_s = 0;  // the time its label names
  std::string label;
};

// The event markers of a picture from cli::TimelineSvg, in order: each a dashed line and its
// label "what (T s)".
inline std::vector<TimelineMarker> TimelineMarkers(const std::string& svg) {
  static const std::regex kMarker(
      "<line class=\"event\" x1=\"([0-9.]+)\"[^>]*/>\\s*<text[^>]*>([^<]*) \\(([0-9.]+) "
      "s\\)</text>");
  std::vector<TimelineMarker> out;
  for (std::sregex_iterator it(svg.begin(), svg.end(), kMarker), end; it != end; ++it) {
    out.push_back({std::stod((*it)[1]), std::stod((*it)[3]), (*it)[2]});
  }
  return out;
}

// What xmllint (libxml2-utils) says is wrong with the XML file at `path`: "" if it is
// well-formed.
inline std::string XmlErrors(const std::string& path) {
  FILE* p = ::popen(("xmllint --noout '" + path + "' 2>&1").c_str(), "r");
  if (p == nullptr) return "popen failed";
  std::string out;
  char buf[512];
  while (size_t n = std::fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  int rc = ::pclose(p);
  if (rc != 0 && out.empty()) out = "xmllint failed (is libxml2-utils installed?)";
  return rc == 0 ? "" : out;
}

}  // namespace romulus::testing

#endif  // ROMULUS_TESTS_TIMELINE_CHECK_H_
