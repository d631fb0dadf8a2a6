// romulus witness: the lease server on a third host that decides which of two hosts may act as
// the primary when they cannot hear each other.
#include <signal.h>

#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "cli/host.h"
#include "cli/metrics.h"
#include "cli/service_manager.h"
#include "cli/signals.h"
#include "replicator/replicator.h"
#include "switchover/datagram.h"
#include "switchover/switchover.h"

namespace romulus::cli {

int WitnessCommand(int argc, char** argv) {
  std::string listen = "0.0.0.0:7300", psk_file, metrics_listen, state;
  uint64_t lease_ms = 150;
  bool init = false;
  Args args("romulus witness --psk-file FILE --state FILE [options]",
            "Numbers the terms of each VM and grants its lease to one host at a time. A primary\n"
            "renews its lease; a mirror may promote only once the lease is its own, and only\n"
            "from a replica that no newer term superseded. Every new term is written to the\n"
            "state file (and fsynced) before it is granted, so that none is granted twice, also\n"
            "across restarts. After a restart the witness grants nothing for one lease period,\n"
            "so no lease it granted before is still believed held when it grants the next.");
  args.String("listen", &listen, "UDP ADDR:PORT to serve leases on (port 0: any free port)");
  args.String("psk-file", &psk_file, "file holding the pre-shared key of the hosts it serves");
  args.String("state", &state,
              "file holding the terms (required; the witness refuses to start without it unless "
              "--init)");
  args.Bool("init", &init,
            "first start: create the state file, which must not exist (a witness that lost it "
            "must not start afresh while any host runs one of its VMs)");
  args.Uint("lease-ms", &lease_ms, "how long a lease lasts unless renewed (10-60000)");
  args.String("metrics-listen", &metrics_listen,
              "TCP ADDR:PORT serving Prometheus metrics at /metrics (default: none)");
  if (int rc = args.Prologue(argc, argv); rc >= 0) return rc;
  if (psk_file.empty()) return args.UsageError("--psk-file is required");
  if (lease_ms < 10 || lease_ms > switchover::kMaxLeaseMs) {
    return args.UsageError(absl::StrCat("--lease-ms must be 10-", switchover::kMaxLeaseMs));
  }
  auto endpoint = switchover::ParseEndpoint(listen);
  if (!endpoint.ok())
    return args.UsageError(absl::StrCat("--listen: ", endpoint.status().message()));
  if (!metrics_listen.empty()) {
    if (auto s = CheckMetricsListen(metrics_listen); !s.ok()) {
      return args.UsageError(absl::StrCat("--metrics-listen: ", s.message()));
    }
  }
  if (state.empty()) return args.UsageError("--state is required");
  auto key = replicator::ReadKeyFile(psk_file);
  if (!key.ok()) return Fail("witness", key.status());
  sigset_t signals = TakeSignals();
  auto witness = switchover::Witness::Start({.key = *key,
                                             .listen = *endpoint,
                                             .lease = std::chrono::milliseconds(lease_ms),
                                             .state_path = state,
                                             .init = init,
                                             .log = Logger("witness")});
  if (!witness.ok()) return Fail("witness", witness.status());
  std::printf("romulus witness: serving leases of %lu ms on %s:%d (terms in %s)\n",
              static_cast<unsigned long>(lease_ms), endpoint->host.c_str(), (*witness)->port(),
              state.c_str());
  std::fflush(stdout);
  std::unique_ptr<MetricsServer> metrics;
  if (!metrics_listen.empty()) {
    auto m = MetricsServer::Start(
        metrics_listen, [&w = **witness] { return WitnessMetrics(w); }, Logger("witness"));
    if (!m.ok()) return Fail("witness", m.status());
    metrics = std::move(*m);
  }
  ServiceManager systemd;
  auto tick = systemd.Tick(std::chrono::milliseconds(1000));
  for (;;) {
    // Asking the witness what it holds waits for its lock: a witness that is stuck stops the
    // watchdog's pings along with the status.
    size_t held = (*witness)->holders().size();
    systemd.Status(
        absl::StrFormat("serving leases of %u ms on %s:%d; %u held, %u datagrams refused", lease_ms,
                        endpoint->host, (*witness)->port(), held, (*witness)->rejected()));
    systemd.Ready();
    systemd.Watchdog(ServiceManager::Clock::now());
    int sig = WaitSignal(signals, tick);
    if (sig == SIGINT || sig == SIGTERM) break;
  }
  systemd.Stopping();
  std::printf("romulus witness: stopped\n");
  return 0;
}

}  // namespace romulus::cli
