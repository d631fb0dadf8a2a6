// The `romulus` subcommands. Each parses its own options and returns the process exit code.
#ifndef ROMULUS_CLI_COMMANDS_H_
#define ROMULUS_CLI_COMMANDS_H_

namespace romulus::cli {

int VmCommand(int argc, char** argv);
int LoadCommand(int argc, char** argv);
int JournalCommand(int argc, char** argv);
int PrimaryCommand(int argc, char** argv);
int MirrorCommand(int argc, char** argv);
int DemoCommand(int argc, char** argv);
int WitnessCommand(int argc, char** argv);
int ProxyCommand(int argc, char** argv);

}  // namespace romulus::cli

#endif  // ROMULUS_CLI_COMMANDS_H_
