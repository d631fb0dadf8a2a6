// `romulus help config`: every field of the two config files, its default and its unit. The
// table is checked against the config messages' descriptors by a test, so that a new field
// cannot go undocumented.
#include "cli/config_help.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"

namespace romulus::cli {
namespace {

struct Field {
  const char* name;
  const char* value;     // type and unit, or the values it takes
  const char* fallback;  // the default when unset ("required", or "-" for none)
  const char* meaning;
};

struct Section {
  const char* title;
  const char* message;  // the protobuf message (proto/romulus.proto)
  std::vector<Field> fields;
};

// Fields both roles share are listed in each: an operator reads one file at a time.
const std::vector<Section>& Sections() {
  static const auto* sections = new std::vector<Section>{
      {"The primary's config (`romulus primary --config FILE`)",
       "PrimaryConfig",
       {
           {"vm_id", "string", "required", "the VM's name; both hosts must name the same VM"},
           {"memory_mib", "MiB, even, 16-4096", "256", "guest RAM"},
           {"disk", "path", "required", "the VM's disk image (created when missing)"},
           {"disk_mib", "MiB, 1-4194304", "64", "size of the disk image"},
           {"mirror", "HOST:PORT", "required", "the mirror's replication listener"},
           {"mirror_path", "HOST:PORT, repeated", "- (one path)",
            "parallel paths: the mirror's listener on each further path (up to 7); "
            "checkpoints travel over all at once, a path lost costs a resend on the others"},
           {"psk_file", "path", "required",
            "file holding the pre-shared key (the same on both hosts and the witness)"},
           {"epoch_ms", "ms, 5-1000", "25", "checkpoint epoch"},
           {"max_in_flight_mib", "MiB, 1-65536", "256",
            "checkpoints taken but not yet committed, at most; the VM waits past it"},
           {"run_unprotected", "bool", "false",
            "release outputs while no mirror is connected (else they are held)"},
           {"ledger_listen", "address", "127.0.0.1", "where the ledger service listens"},
           {"ledger_port", "port", "7070", "the ledger service's TCP port"},
           {"workload", "message", "-", "the reference guest's memory workload (below)"},
           {"compression", "none | lz4", "lz4", "page compression on the wire"},
           {"control_socket", "path", "-", "unix socket for romulus status/promote/migrate"},
           {"switchover", "message", "-", "heartbeats, witness and fencing (below)"},
           {"memory_file", "path", "- (a memfd)",
            "guest RAM in this file, so that it outlives a crash and seeds the return as mirror"},
           {"replication_listen", "address", "127.0.0.1",
            "after handing the VM over, listen here as the new primary's mirror"},
           {"replication_port", "port", "- (stay idle)", "the port for that"},
           {"replication_listen_path", "address, repeated", "- (one path)",
            "as replication_listen, on each further path (same port)"},
           {"platform", "kvm | process", "kvm where /dev/kvm works, else process",
            "what runs the VM"},
           {"guest_image", "path", "- (the built-in reference guest)", "a guest image to run"},
           {"encryption", "auto | aes-256-gcm | chacha20-poly1305 | off", "auto",
            "replication frames: auto picks the cheaper cipher on this CPU; off authenticates "
            "without encrypting"},
           {"metrics_listen", "ADDR:PORT", "- (none)", "Prometheus metrics at /metrics"},
           {"health", "message", "- (not watched)",
            "hardware health: its policy moves the VM to the mirror (below)"},
           {"base_image", "path, at most memory_mib", "- (none)",
            "a raw memory image the mirror reads too (shared storage): pages equal to one of its "
            "pages travel as references when the mirror names the same image"},
           {"migration", "message", "- (pre-copy to the mirror)",
            "how romulus migrate moves the VM when it does not say (below)"},
       }},
      {"The mirror's config (`romulus mirror --config FILE`)",
       "MirrorConfig",
       {
           {"vm_id", "string", "required", "as the primary's"},
           {"memory_mib", "MiB, even, 16-4096", "256", "as the primary's"},
           {"disk_mib", "MiB, 1-4194304", "64", "as the primary's"},
           {"listen", "address", "127.0.0.1", "the replication listener's address"},
           {"port", "port, 1-65535", "required", "the replication listener's port"},
           {"listen_path", "address, repeated", "- (one path)",
            "parallel paths: further addresses of the replication listener (same port, up "
            "to 7); a primary's connections over them form one connection"},
           {"psk_file", "path", "required", "as the primary's"},
           {"replica_disk", "path", "required", "the replica's disk image"},
           {"snapshot_dir", "path", "- (none)",
            "SIGUSR1 and stopping save the committed replica here; it seeds the next start"},
           {"control_socket", "path", "-", "unix socket for romulus status/promote"},
           {"switchover", "message", "-", "heartbeats, witness and fencing (below)"},
           {"ledger_listen", "address", "127.0.0.1", "where the ledger opens once promoted"},
           {"ledger_port", "port", "7070", "its port"},
           {"seed_memory_file", "path", "-",
            "a failed primary returning as the mirror: its memory_file seeds the replica"},
           {"replicate_to", "HOST:PORT", "- (run unprotected)",
            "once this host is the primary, replicate to the other host here"},
           {"replicate_to_path", "HOST:PORT, repeated", "- (one path)",
            "as replicate_to, on each further path (parallel paths)"},
           {"epoch_ms", "ms, 5-1000", "25", "as the primary"},
           {"compression", "none | lz4", "lz4", "as the primary"},
           {"platform", "kvm | process", "as the primary's", "what a promotion runs the VM on"},
           {"encryption", "auto | aes-256-gcm | chacha20-poly1305 | off", "auto",
            "as the primary's; both ends must agree whether to encrypt"},
           {"metrics_listen", "ADDR:PORT", "- (none)", "Prometheus metrics at /metrics"},
           {"health", "message", "- (not watched)",
            "as the primary's; acted on once this host is the primary, and while it is the "
            "mirror a policy that says move refuses a planned migration to it"},
           {"base_image", "path, at most memory_mib", "- (none)",
            "as the primary's: the same image, read here"},
           {"migration", "message", "- (pre-copy to the mirror)",
            "as the primary's; once this host is the primary"},
       }},
      {"migration { ... } (either config; romulus migrate's options override it)",
       "MigrationConfig",
       {
           {"postcopy", "bool", "false",
            "move the VM first and its memory after (post-copy), to the configured peer unless "
            "--to names another host: for a destination that holds nothing yet, or a guest that "
            "writes memory faster than the link"},
           {"accept_postcopy_risk", "bool", "false",
            "needed for post-copy: until all of its memory has arrived the VM lives on both "
            "hosts, and dies if the source does"},
           {"precopy_rounds", "0-100", "0",
            "post-copy's hybrid: this many pre-copy rounds while the VM runs, then post-copy for "
            "what the guest wrote meanwhile"},
       }},
      {"switchover { ... } (either config)",
       "SwitchoverConfig",
       {
           {"node", "string, 1-64 bytes", "required in the block", "this host's name"},
           {"path", "message, repeated", "-",
            "a heartbeat path: path { local: \"ADDR:PORT\" remote: \"ADDR:PORT\" }"},
           {"heartbeat_interval_ms", "ms, 1-10000", "10", "heartbeat period on each path"},
           {"heartbeat_timeout_ms", "ms, above the interval, at most 60000", "50",
            "the peer is dead when every path has been silent this long (the least: late "
            "heartbeats raise it)"},
           {"heartbeat_timeout_max_ms", "ms, heartbeat_timeout_ms to 60000",
            "4 x heartbeat_timeout_ms",
            "how far late heartbeats (a busy host) may raise the timeout, for a minute"},
           {"witness", "ADDR:PORT", "-", "the `romulus witness` that grants the lease"},
           {"lease_renew_ms", "ms, 5-10000", "30", "how often the lease is renewed"},
           {"fence_command", "shell command, at most 4096 bytes", "-",
            "without a witness: must exit 0 before a mirror promotes"},
           {"fence_timeout_ms", "ms, 1-3600000", "5000",
            "the fence (and unprotected) command is killed after it"},
           {"unprotected_command", "shell command, at most 4096 bytes", "-",
            "must exit 0 before a primary that may run unprotected releases outputs without a "
            "mirror (romulus primary/mirror --unprotected-command overrides it)"},
       }},
      {"switchover { path { ... } }",
       "HeartbeatPath",
       {
           {"local", "ADDR:PORT", "required", "this host's end of the path (UDP)"},
           {"remote", "ADDR:PORT", "required", "the peer's end"},
       }},
      {"health { ... } (either config; acted on while the host is the primary)",
       "HealthConfig",
       {
           {"sysfs_root", "absolute path", "/sys",
            "EDAC counters are read under ROOT/devices/system/edac/mc, interfaces under "
            "ROOT/class/net"},
           {"interval_ms", "ms, 10-3600000", "1000", "between checks"},
           {"interface", "name, repeated, at most 16", "-",
            "network interfaces whose carrier, carrier_changes and rx/tx errors are watched"},
           {"smart_device", "path", "- (no disk check)",
            "a disk checked with `smartctl -H --json` (skipped, saying so, when smartctl is not "
            "installed)"},
           {"smartctl", "path or name", "smartctl", "the program (found in PATH or /usr/sbin)"},
           {"command", "shell command, at most 4096 bytes", "-",
            "an operator's check: any exit but 0 is unhealthy"},
           {"command_timeout_ms", "ms, 1-3600000", "5000", "bounds the command and smartctl"},
           {"rule", "message, repeated, at most 32", "uncorrected_memory, count 1, alone",
            "the policy (below); none given: that one rule"},
           {"retry_ms", "ms, 10-3600000", "5000",
            "a refused move (mirror not in sync) is retried after this, doubling up to 64 "
            "times it"},
           {"migrate_timeout_ms", "ms, 100-600000", "10000",
            "for the last checkpoint and the mirror's answer"},
       }},
      {"health { rule { ... } }",
       "HealthRule",
       {
           {"signal",
            "corrected_memory | uncorrected_memory | link_errors | carrier_changes | "
            "link_down | disk_failing | command_failing | unreadable",
            "required", "what the rule watches; the first four count events, the rest are states"},
           {"count", "1-10^12", "1",
            "counters: new events within window_s; states: checks in a row"},
           {"window_s", "s, 0-604800", "0 (since the monitor began)",
            "counters only: a rate, events within the last window_s"},
           {"alone", "bool", "false",
            "holding, it moves the VM by itself; else only when another rule holds too"},
       }},
      {"The proxy's config (`romulus proxy --config FILE`)",
       "ProxyConfig",
       {
           {"listen", "address", "127.0.0.1", "the clients' address"},
           {"port", "port, 1-65535", "required", "the clients' port"},
           {"host", "HOST:PORT, repeated, 1-8", "required",
            "each host's ledger (its ledger_listen:ledger_port); HOST an IP address or localhost"},
           {"hold_ms", "ms, 1-600000", "10000",
            "a request not answered this long after it arrived gets status 10 (unavailable)"},
           {"answer_timeout_ms", "ms, 1-600000", "2000",
            "a host that accepted a connection or a request but does not answer is left"},
           {"probe_interval_ms", "ms, 1-10000", "5",
            "while no host accepts, how often each is tried"},
           {"max_clients", "1-65536", "1024",
            "client connections at once (more wait); each holds at most 16 KiB of requests and "
            "16 KiB of answers"},
       }},
      {"workload { ... } (the primary's; the reference guest only)",
       "WorkloadConfig",
       {
           {"working_set_pages", "pages", "0 (off)", "pages the memory workload writes over"},
           {"write_rate", "pages/s, 0-10000000", "0 (as fast as it can)", "page writes per second"},
           {"pattern", "sequential | uniform | hotcold", "uniform",
            "hotcold: 90% of writes to 10% of the pages"},
       }},
  };
  return *sections;
}

}  // namespace

std::string ConfigHelp() {
  std::string out =
      "Config files are protobuf text format: `field: value`, messages as `name { ... }`,\n"
      "`#` comments. A field left out takes its default. An error names FILE:LINE: field.\n"
      "Under systemd each VM's config is /etc/romulus/VM.conf (romulus-primary@VM,\n"
      "romulus-mirror@VM); examples are in /usr/share/doc/romulus/examples.\n";
  for (const Section& s : Sections()) {
    absl::StrAppend(&out, "\n", s.title, ":\n");
    for (const Field& f : s.fields) {
      std::string fallback = std::string(f.fallback).rfind("required", 0) == 0
                                 ? f.fallback
                                 : absl::StrCat("default: ", f.fallback);
      absl::StrAppendFormat(&out, "  %-22s %s; %s\n  %-22s %s\n", f.name, f.value, fallback, "",
                            f.meaning);
    }
  }
  return out;
}

namespace {

// A table cell: `|` would end the cell, and a newline the row.
std::string Cell(absl::string_view text) {
  std::string out;
  for (char c : text) {
    if (c == '|') {
      out += "\\|";
    } else if (c == '\n') {
      out += ' ';
    } else {
      out += c;
    }
  }
  return out;
}

}  // namespace

std::string ConfigHelpMarkdown() {
  std::string out =
      "# Configuration\n"
      "\n"
      "<!-- Generated by `romulus help config --markdown` (scripts/docs.sh writes it); do not "
      "edit: the test Config.TheCheckedInReferenceIsWhatTheBinaryPrints fails when this file "
      "and the binary disagree. -->\n"
      "\n"
      "Every field of every config file, as `romulus help config` prints it. Config files are\n"
      "protobuf text format (`proto/romulus.proto` holds the messages): `field: value`, messages\n"
      "as `name { ... }`, `#` comments. A field left out takes its default. A bad value is\n"
      "refused as `FILE:LINE: field: what is wrong`. Under systemd each VM's config is\n"
      "`/etc/romulus/VM.conf` (`romulus-primary@VM`, `romulus-mirror@VM`); examples are in\n"
      "`/usr/share/doc/romulus/examples` (in the repository: `systemd/examples/`).\n";
  for (const Section& s : Sections()) {
    absl::StrAppend(
        &out, "\n## ", s.title, "\n\nMessage `pb.", s.message,
        "`.\n\n| field | values | default | what it does |\n| --- | --- | --- | --- |\n");
    for (const Field& f : s.fields) {
      absl::StrAppend(&out, "| `", f.name, "` | ", Cell(f.value), " | ", Cell(f.fallback), " | ",
                      Cell(f.meaning), " |\n");
    }
  }
  return out;
}

std::vector<std::string> DocumentedConfigFields(const std::string& message) {
  std::vector<std::string> names;
  for (const Section& s : Sections()) {
    if (message != s.message) continue;
    for (const Field& f : s.fields) names.push_back(f.name);
  }
  return names;
}

}  // namespace romulus::cli
