// Loading protobuf text-format configuration files: syntax errors and bad values are reported
// as "FILE:LINE: field: what is wrong".
#ifndef ROMULUS_CLI_CONFIG_H_
#define ROMULUS_CLI_CONFIG_H_

#include <string>

#include "absl/status/statusor.h"
#include "proto/romulus.pb.h"

namespace romulus::cli {

absl::StatusOr<pb::PrimaryConfig> LoadPrimaryConfig(const std::string& path);
absl::StatusOr<pb::MirrorConfig> LoadMirrorConfig(const std::string& path);

}  // namespace romulus::cli

#endif  // ROMULUS_CLI_CONFIG_H_
