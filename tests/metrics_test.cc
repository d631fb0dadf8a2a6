// Prometheus metrics of running `romulus primary`, `mirror` and `witness` processes
// (cli::LocalHosts with metrics_listen): what they serve passes `promtool check metrics`, only
// GET /metrics is served, a silent client blocks no one, and a real Prometheus server that
// scrapes the two hosts reports the same figures as `romulus status`.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/property_tree/json_parser.hpp>
#include <boost/property_tree/ptree.hpp>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "cli/local_hosts.h"
#include "tests/test_util.h"

namespace romulus::metrics_test {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using testing::Child;
using ::testing::HasSubstr;
using testing::TempDir;
using Host = cli::LocalHosts::Host;

// The full path of `name` in $PATH, or "".
std::string Which(const std::string& name) {
  const char* path = std::getenv("PATH");
  for (absl::string_view dir : absl::StrSplit(path ? path : "/usr/bin:/bin", ':')) {
    std::string full = absl::StrCat(dir, "/", name);
    if (!dir.empty() && ::access(full.c_str(), X_OK) == 0) return full;
  }
  return "";
}

struct HttpReply {
  unsigned status = 0;
  std::string content_type, body;
};

// One request to 127.0.0.1:`port`, all of it within a scaled deadline.
absl::StatusOr<HttpReply> Http(uint16_t port, const std::string& target,
                               http::verb method = http::verb::get, size_t header_bytes = 0) {
  asio::io_context ioc;
  beast::tcp_stream stream(ioc);
  http::request<http::string_body> req(method, target, 11);
  req.set(http::field::host, "127.0.0.1");
  if (header_bytes > 0) req.set("X-Padding", std::string(header_bytes, 'x'));
  req.prepare_payload();
  beast::flat_buffer buffer;
  http::response<http::string_body> res;
  beast::error_code result = asio::error::timed_out;
  stream.expires_after(testing::Scaled(30));
  stream.async_connect(asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), port),
                       [&](beast::error_code ec) {
                         if (ec) {
                           result = ec;
                           return;
                         }
                         http::async_write(stream, req, [&](beast::error_code ec, size_t) {
                           if (ec) {
                             result = ec;
                             return;
                           }
                           http::async_read(stream, buffer, res,
                                            [&](beast::error_code ec, size_t) { result = ec; });
                         });
                       });
  ioc.run();
  if (result) return absl::UnavailableError(absl::StrCat("GET ", target, ": ", result.message()));
  return HttpReply{res.result_int(), std::string(res[http::field::content_type]), res.body()};
}

// Runs `command` with /bin/sh; its exit code and output.
std::pair<int, std::string> Shell(const std::string& command) {
  auto p = cli::Process::Start("/bin/sh", {"-c", command});
  if (!p.ok()) return {-1, std::string(p.status().message())};
  auto code = (*p)->Wait(testing::ScaledMs(60));
  return {code.value_or(-1), (*p)->output()};
}

std::unique_ptr<cli::LocalHosts> StartHosts(const TempDir& dir) {
  cli::LocalHosts::Options o{.binary = ROMULUS_BINARY, .dir = dir.path()};
  o.wait = testing::ScaledMs(60);
  o.metrics = true;
  auto hosts = cli::LocalHosts::Start(std::move(o));
  EXPECT_TRUE(hosts.ok()) << hosts.status();
  return hosts.ok() ? std::move(*hosts) : nullptr;
}

// The value after "KEY:" in `romulus status` output ("" if absent).
std::string StatusLine(const std::string& status, const std::string& key) {
  for (absl::string_view line : absl::StrSplit(status, '\n')) {
    if (absl::StartsWith(line, key + ":")) {
      return std::string(absl::StripAsciiWhitespace(line.substr(key.size() + 1)));
    }
  }
  return "";
}

std::string RunStatus(const std::string& socket) {
  Child status({"status", "--socket", socket});
  EXPECT_EQ(status.Wait(30), 0) << status.output();
  return status.output();
}

