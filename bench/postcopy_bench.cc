// Pre-copy against post-copy migration of a guest whose memory is all in use, over a link capped
// by a relay (loopback is faster than any network a VM moves over): downtime (the VM paused at
// the source -> it runs at the destination), total time (the pause, or the start of pre-copy ->
// every page is at the destination), bytes, and post-copy's demand faults. Two guests: an
// idle-ish one, and one that dirties memory faster than the link carries it, which pre-copy
// cannot converge on. The guest is a software VM (tests/soft_vm.h) writing through the monitor's
// mapping, which post-copy's missing pages catch as they catch a vCPU's. Baseline in the same
// run: the link's own rate, a raw stream through the same relay.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

// clang-format off
#include <utility>
#include <boost/asio.hpp>
// clang-format on
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_util.h"
#include "replicator/channel.h"
#include "replicator/postcopy.h"
#include "replicator/replicator.h"
#include "tests/soft_vm.h"
#include "vmm/missing_pages.h"

namespace {

using romulus::bench::Clock;
using romulus::bench::WaitFor;
using romulus::testing::SoftVm;
namespace cp = romulus::checkpoint;
namespace rp = romulus::replicator;
namespace vmm = romulus::vmm;
namespace asio = boost::asio;

const char kKey[] = "postcopy-bench-key-0123456789";
constexpr uint32_t kHybridRounds = 2;
constexpr uint64_t kDisk = 64ull << 20;

[[noreturn]] void Die(const std::string& what) {
  romulus::bench::Die("romulus_postcopy_bench", what);
}

double MsSince(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

// A TCP relay on loopback whose connections share one link of `bytes_per_second` towards the
// target (the other direction is not capped: it carries acknowledgements and requests).
class CappedLink {
 public:
  CappedLink(uint16_t target, double bytes_per_second)
      : target_(target), rate_(bytes_per_second), listener_(::socket(AF_INET, SOCK_STREAM, 0)) {
    sockaddr_in a = Loopback(0);
    socklen_t len = sizeof(a);
    if (listener_ < 0 || ::bind(listener_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
        ::getsockname(listener_, reinterpret_cast<sockaddr*>(&a), &len) != 0 ||
        ::listen(listener_, 8) != 0) {
      Die("cannot set up the relay");
    }
    port_ = ntohs(a.sin_port);
    next_ = Clock::now();
    accept_ = std::thread([this] {
      while (true) {
        int in = ::accept(listener_, nullptr, nullptr);
        if (in < 0) return;
        int out = ::socket(AF_INET, SOCK_STREAM, 0);
        sockaddr_in t = Loopback(target_);
        if (out < 0 || ::connect(out, reinterpret_cast<sockaddr*>(&t), sizeof(t)) != 0) {
          ::close(in);
          if (out >= 0) ::close(out);
          continue;
        }
        std::lock_guard<std::mutex> lock(mu_);
        fds_.push_back(in);
        fds_.push_back(out);
        pumps_.emplace_back([this, in, out] { Pump(in, out, true); });
        pumps_.emplace_back([this, in, out] { Pump(out, in, false); });
      }
    });
  }
  ~CappedLink() {
    ::shutdown(listener_, SHUT_RDWR);
    accept_.join();
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (int fd : fds_) ::shutdown(fd, SHUT_RDWR);
    }
    for (auto& t : pumps_) t.join();
    for (int fd : fds_) ::close(fd);
    ::close(listener_);
  }
  uint16_t port() const { return port_; }

 private:
  static sockaddr_in Loopback(uint16_t port) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(port);
    return a;
  }
  // Copies `from` to `to`; towards the target, each block waits for its turn on the link.
  void Pump(int from, int to, bool capped) {
    std::vector<char> buf(64 << 10);
    while (true) {
      ssize_t n = ::read(from, buf.data(), buf.size());
      if (n <= 0) break;
      if (capped) {
        Clock::time_point at;
        {
          std::lock_guard<std::mutex> lock(link_mu_);
          next_ = std::max(next_, Clock::now());
          at = next_;
          next_ += std::chrono::duration_cast<Clock::duration>(
              std::chrono::duration<double>(static_cast<double>(n) / rate_));
        }
        std::this_thread::sleep_until(at);  // the link's pace, not a wait for anything
      }
      for (ssize_t done = 0; done < n;) {
        ssize_t w = ::write(to, buf.data() + done, static_cast<size_t>(n - done));
        if (w <= 0) return;
        done += w;
      }
    }
    ::shutdown(to, SHUT_WR);
  }

  uint16_t target_;
  double rate_;
  int listener_;
  uint16_t port_ = 0;
  std::thread accept_;
  std::mutex mu_;
  std::vector<int> fds_;
  std::vector<std::thread> pumps_;
  std::mutex link_mu_;
  Clock::time_point next_;  // when the link is free again
};

// MB/s of a raw stream through a capped link: the baseline.
double RawMBps(double bytes_per_second, uint64_t bytes) {
  int sink_listener = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  if (::bind(sink_listener, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
      ::getsockname(sink_listener, reinterpret_cast<sockaddr*>(&a), &len) != 0 ||
      ::listen(sink_listener, 1) != 0) {
    Die("cannot set up the raw stream");
  }
  std::thread sink([sink_listener] {
    int c = ::accept(sink_listener, nullptr, nullptr);
    std::vector<char> buf(1 << 20);
    while (c >= 0 && ::read(c, buf.data(), buf.size()) > 0) {
    }
    if (c >= 0) ::close(c);
  });
  double mbps = 0;
  {
    CappedLink link(ntohs(a.sin_port), bytes_per_second);
    int out = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in l{};
    l.sin_family = AF_INET;
    l.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    l.sin_port = htons(link.port());
    if (::connect(out, reinterpret_cast<sockaddr*>(&l), sizeof(l)) != 0) Die("raw connect");
    std::vector<char> buf(1 << 20, 'x');
    auto t0 = Clock::now();
    for (uint64_t sent = 0; sent < bytes;) {
      ssize_t n = ::write(out, buf.data(), std::min<uint64_t>(buf.size(), bytes - sent));
      if (n <= 0) break;
      sent += static_cast<uint64_t>(n);
    }
    ::close(out);
    sink.join();
    mbps = static_cast<double>(bytes) / (MsSince(t0) / 1000) / 1e6;
  }
  ::close(sink_listener);
  return mbps;
}

struct Result {
  bool converged = true;  // pre-copy: in sync and handed over within the budget
  double downtime_ms = 0, total_ms = 0, mib = 0;
  uint64_t faults = 0;
  double fault_p50_ms = 0, fault_p99_ms = 0;
};

class Bench {
 public:
  Bench(const std::string& dir, SoftVm::Options options, double link_bytes_per_second)
      : dir_(dir),
        options_(std::move(options)),
        rate_(link_bytes_per_second),
        // Four times what the link needs for all of memory, and half a minute more.
        budget_s_(4 * static_cast<double>(options_.memory_bytes) / rate_ + 30) {}

  // A guest that ran for a second: every page written once, its working set since.
  std::unique_ptr<SoftVm> Guest(const std::string& disk) {
    auto vm = SoftVm::Create(disk, options_);
    if (!vm) Die("cannot create the VM");
    vm->FillWithNoise();
    (void)vm->Start();                                     // a software VM always starts
    std::this_thread::sleep_for(std::chrono::seconds(1));  // the workload runs a while
    return vm;
  }

  Result PreCopy() {
    auto vm = Guest(dir_ + "/pre-a.img");
    vmm::OutputGate gate;
    auto replica = cp::ReplicaStore::Create(options_.memory_bytes, dir_ + "/pre-b.img", kDisk);
    if (!replica.ok()) Die(std::string(replica.status().message()));
    std::unique_ptr<SoftVm> resumed;
    Clock::time_point runs_at;
    rp::Mirror::Options mo;
    mo.identity = {"bench", options_.memory_bytes, kDisk};
    mo.key = kKey;
    std::unique_ptr<rp::Mirror> mirror;
    mo.on_handover = [&](uint64_t, const std::string&) -> absl::Status {
      absl::StatusOr<cp::ReplicaStore::Committed> c;
      mirror->WithReplica([&](cp::ReplicaStore& r) { c = r.TakeCommitted(); });
      if (!c.ok()) return c.status();
      resumed = SoftVm::Adopt(std::move(c->memory), c->disk_path, options_);
      if (!resumed) return absl::InternalError("cannot adopt the replica");
      (void)resumed->Start();
      runs_at = Clock::now();
      return absl::OkStatus();
    };
    auto m = rp::Mirror::Start(**replica, std::move(mo));
    if (!m.ok()) Die(std::string(m.status().message()));
    mirror = std::move(*m);
    CappedLink link(mirror->port(), rate_);
    auto engine = std::make_unique<cp::EpochEngine>(*vm, gate, cp::EpochEngine::Options{});
    rp::Primary::Options po;
    po.identity = {"bench", options_.memory_bytes, kDisk};
    po.key = kKey;
    po.mirror_port = link.port();
    auto t0 = Clock::now();
    auto p = rp::Primary::Start(*engine, gate, std::move(po));
    if (!p.ok()) Die(std::string(p.status().message()));
    // Bounded: a guest that outruns the link may never be in sync.
    Result r;
    if (!WaitFor([&] { return (*p)->stats().acked >= 1; }, budget_s_)) {
      r.converged = false;
    } else {
      auto report = (*p)->HandOver(
          std::chrono::milliseconds(static_cast<int64_t>(budget_s_ * 1000)), nullptr, "benchmark");
      if (!report.ok()) {
        r.converged = false;
      } else {
        r.downtime_ms = report->downtime_ms;
      }
    }
    r.total_ms = MsSince(t0);
    r.mib = static_cast<double>((*p)->stats().bytes_sent) / (1 << 20);
    p->reset();
    engine.reset();
    resumed.reset();
    mirror.reset();
    return r;
  }

  // Post-copy, after `precopy_rounds` pre-copy rounds while the guest runs (the hybrid). Total
  // time counts from the first byte sent: the rounds are part of the move.
  Result PostCopy(uint32_t precopy_rounds) {
    auto vm = Guest(dir_ + "/post-a.img");

    asio::io_context io;
    asio::ip::tcp::acceptor acceptor(io, {asio::ip::make_address("127.0.0.1"), 0});
    CappedLink link(acceptor.local_endpoint().port(), rate_);
    rp::Identity id{"bench", options_.memory_bytes, kDisk};
    std::unique_ptr<rp::Channel> dest_main, dest_demand, src_main, src_demand;
    std::thread accept([&] {
      for (auto* ch : {&dest_main, &dest_demand}) {
        asio::ip::tcp::socket s(io);
        boost::system::error_code ec;
        acceptor.accept(s, ec);
        if (ec) return;
        uint64_t session;
        auto c = rp::Channel::Accept(std::move(s), {id, kKey}, std::chrono::seconds(30), &session);
        if (c.ok()) *ch = std::move(*c);
      }
    });
    for (auto* ch : {&src_main, &src_demand}) {
      auto c = rp::Channel::Connect(io, "127.0.0.1", link.port(), {id, kKey}, 1,
                                    std::chrono::seconds(30));
      if (!c.ok()) Die(std::string(c.status().message()));
      *ch = std::move(*c);
    }
    accept.join();
    if (!dest_main || !dest_demand) Die("the destination did not accept");
    // Connected before the pause, as a migration would be.
    Clock::time_point started = Clock::now();
    std::atomic<int64_t> paused_ns{0};  // set by the source's thread as the VM pauses for good
    rp::PostcopySource source({});
    absl::StatusOr<rp::PostcopySource::Report> report;
    std::thread src([&] {
      absl::Status s =
          precopy_rounds > 0 ? source.Precopy(*vm, *src_main, precopy_rounds) : vm->Pause();
      if (!s.ok()) Die(std::string(s.message()));
      paused_ns = Clock::now().time_since_epoch().count();
      report = source.Run(*vm, *src_main, *src_demand);
    });

    std::unique_ptr<vmm::MissingPages> pages;
    std::unique_ptr<SoftVm> resumed;
    Clock::time_point runs_at;
    std::string disk = dir_ + "/post-b.img";
    rp::PostcopyDestination dest({.identity = id, .peer_timeout = std::chrono::seconds(30)});
    absl::Status received = dest.Run(
        *dest_main, *dest_demand,
        [&](std::unique_ptr<vmm::GuestMemory> memory, const romulus::pb::VmSnapshot&,
            vmm::DirtyBitmap missing, vmm::DirtyBitmap missing_chunks,
            std::function<void(uint64_t)> on_page,
            std::function<void(uint64_t)> on_chunk) -> absl::StatusOr<rp::PostcopyTarget> {
          auto mp = vmm::MissingPages::Create(*memory, missing, {.on_fault = std::move(on_page)});
          if (!mp.ok()) return mp.status();
          pages = std::move(*mp);
          if (auto s = vmm::BlockDevice::CreateImage(disk, kDisk); !s.ok()) return s;
          resumed = SoftVm::Adopt(std::move(memory), disk, options_);
          if (!resumed) return absl::InternalError("cannot adopt the memory");
          if (auto s = resumed->disk().ExpectChunks(std::move(missing_chunks), std::move(on_chunk),
                                                    std::chrono::seconds(30));
              !s.ok()) {
            return s;
          }
          (void)resumed->Start();
          runs_at = Clock::now();
          return rp::PostcopyTarget{pages.get(), &resumed->disk(),
                                    [](const std::string& why) { Die(why); }};
        });
    src.join();
    if (!received.ok()) Die(std::string(received.message()));
    if (!report.ok()) Die(std::string(report.status().message()));
    Result r;
    Clock::time_point paused{Clock::duration(paused_ns.load())};
    r.downtime_ms = std::chrono::duration<double, std::milli>(runs_at - paused).count();
    r.total_ms = MsSince(started);
    r.mib =
        static_cast<double>(report->progress.bytes + report->progress.precopy_bytes) / (1 << 20);
    auto faults = pages->stats();
    r.faults = faults.faults;
    r.fault_p50_ms = std::chrono::duration<double, std::milli>(faults.wait_p50).count();
    r.fault_p99_ms = std::chrono::duration<double, std::milli>(faults.wait_p99).count();
    auto memory = resumed->TakeMemory();  // the writer stops before the pages go
    pages.reset();
    return r;
  }

 private:
  std::string dir_;
  SoftVm::Options options_;
  double rate_;
  double budget_s_;  // for pre-copy to be in sync, and again for its hand-over
};

}  // namespace

int main(int argc, char** argv) {
  uint64_t memory_mib = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1024;
  double link_mbit = argc > 2 ? std::atof(argv[2]) : 1000;
  if (memory_mib < 64 || memory_mib > 4096 || link_mbit < 10 || link_mbit > 100000) {
    Die("usage: romulus_postcopy_bench [MEMORY_MIB 64-4096 (1024)] [LINK_MBIT 10-100000 (1000)]");
  }
  char tmpl[] = "/tmp/romulus-postcopy-bench-XXXXXX";
  if (!::mkdtemp(tmpl)) Die("cannot create a temporary directory");
  std::string dir = tmpl;
  double rate = link_mbit * 1e6 / 8;
  std::printf(
      "romulus_postcopy_bench: %s; the link: %.0f Mbit/s through a relay, a raw stream through "
      "it carries %.1f MB/s\n",
      romulus::bench::MachineLoad().c_str(), link_mbit, RawMBps(rate, 64ull << 20));
  struct Workload {
    const char* name;
    uint64_t working_set, writes_per_ms;
  };
  uint64_t pages = (memory_mib << 20) / 4096;
  for (Workload w : {Workload{"idle-ish", pages / 16, 1},
                     Workload{"dirtying faster than the link", pages / 4, 400}}) {
    SoftVm::Options o;
    o.memory_bytes = memory_mib << 20;
    o.disk_bytes = kDisk;
    o.working_set_pages = w.working_set;
    o.writes_per_ms = w.writes_per_ms;
    Bench bench(dir, o, rate);
    Result pre = bench.PreCopy();
    Result post = bench.PostCopy(0);
    Result hybrid = bench.PostCopy(kHybridRounds);
    std::printf(
        "%lu MiB guest, all of it written, %s (%lu random pages/ms over a %lu MiB working set):\n",
        static_cast<unsigned long>(memory_mib), w.name, static_cast<unsigned long>(w.writes_per_ms),
        static_cast<unsigned long>(w.working_set * 4096 >> 20));
    if (pre.converged) {
      std::printf("  pre-copy:  downtime %8.1f ms, total %7.1f s, %7.1f MiB on the link\n",
                  pre.downtime_ms, pre.total_ms / 1000, pre.mib);
    } else {
      std::printf(
          "  pre-copy:  not handed over after %.1f s (%.1f MiB on the link): it does not "
          "converge\n",
          pre.total_ms / 1000, pre.mib);
    }
    std::printf(
        "  post-copy: downtime %8.1f ms, total %7.1f s, %7.1f MiB on the link; %lu pages fetched "
        "on demand, each waited p50 %.2f ms, p99 %.2f ms\n",
        post.downtime_ms, post.total_ms / 1000, post.mib, static_cast<unsigned long>(post.faults),
        post.fault_p50_ms, post.fault_p99_ms);
    std::printf(
        "  hybrid (%u pre-copy rounds, then post-copy): downtime %8.1f ms, total %7.1f s, %7.1f "
        "MiB on the link; %lu pages fetched on demand, each waited p50 %.2f ms, p99 %.2f ms\n",
        kHybridRounds, hybrid.downtime_ms, hybrid.total_ms / 1000, hybrid.mib,
        static_cast<unsigned long>(hybrid.faults), hybrid.fault_p50_ms, hybrid.fault_p99_ms);
    for (auto [name, r] : {std::pair{"post-copy", post}, std::pair{"hybrid", hybrid}}) {
      if (pre.converged) {
        std::printf("  %s / pre-copy: downtime %.3fx, total %.2fx\n", name,
                    romulus::bench::Ratio(r.downtime_ms, pre.downtime_ms),
                    romulus::bench::Ratio(r.total_ms, pre.total_ms));
      } else {
        std::printf("  %s / pre-copy: total %.2fx of the time pre-copy ran without finishing\n",
                    name, romulus::bench::Ratio(r.total_ms, pre.total_ms));
      }
    }
    std::fflush(stdout);
  }
  for (const char* f : {"/pre-a.img", "/pre-b.img", "/post-a.img", "/post-b.img"}) {
    std::remove((dir + f).c_str());
  }
  std::remove(dir.c_str());
  return 0;
}
