#!/usr/bin/env bash
# scripts/check_links.sh fails on each kind of bad link, and passes the pages as they are: a copy
# of README.md and docs/ is checked clean, then with one bad link or path at a time.
# Usage: check_links_test.sh SOURCE_DIR
set -euo pipefail
src=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
check=$src/scripts/check_links.sh
copy() {
  rm -rf "$work/repo" && mkdir -p "$work/repo"
  cp -r "$src/README.md" "$src/docs" "$work/repo/"
}
copy
bash "$check" "$work/repo" || fail "the pages as they are do not pass"
for bad in '[the notes](../shared/KVM-NOTES.md)' '[a page](docs/no-such-page.md)' \
           '[a site](https://example.org/)' '[a file](/etc/passwd)' '[a heading](#no-such-heading)' \
           'built in /work/main/build-release' 'see ../shared/ARCHITECTURE.md' \
           '<img src="docs/no-such.svg">'; do
  copy
  printf '\nA bad one: %s\n' "$bad" >>"$work/repo/README.md"
  if out=$(bash "$check" "$work/repo" 2>&1); then
    fail "passed with $bad in README.md: $out"
  fi
  echo "refused: $bad -> $(grep -m1 'check_links: README.md' <<<"$out")"
done
echo "PASS"