// "1234 (committed epoch 1230, lag 4)" -> 1230.
int64_t CommittedEpoch(const std::string& status) {
  std::string epochs = StatusLine(status, "epochs");
  size_t at = epochs.find("committed epoch ");
  int64_t v = -2;
  if (at != std::string::npos) {
    std::string rest = epochs.substr(at + 16);
    (void)absl::SimpleAtoi(rest.substr(0, rest.find(',')), &v);
  }
  return v;
}

TEST(Metrics, PrimaryMirrorAndWitnessServePromtoolCleanMetricsOnlyAtGetMetrics) {
  std::string promtool = Which("promtool");
  if (promtool.empty()) {
    GTEST_SKIP() << "promtool is not installed (Debian package prometheus; scripts/setup.sh)";
  }
  TempDir dir;
  auto hosts = StartHosts(dir);
  ASSERT_NE(hosts, nullptr);
  struct Target {
    const char* name;
    uint16_t port;
    const char* role;
  };
  for (const Target& t : {Target{"primary", hosts->metrics_port(Host::kA), "primary"},
                          Target{"mirror", hosts->metrics_port(Host::kB), "mirror"},
                          Target{"witness", hosts->witness_metrics_port(), "witness"}}) {
    SCOPED_TRACE(t.name);
    auto reply = Http(t.port, "/metrics");
    ASSERT_TRUE(reply.ok()) << reply.status();
    EXPECT_EQ(reply->status, 200u);
    EXPECT_THAT(reply->content_type, ::testing::StartsWith("text/plain; version=0.0.4"));
    EXPECT_THAT(reply->body, HasSubstr(absl::StrCat("role=\"", t.role, "\"")));
    std::string file = dir.File(absl::StrCat(t.name, ".prom"));
    std::ofstream(file) << reply->body;
    auto [code, out] = Shell(absl::StrCat(promtool, " check metrics < ", file));
    EXPECT_EQ(code, 0) << out << "\n" << reply->body;
    std::printf("promtool check metrics (%s, %zu bytes): exit %d%s%s", t.name, reply->body.size(),
                code, out.empty() ? "" : ": ", out.c_str());
    std::printf("\n");
  }
  // What the primary says once protected: its histograms have observations.
  auto primary = Http(hosts->metrics_port(Host::kA), "/metrics");
  ASSERT_TRUE(primary.ok()) << primary.status();
  for (const char* line :
       {"romulus_protected{reason=\"replicating\"} 1",
        "romulus_checkpoint_pause_seconds_bucket{le=\"+Inf\"}",
        "romulus_checkpoint_commit_seconds_count",
        "romulus_replication_sent_bytes_total{kind=\"resync\"}",
        "romulus_path_up{path=", "romulus_lease_held 1", "romulus_peer_alive 1"}) {
    EXPECT_THAT(primary->body, HasSubstr(line));
  }
  EXPECT_THAT(primary->body, ::testing::Not(HasSubstr("romulus_checkpoint_pause_seconds_count 0")));

  // A witness refuses a bad address before it starts.
  Child bad({"witness", "--psk-file", dir.File("key"), "--metrics-listen", "localhost:9100"});
  EXPECT_EQ(bad.Wait(30), 2);  // a usage error
  EXPECT_THAT(bad.output(), HasSubstr("--metrics-listen: 'localhost:9100' is not ADDR:PORT"));

  uint16_t port = hosts->metrics_port(Host::kA);
  // Nothing but GET /metrics.
  auto other = Http(port, "/");
  ASSERT_TRUE(other.ok()) << other.status();
  EXPECT_EQ(other->status, 404u);
  auto post = Http(port, "/metrics", http::verb::post);
  ASSERT_TRUE(post.ok()) << post.status();
  EXPECT_EQ(post->status, 405u);
  // A request larger than the server takes is refused (the connection closes), harmlessly.
  auto huge = Http(port, "/metrics", http::verb::get, 32 * 1024);
  if (huge.ok()) {
    EXPECT_NE(huge->status, 200u);
  }
  // A client that connects and says nothing does not hold up the next scrape.
  asio::io_context ioc;
  asio::ip::tcp::socket silent(ioc);
  silent.connect(asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), port));
  auto after = Http(port, "/metrics");
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->status, 200u);
  EXPECT_TRUE(hosts->Stop().ok());
}

