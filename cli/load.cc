#include "cli/load.h"

#include <algorithm>
#include <chrono>
#include <mutex>
#include <optional>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "cli/ledger_client.h"
#include "guest/abi.h"
#include "proto/romulus.pb.h"

namespace romulus::cli {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int64_t kInitialDeposit = 1000;
constexpr size_t kMaxViolations = 20;

// What the run has learned; shared by the client threads.
struct Shared {
  std::mutex mu;
  int64_t deposited = 0;                                  // acknowledged deposits
  std::map<uint32_t, std::pair<uint64_t, int64_t>> last;  // account -> (seq, balance)
  std::map<uint64_t, uint64_t> write_seqs;                // seq -> client, for uniqueness
  std::vector<double> latencies_us;
  LoadReport report;

  void Violation(std::string v) {
    if (report.violations.size() < kMaxViolations) report.violations.push_back(std::move(v));
  }
  // Records a successful write's resulting balances and its unique sequence number.
  void Saw(const pb::LedgerRequest& q, const pb::LedgerResponse& r, uint64_t client) {
    auto note = [&](uint32_t account, int64_t balance) {
      auto& slot = last[account];
      if (r.seq() > slot.first) slot = {r.seq(), balance};
    };
    if (q.op() == pb::DEPOSIT) {
      deposited += q.amount();
      note(r.account(), r.balance());
    } else if (q.op() == pb::TRANSFER) {
      note(q.account(), r.balance());
      note(q.to_account(), r.to_balance());
    } else if (q.op() == pb::OPEN) {
      note(r.account(), r.balance());
    }
    auto [it, fresh] = write_seqs.emplace(r.seq(), client);
    if (!fresh) {
      Violation(absl::StrCat("sequence number ", r.seq(), " was given to two writes (clients ",
                             it->second, " and ", client, ")"));
    }
  }
};

bool SameResponse(const pb::LedgerResponse& a, const pb::LedgerResponse& b) {
  return a.status() == b.status() && a.account() == b.account() && a.balance() == b.balance() &&
         a.to_balance() == b.to_balance() && a.seq() == b.seq() && a.request_id() == b.request_id();
}

// One client: a connection that reconnects and resends the same request id when it fails.
class LoadClient {
 public:
  LoadClient(const LoadOptions& o, uint64_t id) : o_(o), id_(id) {}

  std::optional<pb::LedgerResponse> Call(pb::LedgerRequest q) {
    q.set_client_id(id_);
    for (uint64_t attempt = 0; attempt < o_.attempts; attempt++) {
      if (!conn_) {
        bool standby = on_standby_;
        auto c = LedgerClient::Connect(standby ? o_.standby_host : o_.host,
                                       standby ? o_.standby_port : o_.port,
                                       static_cast<int>(o_.timeout_ms));
        if (!c.ok()) {
          Failed();
          std::this_thread::sleep_for(std::chrono::milliseconds(50));  // back-off, not sync
          continue;
        }
        conn_.emplace(std::move(*c));
        if (attempt > 0) reconnects_++;
        if (standby != answered_on_standby_) switches_++;
        answered_on_standby_ = standby;
      }
      auto r = conn_->Call(q);
      if (r.ok() && r->request_id() == q.request_id() && r->status() == RML_ERR_UNAVAILABLE) {
        // The proxy's "no primary answered in time": the request may have been applied, and
        // only the same request id sent again tells its outcome (a write left unknown would
        // make every later balance unverifiable). Out of attempts, it is unresolved.
        unavailable_++;
        continue;
      }
      if (r.ok() && r->request_id() == q.request_id()) {
        if (answered_on_standby_ && !first_standby_answer_) first_standby_answer_ = Clock::now();
        return *r;
      }
      conn_.reset();
      Failed();
    }
    return std::nullopt;
  }
  uint64_t reconnects() const { return reconnects_; }
  uint64_t unavailable() const { return unavailable_; }
  uint64_t switches() const { return switches_; }
  std::optional<Clock::time_point> first_standby_answer() const { return first_standby_answer_; }

 private:
  const LoadOptions& o_;
  uint64_t id_;
  // The next attempt goes to the other address, if there is one.
  void Failed() {
    if (o_.standby_port != 0) on_standby_ = !on_standby_;
  }

