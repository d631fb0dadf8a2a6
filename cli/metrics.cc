#include "cli/metrics.h"

#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <cmath>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace romulus::cli {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using checkpoint::Histogram;

// What one client may send and take: a scrape is a short GET, so a request is small and a
// client that does not finish it (or does not read the answer) within the timeout is dropped.
constexpr size_t kMaxHeaderBytes = 8 * 1024;
constexpr size_t kMaxBodyBytes = 4 * 1024;
constexpr auto kClientTimeout = std::chrono::seconds(10);
constexpr int kMaxClients = 64;
constexpr const char* kContentType = "text/plain; version=0.0.4; charset=utf-8";

// ---- The exposition text ----

std::string Escape(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\' || c == '"') {
      out += '\\';
      out += c;
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

std::string Number(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (v == static_cast<double>(static_cast<int64_t>(v)) && v < 1e15 && v > -1e15) {
    return absl::StrCat(static_cast<int64_t>(v));
  }
  return absl::StrFormat("%.9g", v);
}

// Writes metric families: each name's HELP and TYPE once, then its samples.
class Exposition {
 public:
  // `labels` as `a="x",b="y"` (values escaped with L()), or "".
  void Gauge(const std::string& name, const std::string& help, double v,
             const std::string& labels = "") {
    Family(name, "gauge", help);
    Sample(name, labels, v);
  }
  void Counter(const std::string& name, const std::string& help, double v,
               const std::string& labels = "") {
    Family(name, "counter", help);
    Sample(name, labels, v);
  }
  void Hist(const std::string& name, const std::string& help, const Histogram::Snapshot& h) {
    Family(name, "histogram", help);
    uint64_t cumulative = 0;
    for (size_t i = 0; i < h.counts.size(); i++) {
      cumulative += h.counts[i];
      std::string le = i < h.bounds.size() ? Number(h.bounds[i]) : "+Inf";
      Sample(name + "_bucket", L("le", le), static_cast<double>(cumulative));
    }
    if (h.counts.empty()) Sample(name + "_bucket", L("le", "+Inf"), 0);
    Sample(name + "_sum", "", h.sum);
    Sample(name + "_count", "", static_cast<double>(h.count));
  }
  static std::string L(const std::string& key, const std::string& value) {
    return absl::StrCat(key, "=\"", Escape(value), "\"");
  }
  std::string text() && { return std::move(out_); }

 private:
  void Family(const std::string& name, const char* type, const std::string& help) {
    if (name == last_) return;
    last_ = name;
    absl::StrAppend(&out_, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
  }
  void Sample(const std::string& name, const std::string& labels, double v) {
    absl::StrAppend(&out_, name, labels.empty() ? "" : absl::StrCat("{", labels, "}"), " ",
                    Number(v), "\n");
  }
  std::string out_, last_;
};

// Whether the VM is protected (its committed state held by a mirror), and a word saying why
// (or why not).
std::pair<bool, const char*> Protection(const pb::StatusReply& r,
                                        const switchover::Node::Status& n) {
  if (absl::StartsWith(r.state(), "VM stopped")) return {false, "vm_stopped"};
  if (r.role() == "primary") {
    if (!n.primary) return {false, "no_peer_configured"};
    if (r.has_sync()) return {false, "synchronising"};
    if (!r.peer_connected()) return {false, "no_mirror"};
    if (r.unprotected_s() > 0) return {false, "awaiting_first_commit"};
    return {true, "replicating"};
  }
  if (r.role() == "mirror") {
    if (!r.peer_connected()) return {false, "no_primary"};
    if (n.mirror && n.mirror->syncing) return {false, "synchronising"};
    if (r.committed_epoch() < 0) return {false, "no_replica"};
    return {true, "replicating"};
  }
  return {false, "idle"};
}

// ---- The HTTP server ----

class ScrapeConnection : public std::enable_shared_from_this<ScrapeConnection> {
 public:
  ScrapeConnection(tcp::socket socket, const std::function<std::string()>& render,
                   std::atomic<int>& clients)
      : stream_(std::move(socket)), render_(render), clients_(clients) {}
  ~ScrapeConnection() { clients_--; }

  void Read() {
    parser_.emplace();
    parser_->header_limit(kMaxHeaderBytes);
    parser_->body_limit(kMaxBodyBytes);
    stream_.expires_after(kClientTimeout);
    http::async_read(stream_, buffer_, *parser_,
                     [self = shared_from_this()](beast::error_code ec, size_t) {
                       if (!ec) self->Answer();
                       // Else: the client left, timed out or sent what HTTP does not allow:
                       // the connection closes with this object.
                     });
  }

 private:
  void Answer() {
    const auto& req = parser_->get();
    response_ = {};
    response_.version(req.version());
    response_.keep_alive(req.keep_alive());
    response_.set(http::field::content_type, "text/plain; charset=utf-8");
    if (req.target() != "/metrics") {
      response_.result(http::status::not_found);
      response_.body() = "only /metrics is served here\n";
    } else if (req.method() != http::verb::get) {
      response_.result(http::status::method_not_allowed);
      response_.set(http::field::allow, "GET");
      response_.body() = "only GET\n";
    } else {
      response_.result(http::status::ok);
      response_.set(http::field::content_type, kContentType);
      response_.body() = render_();
    }
    response_.prepare_payload();
    stream_.expires_after(kClientTimeout);
    http::async_write(stream_, response_,
                      [self = shared_from_this()](beast::error_code ec, size_t) {
                        if (ec || !self->response_.keep_alive()) {
                          beast::error_code ignored;
                          self->stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
                          return;
                        }
                        self->Read();
                      });
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_{kMaxHeaderBytes + kMaxBodyBytes};
  std::optional<http::request_parser<http::string_body>> parser_;
  http::response<http::string_body> response_;
  const std::function<std::string()>& render_;
  std::atomic<int>& clients_;
};

class MetricsServerImpl : public MetricsServer {
 public:
  MetricsServerImpl(std::function<std::string()> render, replicator::LogFn log)
      : render_(std::move(render)), log_(std::move(log)) {}

  ~MetricsServerImpl() override {
    ioc_.stop();
    if (thread_.joinable()) thread_.join();
  }

  absl::Status Listen(const switchover::Endpoint& e) {
    beast::error_code ec;
    auto address = asio::ip::make_address(e.host, ec);
    if (ec) return absl::InvalidArgumentError(absl::StrCat("'", e.host, "' is not an address"));
    tcp::endpoint at(address, e.port);
    if (acceptor_.open(at.protocol(), ec); ec) return Failed("open", ec);
    acceptor_.set_option(asio::socket_base::reuse_address(true), ec);
    if (acceptor_.bind(at, ec); ec) return Failed(absl::StrCat("bind ", e.host, ":", e.port), ec);
    if (acceptor_.listen(asio::socket_base::max_listen_connections, ec); ec) {
      return Failed("listen", ec);
    }
    port_ = acceptor_.local_endpoint().port();
    Accept();
    thread_ = std::thread([this] { ioc_.run(); });
    return absl::OkStatus();
  }

  uint16_t port() const override { return port_; }

 private:
  static absl::Status Failed(const std::string& what, const beast::error_code& ec) {
    return absl::UnavailableError(absl::StrCat("metrics: cannot ", what, ": ", ec.message()));
  }

  void Accept() {
    acceptor_.async_accept([this](beast::error_code ec, tcp::socket socket) {
      if (ec == asio::error::operation_aborted) return;
      if (ec) {
        // Out of descriptors, most likely: say so once, and try again shortly rather than spin.
        if (!accept_failed_ && log_) log_(absl::StrCat("metrics: accept failed: ", ec.message()));
        accept_failed_ = true;
        retry_.expires_after(std::chrono::milliseconds(100));
        retry_.async_wait([this](beast::error_code e) {
          if (!e) Accept();
        });
        return;
      }
      accept_failed_ = false;
      if (clients_ < kMaxClients) {
        clients_++;
        std::make_shared<ScrapeConnection>(std::move(socket), render_, clients_)->Read();
      }  // else: closed at once; the scraper tries again at its next interval
      Accept();
    });
  }

  // Before the io_context: the clients it still holds when it is destroyed use these.
  std::function<std::string()> render_;
  std::atomic<int> clients_{0};
  replicator::LogFn log_;
  asio::io_context ioc_;
  tcp::acceptor acceptor_{ioc_};
  asio::steady_timer retry_{ioc_};
  bool accept_failed_ = false;
  uint16_t port_ = 0;
  std::thread thread_;
};

}  // namespace

absl::Status CheckMetricsListen(const std::string& listen) {
  auto e = switchover::ParseEndpoint(listen);
  beast::error_code ec;
  if (e.ok()) asio::ip::make_address(e->host, ec);
  if (!e.ok() || ec || e->port == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "'", listen.substr(0, 64), "' is not ADDR:PORT (a numeric address, a port of 1 to 65535)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(
    const std::string& listen, std::function<std::string()> render, replicator::LogFn log) {
  auto e = switchover::ParseEndpoint(listen);
  if (!e.ok()) return e.status();
  auto server = std::make_unique<MetricsServerImpl>(std::move(render), log);
  if (auto s = server->Listen(*e); !s.ok()) return s;
  if (log)
    log(absl::StrFormat("metrics on http://%s:%d/metrics", listen.substr(0, listen.rfind(':')),
                        server->port()));
  return server;
}

std::string NodeMetrics(const pb::StatusReply& r, const switchover::Node::Status& n) {
  using E = Exposition;
  Exposition m;
  m.Gauge("romulus_node_info",
          "This host: the VM, its role (primary, mirror or idle), the platform that runs (or "
          "would run) the VM, and how replication frames are protected",
          1,
          absl::StrCat(E::L("vm_id", r.vm_id()), ",", E::L("role", r.role()), ",",
                       E::L("platform", r.platform()), ",", E::L("protection", r.protection())));
  auto [is_protected, why] = Protection(r, n);
  m.Gauge("romulus_protected",
          "1 while the VM's committed state is held by a mirror; the reason says why (not)",
          is_protected ? 1 : 0, E::L("reason", why));
  m.Gauge("romulus_peer_connected", "1 while a replication connection to the peer is up",
          r.peer_connected() ? 1 : 0);
  m.Counter("romulus_epochs_total",
            "Checkpoints taken (primary) or committed (mirror) in this replication session",
            static_cast<double>(r.epochs()));
  if (n.primary) {
    m.Counter("romulus_epochs_committed_total",
              "Checkpoints the mirror acknowledged as committed in this replication session",
              static_cast<double>(n.primary->acked));
  }
  m.Gauge("romulus_committed_epoch", "The last committed epoch (-1: none)",
          static_cast<double>(r.committed_epoch()));
  if (r.role() == "primary") {  // the VM's outputs and checkpoints are the primary's
    m.Gauge("romulus_replica_lag_epochs", "Checkpoints taken but not yet acknowledged",
            static_cast<double>(r.lag_epochs()));
    m.Gauge("romulus_held_outputs", "Outputs held until the epoch that produced them commits",
            static_cast<double>(r.held_outputs()));
    m.Counter("romulus_resyncs_total", "Initial synchronisations begun (one per connection)",
              static_cast<double>(r.resyncs()));
  }
  m.Counter("romulus_replication_bytes_total",
            "Replication bytes sent (primary) or received (mirror) on the current connection",
            static_cast<double>(r.bytes()));
  m.Counter("romulus_rejected_connections_total",
            "Connections dropped for a bad frame, key or checkpoint",
            static_cast<double>(r.rejected()));
  if (r.role() == "primary") {
    m.Gauge("romulus_unprotected_seconds", "For how long no mirror has committed (0: protected)",
            r.unprotected_s());
    m.Gauge("romulus_failed_connections",
            "Connections to the mirror that failed since one last committed",
            r.failed_connections());
  }
  const pb::SyncStatus* sync = r.has_sync()        ? &r.sync()
                               : r.has_last_sync() ? &r.last_sync()
                                                   : nullptr;
  m.Gauge("romulus_sync_in_progress", "1 while an initial synchronisation runs",
          r.has_sync() ? 1 : 0);
  if (sync) {
    m.Gauge("romulus_sync_done_bytes",
            "Memory and disk bytes the current (or last) synchronisation has sent",
            static_cast<double>(sync->done_bytes()));
    m.Gauge("romulus_sync_total_bytes",
            "Memory and disk bytes the current (or last) synchronisation has to send",
            static_cast<double>(sync->total_bytes()));
    m.Gauge("romulus_sync_round", "Pre-copy round of the current (or last) synchronisation",
            sync->round());
    m.Gauge("romulus_sync_duration_seconds",
            "Since the current synchronisation began; the last one's until it committed",
            sync->seconds());
  }
  if (n.primary) {
    const replicator::Primary::Stats& p = *n.primary;
    m.Hist("romulus_checkpoint_pause_seconds", "VM paused for a checkpoint", p.pause_seconds);
    m.Hist("romulus_checkpoint_commit_seconds",
           "VM paused for a checkpoint to the mirror's acknowledgement that it committed it",
           p.commit_seconds);
    m.Hist("romulus_dirty_pages_per_epoch", "Pages in each incremental checkpoint",
           p.dirty_pages_per_epoch);
    m.Counter("romulus_dirty_pages_total", "Pages in the incremental checkpoints sent",
              static_cast<double>(p.dirty_pages));
    const std::string sent = "romulus_replication_sent_bytes_total";
    const std::string help =
        "Replication bytes by kind: checkpoint page contents sent as they are (pages) and "
        "LZ4-compressed (compressed), zero-page flags (zero_flags), references to content the "
        "mirror held sent instead of pages (references), disk writes (disk), and what "
        "initial synchronisations put on the wire (resync)";
    m.Counter(sent, help, static_cast<double>(p.wire.pages), E::L("kind", "pages"));
    m.Counter(sent, help, static_cast<double>(p.wire.compressed), E::L("kind", "compressed"));
    m.Counter(sent, help, static_cast<double>(p.wire.zero_flags), E::L("kind", "zero_flags"));
    m.Counter(sent, help, static_cast<double>(p.wire.references), E::L("kind", "references"));
    m.Counter(sent, help, static_cast<double>(p.wire.disk), E::L("kind", "disk"));
    m.Counter(sent, help, static_cast<double>(p.wire.resync), E::L("kind", "resync"));
  }
  if (r.paths_size() > 0) {
    m.Gauge("romulus_peer_alive", "1 while the peer was heard within the heartbeat timeout",
            r.peer_alive() ? 1 : 0);
    for (const pb::PathState& p : r.paths()) {
      m.Gauge("romulus_path_up", "1 while heartbeats arrive on this path", p.up() ? 1 : 0,
              E::L("path", p.name()));
    }
    for (const pb::PathState& p : r.paths()) {
      m.Gauge("romulus_path_loss_ratio", "Share of the peer's heartbeats lost on this path",
              p.loss(), E::L("path", p.name()));
    }
    for (const pb::PathState& p : r.paths()) {
      m.Gauge("romulus_path_timeout_seconds",
              "Silence after which this path is down now (raised while heartbeats come late)",
              p.timeout_ms() / 1000.0, E::L("path", p.name()));
    }
    for (const pb::PathState& p : r.paths()) {
      if (p.rtt_ms() < 0) continue;  // not measured yet
      m.Gauge("romulus_path_rtt_seconds", "Smoothed heartbeat round trip on this path",
              p.rtt_ms() / 1000, E::L("path", p.name()));
    }
  }
  // Parallel paths: each path of the replication connection.
  for (const pb::ReplicationPathState& p : r.replication_paths()) {
    m.Gauge("romulus_replication_path_up", "1 while this path of the replication connection works",
            p.up() ? 1 : 0, E::L("peer", p.peer()));
  }
  for (const pb::ReplicationPathState& p : r.replication_paths()) {
    m.Counter("romulus_replication_path_sent_bytes_total",
              "Bytes sent on this path of the current replication connection",
              static_cast<double>(p.bytes_sent()), E::L("peer", p.peer()));
  }
  if (!r.witness().empty()) {
    m.Gauge("romulus_lease_held", "1 while this host holds the witness's lease for the VM",
            r.lease_held() ? 1 : 0);
  }
  m.Hist("romulus_promotion_duration_seconds",
         "Promotions of this host: asked to the VM resumed here as the primary",
         n.promotion_seconds);
  m.Hist("romulus_migration_downtime_seconds",
         "Planned migrations away from this host: VM paused here to resumed at the peer",
         n.migration_downtime_seconds);
  return std::move(m).text();
}

std::string WitnessMetrics(const switchover::Witness& w) {
  Exposition m;
  m.Gauge("romulus_node_info", "This host: a witness", 1, Exposition::L("role", "witness"));
  m.Gauge("romulus_witness_leases", "Leases granted and not yet expired",
          static_cast<double>(w.holders().size()));
  m.Counter("romulus_witness_rejected_datagrams_total",
            "Datagrams refused: bad MAC, version, nonce or size",
            static_cast<double>(w.rejected()));
  return std::move(m).text();
}

}  // namespace romulus::cli