// The results of a Prometheus instant query: each series' labels and value.
struct Series {
  std::map<std::string, std::string> labels;
  double time = 0;  // seconds since the epoch
  std::string value;
};
absl::StatusOr<std::vector<Series>> Query(uint16_t port, const std::string& promql) {
  std::string target = "/api/v1/query?query=";
  for (unsigned char c : promql) {
    if (std::isalnum(c) || c == '_') {
      target += static_cast<char>(c);
    } else {
      target += absl::StrFormat("%%%02X", c);
    }
  }
  auto reply = Http(port, target);
  if (!reply.ok()) return reply.status();
  if (reply->status != 200) {
    return absl::UnavailableError(
        absl::StrCat("query ", promql, ": HTTP ", reply->status, " ", reply->body.substr(0, 200)));
  }
  // {"status":"success","data":{"resultType":"vector","result":[{"metric":{...},
  //  "value":[TIME,"VALUE"]}, ...]}}, read with Boost.PropertyTree (arrays are children with
  // empty names; every value a string).
  boost::property_tree::ptree json;
  try {
    std::istringstream in(reply->body);
    boost::property_tree::read_json(in, json);
  } catch (const boost::property_tree::json_parser_error& e) {
    return absl::DataLossError(absl::StrCat("query ", promql, ": not JSON: ", e.what()));
  }
  std::vector<Series> out;
  auto result = json.get_child_optional("data.result");
  if (!result) return absl::DataLossError(absl::StrCat("query ", promql, ": no data.result"));
  for (const auto& [unused, item] : *result) {
    Series s;
    if (auto metric = item.get_child_optional("metric")) {
      for (const auto& [k, v] : *metric) s.labels[k] = v.data();
    }
    if (auto value = item.get_child_optional("value"); value && value->size() == 2) {
      auto it = value->begin();
      if (!absl::SimpleAtod(it->second.data(), &s.time)) s.time = 0;
      s.value = (++it)->second.data();
    }
    out.push_back(std::move(s));
  }
  return out;
}

// Polls `promql` until it returns exactly one series (scaled deadline).
std::optional<Series> QueryOne(uint16_t port, const std::string& promql, double seconds) {
  std::optional<Series> found;
  std::string last;
  testing::WaitUntil(
      [&] {
        auto r = Query(port, promql);
        if (!r.ok()) {
          last = std::string(r.status().message());
          return false;
        }
        if (r->size() == 1) found = (*r)[0];
        return found.has_value();
      },
      seconds);
  EXPECT_TRUE(found.has_value()) << promql << ": " << last;
  return found;
}

