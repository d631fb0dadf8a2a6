// Loading protobuf text-format configuration files: syntax errors and bad values are reported
// as "FILE:LINE: field: what is wrong".
#ifndef ROMULUS_CLI_CONFIG_H_
#define ROMULUS_CLI_CONFIG_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "proto/romulus.pb.h"

namespace romulus::cli {

// The longest shell command a config (fence_command, unprotected_command) or the command line
// may give.
inline constexpr size_t kMaxCommandBytes = 4096;
// switchover.fence_timeout_ms when left out; it also bounds unprotected_command.
inline constexpr uint64_t kDefaultFenceTimeoutMs = 5000;

// How many hosts a proxy config may name.
inline constexpr int kMaxProxyHosts = 8;

absl::StatusOr<pb::PrimaryConfig> LoadPrimaryConfig(const std::string& path);
absl::StatusOr<pb::MirrorConfig> LoadMirrorConfig(const std::string& path);
absl::StatusOr<pb::ProxyConfig> LoadProxyConfig(const std::string& path);

}  // namespace romulus::cli

#endif  // ROMULUS_CLI_CONFIG_H_