  std::optional<LedgerClient> conn_;
  bool on_standby_ = false, answered_on_standby_ = false;
  uint64_t reconnects_ = 0, switches_ = 0, unavailable_ = 0;
  std::optional<Clock::time_point> first_standby_answer_;
};

void RunClient(const LoadOptions& o, uint64_t id, const std::vector<uint32_t>& accounts,
               Clock::time_point end, uint64_t seed, Shared& shared) {
  LoadClient client(o, id);
  std::mt19937_64 rng(seed);
  uint64_t request_id = 0, last_seq = 0;
  std::vector<double> lat;
  std::vector<LoadSample> samples;
  uint64_t samples_dropped = 0;
  const uint64_t max_samples = o.max_samples ? std::max<uint64_t>(1, o.max_samples / o.clients) : 0;
  std::map<uint32_t, uint64_t> statuses;
  uint64_t unresolved = 0, requests = 0, retries = 0;
  double per_client_rate =
      o.rate ? static_cast<double>(o.rate) / static_cast<double>(o.clients) : 0;
  auto next = Clock::now();
  while (Clock::now() < end) {
    if (per_client_rate > 0) {
      next += std::chrono::nanoseconds(static_cast<int64_t>(1e9 / per_client_rate));
      std::this_thread::sleep_until(next);  // pacing the offered load
    }
    pb::LedgerRequest q;
    q.set_request_id(++request_id);
    uint64_t roll = rng() % 100;
    uint32_t a = accounts[rng() % accounts.size()];
    if (roll < o.transfer_pct && accounts.size() > 1) {
      uint32_t b;
      do b = accounts[rng() % accounts.size()];
      while (b == a);
      q.set_op(pb::TRANSFER);
      q.set_account(a);
      q.set_to_account(b);
      q.set_amount(static_cast<int64_t>(1 + rng() % 100));
    } else if (roll < o.transfer_pct + o.deposit_pct) {
      q.set_op(pb::DEPOSIT);
      q.set_account(a);
      q.set_amount(static_cast<int64_t>(1 + rng() % 100));
    } else {
      q.set_op(pb::READ);
      q.set_account(a);
    }
    auto t0 = Clock::now();
    auto r = client.Call(q);
    auto t1 = Clock::now();
    if (!r) {
      unresolved++;
      continue;
    }
    requests++;
    lat.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    if (samples.size() < max_samples) {
      samples.push_back({t0, static_cast<float>(lat.back())});
    } else if (o.max_samples) {
      samples_dropped++;
    }
    statuses[r->status()]++;
    // The proxy's own answers (no primary answered in its hold time; a frame it could not read)
    // come from no ledger and carry no sequence number.
    bool from_ledger = r->status() != RML_ERR_UNAVAILABLE && r->status() != RML_ERR_MALFORMED;
    {
      std::lock_guard<std::mutex> lock(shared.mu);
      if (from_ledger && r->seq() < last_seq) {
        shared.Violation(
            absl::StrCat("client ", id, ": sequence went back from ", last_seq, " to ", r->seq()));
      }
      bool write = q.op() != pb::READ && r->status() == RML_OK;
      if (write && r->seq() <= last_seq) {
        shared.Violation(absl::StrCat("client ", id, ": write got seq ", r->seq(),
                                      " after having seen ", last_seq));
      }
      if (write) shared.Saw(q, *r, id);
    }
    if (from_ledger) last_seq = std::max(last_seq, r->seq());
    if (rng() % 100 < o.retry_pct) {
      auto again = client.Call(q);
      if (again) {
        retries++;
        bool again_from_ledger =
            again->status() != RML_ERR_UNAVAILABLE && again->status() != RML_ERR_MALFORMED;
        if (from_ledger && again_from_ledger && !SameResponse(*r, *again)) {
          std::lock_guard<std::mutex> lock(shared.mu);
          shared.Violation(absl::StrCat("client ", id, ": retry of request ", q.request_id(),
                                        " got a different answer (seq ", r->seq(), " vs ",
                                        again->seq(), ")"));
        }
      }
    }
  }
  std::lock_guard<std::mutex> lock(shared.mu);
  shared.latencies_us.insert(shared.latencies_us.end(), lat.begin(), lat.end());
  shared.report.samples.insert(shared.report.samples.end(), samples.begin(), samples.end());
  shared.report.samples_dropped += samples_dropped;
  for (auto [k, v] : statuses) shared.report.by_status[k] += v;
  if (client.unavailable() > 0)
    shared.report.by_status[RML_ERR_UNAVAILABLE] += client.unavailable();
  shared.report.unresolved += unresolved;
  shared.report.requests += requests;
  shared.report.retries_checked += retries;
  shared.report.reconnects += client.reconnects();
  shared.report.switches += client.switches();
  auto first = client.first_standby_answer();
  auto& earliest = shared.report.first_standby_answer;
  if (first && (!earliest || *first < *earliest)) earliest = first;
}

}  // namespace

