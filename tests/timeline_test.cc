// The timeline picture `romulus demo --plot` writes, from synthetic answers: well-formed SVG
// with its axes, legend and one labelled marker per event at its time, and a one-line error
// when the file cannot be written.
#include "cli/timeline.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "tests/test_util.h"
#include "tests/timeline_check.h"

namespace romulus::timeline_test {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// Two acts of answers a millisecond apart, one of them waiting 150 ms at the "kill".
cli::Timeline Demo() {
  cli::Timeline t;
  t.title = "a <demo> & its timeline";
  for (int i = 0; i < 4000; i++) {
    double s = i * 0.001;
    t.points.push_back({s, i == 2000 ? 150.0 : 0.4 + (i % 7) * 0.1});
    t.points.push_back({6 + s, 25.0 + (i % 5)});
  }
  t.points_dropped = 3;
  t.spans = {{0, 4, "act 1"}, {4.5, 5.5, "act 2"}, {6, 10, "act 3"}};
  t.events = {{2.0, "kill"}, {2.15, "promotion"}, {5.5, "re-protection"}, {8.0, "migration"}};
  return t;
}

TEST(Timeline, IsWellFormedSvgWithEachEventMarkedAtItsTime) {
  testing::TempDir dir;
  std::string path = dir.File("timeline.svg");
  ASSERT_TRUE(cli::WriteTimelineSvg(Demo(), path).ok());
  EXPECT_EQ(testing::XmlErrors(path), "");
  std::stringstream svg;
  svg << std::ifstream(path).rdbuf();
  // Text is escaped; the axes say their units and the scale, the legend what is drawn.
  EXPECT_THAT(svg.str(), HasSubstr("a &lt;demo&gt; &amp; its timeline"));
  EXPECT_THAT(svg.str(), HasSubstr("request latency (ms, log scale)"));
  EXPECT_THAT(svg.str(), HasSubstr("time the request was sent (s)"));
  EXPECT_THAT(svg.str(), HasSubstr("slowest answer of the requests sent in each 10 ms"));
  EXPECT_THAT(svg.str(), HasSubstr("8000 answered requests"));
  EXPECT_THAT(svg.str(), HasSubstr("3 more answers were not recorded"));
  for (const char* act : {"act 1", "act 2", "act 3"}) EXPECT_THAT(svg.str(), HasSubstr(act));
  // The y axis spans the decades from the fastest median to the failover's wait.
  for (const char* decade :
       {">0.1</text>", ">1</text>", ">10</text>", ">100</text>", ">1000</text>"}) {
    EXPECT_THAT(svg.str(), HasSubstr(decade));
  }
  auto markers = testing::TimelineMarkers(svg.str());
  ASSERT_EQ(markers.size(), 4u) << svg.str();
  const char* labels[] = {"kill", "promotion", "re-protection", "migration"};
  const double times[] = {2.0, 2.15, 5.5, 8.0};
  for (size_t i = 0; i < 4; i++) {
    EXPECT_EQ(markers[i].label, labels[i]);
    EXPECT_DOUBLE_EQ(markers[i].t_s, times[i]);
    // The time axis runs from 0 to 10 s over the plot, 80 to 1160 units.
    EXPECT_NEAR(markers[i].x, 80 + 1080 * times[i] / 10, 0.1) << labels[i];
  }
}

TEST(Timeline, NoAnswersStillDrawAPicture) {
  cli::Timeline t;
  t.events = {{1.0, "alone"}};
  std::string svg = cli::TimelineSvg(t);
  EXPECT_EQ(testing::TimelineMarkers(svg).size(), 1u);
  EXPECT_THAT(svg, HasSubstr("0 answered requests"));
  EXPECT_THAT(svg, Not(HasSubstr("nan")));
  EXPECT_THAT(svg, Not(HasSubstr("inf")));
}

TEST(Timeline, AFileThatCannotBeWrittenIsAOneLineError) {
  testing::TempDir dir;
  auto s = cli::WriteTimelineSvg(Demo(), dir.File("no-such-dir/timeline.svg"));
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(std::string(s.message()), "cannot write the timeline to " +
                                          dir.File("no-such-dir/timeline.svg") +
                                          ": No such file or directory");
}

}  // namespace
}  // namespace romulus::timeline_test
