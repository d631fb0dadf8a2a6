#!/usr/bin/env bash
# romulus(8) as the build wrote it (the romulus_manpage target): man renders it without a warning,
# and it holds every command of `romulus --help` with its usage and every option its --help lists.
# Usage: manpage_test.sh BUILD_DIR ROMULUS_BINARY
set -euo pipefail
page=$1/romulus.8.gz
binary=$2
fail() { echo "FAIL: $*" >&2; exit 1; }
command -v man >/dev/null || { echo "SKIP: needs man (Debian package man-db)"; exit 77; }
[[ -f $page ]] || fail "no $page: build the romulus_manpage target"
warnings=$(MANWIDTH=80 man --warnings -l "$page" 2>&1 >/dev/null || true)
[[ -z $warnings ]] || fail "man warns: $warnings"
text=$(MANWIDTH=200 man -l "$page" 2>/dev/null | col -b)
grep -q "^ROMULUS(8)" <<<"$text" || fail "no ROMULUS(8) header"
commands=$("$binary" --help | sed -n '/^commands:/,$p' | awk '/^  [a-z]+ / && $1 != "help" { print $1 }')
n=0 options=0
for name in $commands; do
  help=$("$binary" "$name" --help)
  usage=$(sed -n '1s/^usage: //p' <<<"$help")
  grep -qF -- "$usage" <<<"$text" || fail "romulus $name: the usage '$usage' is not in the page"
  for option in $(grep -oE '^  --[a-z0-9-]+' <<<"$help"); do
    grep -qE -- "^ +$option( VALUE)?( |\$)" <<<"$text" || fail "romulus $name: $option is not in the page"
    options=$((options + 1))
  done
  n=$((n + 1))
done
((n >= 10)) || fail "only $n commands in romulus --help"
grep -q "max_in_flight_mib" <<<"$text" || fail "the page lacks the config reference"
echo "romulus(8): $n commands, $options options, rendered without warnings"
echo "PASS"
