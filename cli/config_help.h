// The reference for the config files, as `romulus help config` prints it.
#ifndef ROMULUS_CLI_CONFIG_HELP_H_
#define ROMULUS_CLI_CONFIG_HELP_H_

#include <string>
#include <vector>

namespace romulus::cli {

// Every field of the primary's, the mirror's and the proxy's config: its values or unit, its
// default, what it does.
std::string ConfigHelp();
// The same as a Markdown page: docs/configuration.md is this text (`romulus help config
// --markdown`), and a test checks that the checked-in page still is.
std::string ConfigHelpMarkdown();
// The fields documented for a config message ("PrimaryConfig", "SwitchoverConfig", ...).
std::vector<std::string> DocumentedConfigFields(const std::string& message);

}  // namespace romulus::cli

#endif  // ROMULUS_CLI_CONFIG_HELP_H_
