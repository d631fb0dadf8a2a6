// romulus proxy: the clients' one address for a VM's ledger, in front of its hosts.
#include <signal.h>

#include <cstdio>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "cli/commands.h"
#include "cli/config.h"
#include "cli/host.h"
#include "cli/proxy.h"
#include "cli/service_manager.h"
#include "cli/signals.h"

namespace romulus::cli {

int ProxyCommand(int argc, char** argv) {
  std::string config;
  if (int rc = ConfigOnly(
          "romulus proxy --config FILE",
          "Gives a VM's ledger clients one address (listen:port in FILE) in front of its hosts\n"
          "(each host's ledger HOST:PORT). The primary is the host whose ledger port accepts a\n"
          "connection (a mirror's refuses). Each request goes to it, one at a time per client\n"
          "connection; when it fails (refused, reset, garbage, or no answer within\n"
          "answer_timeout_ms) the proxy holds new and unanswered requests, tries the hosts\n"
          "every probe_interval_ms, and sends them to the first that accepts, with the same\n"
          "request ids, which the ledger answers exactly once. A request not answered within\n"
          "hold_ms gets status 10 (unavailable) and a text saying whether it may have been\n"
          "applied. A frame the proxy cannot read gets its earlier requests answered, then one\n"
          "error frame (status 11), and the connection closes. Fields: romulus help config.",
          argc, argv, &config);
      rc >= 0) {
    return rc;
  }
  auto c = LoadProxyConfig(config);
  if (!c.ok()) return Fail("proxy", c.status());
  ProxyOptions o = ProxyOptionsFrom(*c);
  o.log = Logger("proxy");
  sigset_t signals = TakeSignals();
  auto proxy = Proxy::Start(o);
  if (!proxy.ok()) return Fail("proxy", proxy.status());
  std::printf("romulus proxy: hosts %s; hold %u ms; ledger listening on %s:%d\n",
              absl::StrJoin(o.hosts, ", ").c_str(), c->hold_ms(), o.listen.c_str(),
              (*proxy)->port());
  std::fflush(stdout);
  ServiceManager systemd;
  auto tick = systemd.Tick(std::chrono::milliseconds(1000));
  for (;;) {
    Proxy::Stats s = (*proxy)->stats();
    systemd.Status(absl::StrFormat(
        "primary %s; %d requests, %d answered, %d resent, %d unavailable",
        s.primary >= 0 ? o.hosts[static_cast<size_t>(s.primary)] : std::string("unknown"),
        s.requests, s.answered, s.resent, s.expired));
    systemd.Ready();
    systemd.Watchdog(ServiceManager::Clock::now());
    int sig = WaitSignal(signals, tick);
    if (sig == SIGINT || sig == SIGTERM) break;
  }
  systemd.Stopping();
  Proxy::Stats s = (*proxy)->stats();
  std::printf(
      "romulus proxy: stopped: %lu requests, %lu answered, %lu resent, %lu unavailable, %lu "
      "clients refused for malformed frames\n",
      static_cast<unsigned long>(s.requests), static_cast<unsigned long>(s.answered),
      static_cast<unsigned long>(s.resent), static_cast<unsigned long>(s.expired),
      static_cast<unsigned long>(s.malformed));
  return 0;
}

}  // namespace romulus::cli