TEST(Metrics, ARealPrometheusScrapesThePrimaryAndMirrorAndAgreesWithRomulusStatus) {
  std::string prometheus = Which("prometheus");
  if (prometheus.empty() || Which("promtool").empty()) {
    GTEST_SKIP() << "prometheus is not installed (Debian package prometheus; scripts/setup.sh)";
  }
  TempDir dir;  // before the server: removed after it is killed, also on failure
  auto hosts = StartHosts(dir);
  ASSERT_NE(hosts, nullptr);
  uint16_t port = testing::FreePort();
  std::ofstream(dir.File("prometheus.yml"))
      << "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
      << "scrape_configs:\n"
      << "  - job_name: primary\n    static_configs:\n      - targets: ['127.0.0.1:"
      << hosts->metrics_port(Host::kA) << "']\n"
      << "  - job_name: mirror\n    static_configs:\n      - targets: ['127.0.0.1:"
      << hosts->metrics_port(Host::kB) << "']\n";
  auto server = cli::Process::Start(
      prometheus, {absl::StrCat("--config.file=", dir.File("prometheus.yml")),
                   absl::StrCat("--storage.tsdb.path=", dir.File("tsdb")),
                   absl::StrCat("--web.listen-address=127.0.0.1:", port), "--log.level=warn"});
  ASSERT_TRUE(server.ok()) << server.status();
  // Killed (SIGKILL) by its destructor however this test ends; the directory goes after it.
  std::unique_ptr<cli::Process> prom = std::move(*server);

  for (auto [host, job] : {std::pair{Host::kA, "primary"}, std::pair{Host::kB, "mirror"}}) {
    SCOPED_TRACE(job);
    auto info = QueryOne(port, absl::StrCat("romulus_node_info{job=\"", job, "\"}"), 60);
    ASSERT_TRUE(info.has_value()) << prom->output();
    std::string status = RunStatus(hosts->control_socket(host));
    EXPECT_EQ(info->labels["role"], StatusLine(status, "role")) << status;
    EXPECT_EQ(info->labels["platform"], StatusLine(status, "platform")) << status;
    EXPECT_EQ(info->labels["vm_id"], StatusLine(status, "vm")) << status;
    std::printf("prometheus: %s role=%s platform=%s; romulus status: role %s, platform %s\n", job,
                info->labels["role"].c_str(), info->labels["platform"].c_str(),
                StatusLine(status, "role").c_str(), StatusLine(status, "platform").c_str());
  }

  // The primary's resyncs: one, as long as the mirror stays connected (protected and idle).
  auto resyncs = QueryOne(port, "romulus_resyncs_total{job=\"primary\"}", 30);
  ASSERT_TRUE(resyncs.has_value());
  std::string status = RunStatus(hosts->control_socket(Host::kA));
  EXPECT_EQ(resyncs->value, StatusLine(status, "resyncs")) << status;

  // The committed epoch moves on every 25 ms: a sample scraped after one `romulus status` and
  // read before the next lies between what the two printed.
  int64_t before = CommittedEpoch(RunStatus(hosts->control_socket(Host::kA)));
  double asked =
      std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  std::optional<Series> sample;
  ASSERT_TRUE(testing::WaitUntil(
      [&] {
        auto t = Query(port, "timestamp(romulus_committed_epoch{job=\"primary\"})");
        auto v = Query(port, "romulus_committed_epoch{job=\"primary\"}");
        double scraped = 0;
        if (!t.ok() || t->size() != 1 || !v.ok() || v->size() != 1 ||
            !absl::SimpleAtod((*t)[0].value, &scraped) || scraped <= asked) {
          return false;
        }
        // Both queries must have seen the same scrape: asked again, the time is the same.
        auto again = Query(port, "timestamp(romulus_committed_epoch{job=\"primary\"})");
        if (!again.ok() || again->size() != 1 || (*again)[0].value != (*t)[0].value) return false;
        sample = (*v)[0];
        return true;
      },
      30));
  // Asked until it moved on (a sanitizer build on a busy machine commits slowly): later still
  // bounds the sample from above.
  int64_t after = before;
  EXPECT_TRUE(testing::WaitUntil(
      [&] { return (after = CommittedEpoch(RunStatus(hosts->control_socket(Host::kA)))) > before; },
      60));
  int64_t value = -3;
  ASSERT_TRUE(absl::SimpleAtoi(sample->value, &value)) << sample->value;
  EXPECT_LE(before, value);
  EXPECT_LE(value, after);
  std::printf("committed epoch: romulus status %ld, prometheus %ld, romulus status %ld\n",
              static_cast<long>(before), static_cast<long>(value), static_cast<long>(after));
  EXPECT_TRUE(hosts->Stop().ok());
}

}  // namespace
}  // namespace romulus::metrics_test