absl::StatusOr<LoadReport> RunLoad(const LoadOptions& o) {
  if (o.clients == 0 || o.clients > 1024)
    return absl::InvalidArgumentError("clients must be 1-1024");
  if (o.accounts < 2 || o.accounts > 4096)
    return absl::InvalidArgumentError("accounts must be 2-4096");
  if (o.transfer_pct + o.deposit_pct + o.read_pct != 100) {
    return absl::InvalidArgumentError("the op mix must add up to 100");
  }
  uint64_t seed = o.seed ? o.seed : static_cast<uint64_t>(Clock::now().time_since_epoch().count());
  std::mt19937_64 rng(seed);
  uint64_t base = (rng() | 1) & ~0xffffull;  // client ids base+0 (setup) .. base+clients
  Shared shared;

  // Setup: open this run's accounts and give each an initial balance.
  LoadClient setup(o, base);
  std::vector<uint32_t> accounts;
  uint64_t rid = 0;
  for (uint64_t i = 0; i < o.accounts; i++) {
    pb::LedgerRequest q;
    q.set_request_id(++rid);
    q.set_op(pb::OPEN);
    auto r = setup.Call(q);
    if (!r)
      return absl::UnavailableError(absl::StrCat(
          "cannot reach the ledger at ", o.host, ":", o.port,
          o.standby_port ? absl::StrCat(" or ", o.standby_host, ":", o.standby_port) : ""));
    if (r->status() != RML_OK) {
      return absl::FailedPreconditionError(
          absl::StrCat("opening an account failed with status ", r->status()));
    }
    accounts.push_back(r->account());
    q.set_request_id(++rid);
    q.set_op(pb::DEPOSIT);
    q.set_account(r->account());
    q.set_amount(kInitialDeposit);
    auto d = setup.Call(q);
    if (!d || d->status() != RML_OK) return absl::UnavailableError("initial deposit failed");
    shared.Saw(q, *d, base);
  }

  if (o.running) o.running();
  auto start = Clock::now();
  auto end = start + std::chrono::duration_cast<Clock::duration>(
                         std::chrono::duration<double>(o.duration_s));
  std::vector<std::thread> threads;
  for (uint64_t c = 0; c < o.clients; c++) {
    threads.emplace_back(RunClient, std::cref(o), base + 1 + c, std::cref(accounts), end, rng(),
                         std::ref(shared));
  }
  for (auto& t : threads) t.join();
  LoadReport rep = std::move(shared.report);
  std::sort(rep.samples.begin(), rep.samples.end(),
            [](const LoadSample& a, const LoadSample& b) { return a.sent < b.sent; });
  rep.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  rep.ops_per_s = rep.seconds > 0 ? static_cast<double>(rep.requests) / rep.seconds : 0;
  rep.p50_us = Percentile(shared.latencies_us, 0.50);
  rep.p90_us = Percentile(shared.latencies_us, 0.90);
  rep.p99_us = Percentile(shared.latencies_us, 0.99);
  rep.max_us = shared.latencies_us.empty()
                   ? 0
                   : *std::max_element(shared.latencies_us.begin(), shared.latencies_us.end());

  // Final read: every balance must equal the newest acknowledged write that touched it, and
  // transfers must have preserved the sum of what was deposited.
  rep.expected_total = shared.deposited;
  bool all_read = true;
  for (uint32_t a : accounts) {
    pb::LedgerRequest q;
    q.set_request_id(++rid);
    q.set_op(pb::READ);
    q.set_account(a);
    auto r = setup.Call(q);
    if (!r) {
      // Every attempt went unanswered: the next accounts would each wait as long again (minutes
      // in all, longer than a test or an operator waits), and say nothing more.
      rep.violations.push_back(absl::StrCat("final read of account ", a, " unanswered after ",
                                            o.attempts,
                                            " attempts; the other accounts were not read"));
      all_read = false;
      break;
    }
    if (r->status() != RML_OK) {
      rep.violations.push_back(absl::StrCat("final read of account ", a, " failed"));
      all_read = false;
      continue;
    }
    rep.final_total += r->balance();
    rep.final_balances[a] = r->balance();
    rep.last_seq = std::max(rep.last_seq, r->seq());
    auto it = shared.last.find(a);
    if (rep.unresolved == 0 && it != shared.last.end() && it->second.second != r->balance()) {
      rep.lost_acknowledged++;
      rep.violations.push_back(absl::StrCat("account ", a, " reads ", r->balance(),
                                            " but the newest acknowledged write (seq ",
                                            it->second.first, ") left ", it->second.second));
    }
  }
  // A balance that could not be read is no evidence about the sum.
  if (rep.unresolved == 0 && all_read && rep.final_total != rep.expected_total) {
    rep.violations.push_back(
        absl::StrCat("balances sum to ", rep.final_total, ", deposits to ", rep.expected_total));
  }
  return rep;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  size_t i = std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())));
  std::nth_element(v.begin(), v.begin() + static_cast<long>(i), v.end());
  return v[i];
}

