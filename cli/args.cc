#include "cli/args.h"

#include <cstdio>
#include <cstdlib>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace romulus::cli {

absl::Status ParseSize(const std::string& text, uint64_t* out) {
  if (text.empty()) return absl::InvalidArgumentError("empty size");
  uint64_t mult = 1;
  std::string digits = text;
  switch (text.back()) {
    case 'K':
    case 'k':
      mult = 1ull << 10;
      break;
    case 'M':
    case 'm':
      mult = 1ull << 20;
      break;
    case 'G':
    case 'g':
      mult = 1ull << 30;
      break;
    default:
      break;
  }
  if (mult != 1) digits.pop_back();
  uint64_t v;
  if (!absl::SimpleAtoi(digits, &v) || v > UINT64_MAX / mult) {
    return absl::InvalidArgumentError(absl::StrCat("'", text, "' is not a size (e.g. 256M)"));
  }
  *out = v * mult;
  return absl::OkStatus();
}

void Args::String(const std::string& name, std::string* out, const std::string& help) {
  Add({name, help, *out, true, [out](const std::string& v) {
         *out = v;
         return absl::OkStatus();
       }});
}

void Args::Uint(const std::string& name, uint64_t* out, const std::string& help) {
  // UINT64_MAX is how a command marks an option as "not given" (it then has no default to show).
  std::string default_text = *out == UINT64_MAX ? "" : absl::StrCat(*out);
  Add({name, help, default_text, true, [out, name](const std::string& v) {
         if (!absl::SimpleAtoi(v, out)) {
           return absl::InvalidArgumentError(
               absl::StrCat("--", name, ": '", v, "' is not a whole number"));
         }
         return absl::OkStatus();
       }});
}

void Args::Size(const std::string& name, uint64_t* out, const std::string& help) {
  std::string def =
      *out % (1 << 20) == 0 && *out ? absl::StrCat(*out >> 20, "M") : absl::StrCat(*out);
  Add({name, help, def, true, [out, name](const std::string& v) {
         auto s = ParseSize(v, out);
         return s.ok() ? s
                       : absl::InvalidArgumentError(absl::StrCat("--", name, ": ", s.message()));
       }});
}

void Args::Seconds(const std::string& name, double* out, const std::string& help) {
  Add({name, help, absl::StrCat(*out), true, [out, name](const std::string& v) {
         if (!absl::SimpleAtod(v, out) || *out < 0 || *out > 1e7) {
           return absl::InvalidArgumentError(
               absl::StrCat("--", name, ": '", v, "' is not a number of seconds"));
         }
         return absl::OkStatus();
       }});
}

void Args::Bool(const std::string& name, bool* out, const std::string& help) {
  Add({name, help, "", false, [out](const std::string&) {
         *out = true;
         return absl::OkStatus();
       }});
}

absl::Status Args::Parse(int argc, char** argv) {
  for (int i = 0; i < argc; i++) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      help_ = true;
      return absl::OkStatus();
    }
    if (arg.rfind("--", 0) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", arg, "'"));
    }
    std::string name = arg.substr(2), value;
    bool has_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    const Option* opt = nullptr;
    for (const Option& o : options_) {
      if (o.name == name) opt = &o;
    }
    if (!opt) return absl::InvalidArgumentError(absl::StrCat("unknown option --", name));
    if (opt->takes_value && !has_value) {
      if (i + 1 >= argc)
        return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
      value = argv[++i];
    } else if (!opt->takes_value && has_value) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " takes no value"));
    }
    if (auto s = opt->set(value); !s.ok()) return s;
  }
  return absl::OkStatus();
}

int Args::Prologue(int argc, char** argv) {
  if (auto s = Parse(argc, argv); !s.ok()) return UsageError(s.message());
  if (help_) {
    std::fputs(Help().c_str(), stdout);
    return 0;
  }
  return -1;
}

int Args::UsageError(absl::string_view what) const {
  // The command is the usage line's first two words: "romulus status --socket PATH" -> status.
  std::string command = usage_.substr(0, usage_.find(' ', usage_.find(' ') + 1));
  std::fprintf(stderr, "%s: %.*s (see %s --help)\n", command.c_str(), static_cast<int>(what.size()),
               what.data(), command.c_str());
  return 2;
}

std::string Args::Help() const {
  std::string out = absl::StrCat("usage: ", usage_, "\n\n", summary_, "\n\noptions:\n");
  for (const Option& o : options_) {
    std::string left = absl::StrCat("  --", o.name, o.takes_value ? " VALUE" : "");
    absl::StrAppendFormat(&out, "%-28s %s", left, o.help);
    if (o.takes_value && !o.default_text.empty()) absl::StrAppend(&out, " [", o.default_text, "]");
    absl::StrAppend(&out, "\n");
  }
  absl::StrAppendFormat(&out, "%-28s %s\n", "  --help", "show this help");
  return out;
}

}  // namespace romulus::cli
