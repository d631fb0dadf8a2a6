#include "cli/host.h"

#include <cstdio>

#include "cli/args.h"

namespace romulus::cli {

int Fail(const char* who, const absl::Status& s) {
  std::fprintf(stderr, "romulus %s: %s\n", who, std::string(s.message()).c_str());
  return 1;
}

replicator::LogFn Logger(const char* who) {
  return [who](absl::string_view line) {
    std::fprintf(stdout, "romulus %s: %.*s\n", who, static_cast<int>(line.size()), line.data());
    std::fflush(stdout);
  };
}

int ConfigOnly(const char* who, const char* usage, const char* summary, int argc, char** argv,
               std::string* config) {
  Args args(usage, summary);
  args.String("config", config, "configuration file (protobuf text format)");
  if (auto s = args.Parse(argc, argv); !s.ok()) return Fail(who, s);
  if (args.help()) {
    std::fputs(args.Help().c_str(), stdout);
    return 0;
  }
  if (config->empty()) return Fail(who, absl::InvalidArgumentError("--config is required"));
  return -1;
}

absl::StatusOr<std::unique_ptr<ControlServer>> MaybeControl(const std::string& path,
                                                            ControlHandlers handlers) {
  if (path.empty()) return nullptr;
  return ControlServer::Start(path, std::move(handlers));
}

void Switchover::AddStatus(pb::StatusReply* r) const {
  if (heartbeat) {
    r->set_peer_alive(heartbeat->peer_alive());
    for (const switchover::PathStatus& p : heartbeat->paths()) {
      pb::PathState* s = r->add_paths();
      s->set_name(p.name);
      s->set_up(p.up);
      s->set_loss(p.loss);
      s->set_rtt_ms(p.rtt_ms);
    }
  }
  if (lease) {
    auto s = lease->status();
    r->set_witness(witness);
    r->set_lease_held(s.held);
    r->set_lease_holder(s.holder);
  }
}

std::function<void()> Switchover::TrafficHook() {
  if (!heartbeat) return nullptr;
  return [hb = heartbeat.get()] { hb->NoteTrafficFromPeer(); };
}

absl::StatusOr<Switchover> StartSwitchover(const pb::SwitchoverConfig& c, const std::string& vm_id,
                                           const std::string& role, const std::string& key,
                                           SwitchoverHooks hooks, replicator::LogFn log) {
  Switchover out;
  if (c.path_size() > 0) {
    switchover::Heartbeat::Options o;
    o.vm_id = vm_id;
    o.node = c.node();
    o.role = role;
    o.key = key;
    for (const pb::HeartbeatPath& p : c.path()) {
      // The config loader has checked both endpoints.
      o.paths.push_back(
          {*switchover::ParseEndpoint(p.local()), *switchover::ParseEndpoint(p.remote())});
    }
    o.interval = std::chrono::milliseconds(c.heartbeat_interval_ms());
    o.timeout = std::chrono::milliseconds(c.heartbeat_timeout_ms());
    o.on_peer_dead = std::move(hooks.on_peer_dead);
    o.on_peer_back = std::move(hooks.on_peer_back);
    o.log = log;
    auto hb = switchover::Heartbeat::Start(std::move(o));
    if (!hb.ok()) return hb.status();
    out.heartbeat = std::move(*hb);
  }
  if (!c.witness().empty()) {
    switchover::LeaseClient::Options o;
    o.vm_id = vm_id;
    o.node = c.node();
    o.key = key;
    o.witness = *switchover::ParseEndpoint(c.witness());
    o.renew = std::chrono::milliseconds(c.lease_renew_ms());
    o.on_gained = std::move(hooks.on_lease_gained);
    o.on_lost = std::move(hooks.on_lease_lost);
    o.log = log;
    auto lease = switchover::LeaseClient::Start(std::move(o));
    if (!lease.ok()) return lease.status();
    out.lease = std::move(*lease);
    out.witness = c.witness();
  }
  return out;
}

}  // namespace romulus::cli