std::string FormatReport(const LoadReport& r) {
  std::string out = absl::StrFormat(
      "load: %d requests in %.1f s = %.0f ops/s; latency p50 %.0f us, p90 %.0f us, p99 %.0f us, "
      "max %.0f us\n",
      r.requests, r.seconds, r.ops_per_s, r.p50_us, r.p90_us, r.p99_us, r.max_us);
  std::vector<std::string> st;
  for (auto [k, v] : r.by_status) st.push_back(absl::StrCat(k, ":", v));
  absl::StrAppendFormat(&out,
                        "load: statuses {%s}; %d retries answered identically checked; %d "
                        "reconnects (%d to the other address); %d unresolved\n",
                        absl::StrJoin(st, " "), r.retries_checked, r.reconnects, r.switches,
                        r.unresolved);
  absl::StrAppendFormat(&out,
                        "load: balances sum %d, deposits %d, last seq %d; acknowledged writes "
                        "missing from %d accounts\n",
                        r.final_total, r.expected_total, r.last_seq, r.lost_acknowledged);
  if (r.ok()) {
    absl::StrAppend(&out,
                    "load: invariants hold (sum, newest-write balances, exactly-once "
                    "retries, increasing sequence numbers)\n");
  } else {
    for (const auto& v : r.violations) absl::StrAppend(&out, "load: VIOLATION: ", v, "\n");
    if (r.unresolved)
      absl::StrAppend(&out, "load: FAILED: ", r.unresolved, " requests unanswered\n");
  }
  return out;
}

std::string FormatReportJson(const LoadReport& r) {
  return absl::StrFormat(
      "{\"requests\":%d,\"seconds\":%.3f,\"ops_per_s\":%.1f,\"p50_us\":%.1f,\"p90_us\":%.1f,"
      "\"p99_us\":%.1f,\"max_us\":%.1f,\"unresolved\":%d,\"reconnects\":%d,\"switches\":%d,"
      "\"retries_checked\":%d,"
      "\"balances_sum\":%d,\"deposits\":%d,\"last_seq\":%d,\"lost_acknowledged\":%d,"
      "\"violations\":%d,\"ok\":%s}",
      r.requests, r.seconds, r.ops_per_s, r.p50_us, r.p90_us, r.p99_us, r.max_us, r.unresolved,
      r.reconnects, r.switches, r.retries_checked, r.final_total, r.expected_total, r.last_seq,
      r.lost_acknowledged, r.violations.size(), r.ok() ? "true" : "false");
}

}  // namespace romulus::cli
