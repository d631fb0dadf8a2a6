// A small command-line parser for one subcommand: typed options with help text, so that --help
// always lists exactly what is parsed.
#ifndef ROMULUS_CLI_ARGS_H_
#define ROMULUS_CLI_ARGS_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace romulus::cli {

class Args {
 public:
  Args(std::string usage, std::string summary)
      : usage_(std::move(usage)), summary_(std::move(summary)) {}
  void String(const std::string& name, std::string* out, const std::string& help);
  void Uint(const std::string& name, uint64_t* out, const std::string& help);
  // Accepts a byte count with an optional K, M or G suffix (powers of 1024).
  void Size(const std::string& name, uint64_t* out, const std::string& help);
  void Seconds(const std::string& name, double* out, const std::string& help);
  void Bool(const std::string& name, bool* out, const std::string& help);

  // Parses argv (after the subcommand). Unknown options and bad values are errors.
  absl::Status Parse(int argc, char** argv);
  // What every subcommand does first: parses argv; prints the help for --help (exit code 0) or
  // one line for a usage error (exit code 2). Returns that exit code, or -1 to go on.
  int Prologue(int argc, char** argv);
  // A usage error found after parsing (a required option missing, values that do not go
  // together): "romulus COMMAND: what (see romulus COMMAND --help)" on stderr; returns 2.
  int UsageError(absl::string_view what) const;
  bool help() const { return help_; }
  std::string Help() const;

 private:
  struct Option {
    std::string name, help, default_text;
    bool takes_value;
    std::function<absl::Status(const std::string&)> set;
  };
  void Add(Option o) { options_.push_back(std::move(o)); }
  std::string usage_, summary_;
  std::vector<Option> options_;
  bool help_ = false;
};

absl::Status ParseSize(const std::string& text, uint64_t* out);

}  // namespace romulus::cli

#endif  // ROMULUS_CLI_ARGS_H_
