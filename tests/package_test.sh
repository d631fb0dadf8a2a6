#!/usr/bin/env bash
# The Debian package (`cpack -G DEB`, as docs/operations.md's packaging step makes it): it holds
# the binary, its manual page, the systemd units, the examples, the README and docs/ where
# Debian expects them, names the shared libraries it needs, installs with dpkg into an empty root
# and runs from there, and apt would install it on this machine with its dependencies. Usage: package_test.sh BUILD_DIR
set -euo pipefail
build=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
for tool in cpack dpkg-deb dpkg dpkg-shlibdeps; do
  command -v "$tool" >/dev/null || { echo "SKIP: needs $tool (Debian packages cmake, dpkg-dev)"; exit 77; }
done

(cd "$build" && cpack -G DEB -B "$work/out" >"$work/cpack.log" 2>&1) || { cat "$work/cpack.log"; fail "cpack failed"; }
deb=$(ls "$work"/out/romulus_*_amd64.deb)
echo "package: $(basename "$deb"), $(stat -c %s "$deb") bytes"

listing=$(dpkg-deb -c "$deb")
files=$(awk '{print $6}' <<<"$listing")
for f in ./usr/bin/romulus ./usr/lib/systemd/system/romulus-primary@.service \
         ./usr/lib/systemd/system/romulus-mirror@.service \
         ./usr/lib/systemd/system/romulus-witness.service \
         ./usr/lib/systemd/system/romulus-proxy@.service ./usr/share/doc/romulus/examples/vm1-proxy.conf \
         ./usr/share/doc/romulus/examples/vm1-primary.conf ./usr/share/doc/romulus/README.md \
         ./usr/share/doc/romulus/docs/configuration.md ./usr/share/doc/romulus/docs/operations.md \
         ./usr/share/man/man8/romulus.8.gz \
         ./usr/lib/ocf/resource.d/romulus/romulus; do
  grep -qxF "$f" <<<"$files" || fail "the package lacks $f"
done
depends=$(dpkg-deb -f "$deb" Depends)
echo "Depends: $depends"
for lib in libprotobuf libssl3 libsystemd0 liblz4 libxxhash; do
  grep -q "$lib" <<<"$depends" || fail "Depends does not name $lib"
done

# An empty root with only dpkg's database: the package's files land there, and the binary runs
# (its libraries are this machine's, which Depends names).
root=$work/root
mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates"
touch "$root/var/lib/dpkg/status"
dpkg --root="$root" --force-depends -i "$deb" >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "dpkg -i failed"; }
grep -q "^ExecStart=/usr/bin/romulus primary" "$root/usr/lib/systemd/system/romulus-primary@.service" ||
  fail "the installed primary unit does not run /usr/bin/romulus"
help=$("$root/usr/bin/romulus" help config) || fail "the installed binary does not run"
grep -q "max_in_flight_mib" <<<"$help" || fail "romulus help config lacks max_in_flight_mib"
help=$("$root/usr/bin/romulus" witness --help) || fail "romulus witness --help failed"
grep -q "usage: romulus witness" <<<"$help" || fail "romulus witness --help: $help"

# apt resolves its dependencies from the archive (a simulation: nothing is installed).
# (Output is captured first: with pipefail, grep -q ending a pipe early would fail it.)
policy=$(apt-cache policy libc6 2>/dev/null || true)
if grep -q "Candidate: [0-9]" <<<"$policy"; then
  simulated=$(apt-get install -s "$deb" 2>&1 || true)
  grep -q "^Inst romulus " <<<"$simulated" || fail "apt-get install -s: $(tail -3 <<<"$simulated")"
  echo "apt-get install -s: $(grep -c '^Inst ' <<<"$simulated") packages would be installed, romulus among them"
else
  echo "apt-get install -s not tried: no package lists here (apt-get update has not run)"
fi
echo "PASS"
