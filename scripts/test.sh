#!/usr/bin/env bash
# Runs every test twice, in a normal build and in an AddressSanitizer + UBSan build (where the
# long exactness runs are a fifth as long: testing::LongRun), and the networking tests a third
# time under ThreadSanitizer. The benchmarks are built (and so compiled warning-free) in the
# normal build only.
# Tests that need /dev/kvm skip only when it is absent, and say so; the summary counts them.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

jobs=$(nproc)
# Tests of hosts as network namespaces skip only without root, ip or nft; count them too.
count_netns() {
  netns_ran=$((netns_ran + $(grep -cE "Test +#[0-9]+: .*Netns.* Passed" "$1" || true)))
  netns_skipped=$((netns_skipped + $(grep -cE "Test +#[0-9]+: .*Netns.*Skipped" "$1" || true)))
}
passed=0 failed=0 skipped=0 kvm_ran=0 kvm_skipped=0 netns_ran=0 netns_skipped=0
for variant in release asan; do
  dir=build-$variant
  flags=(-DCMAKE_BUILD_TYPE=RelWithDebInfo)
  targets=()
  [[ $variant == asan ]] && flags+=(-DROMULUS_SANITIZE=ON) && targets=(--target romulus_tests romulus)
  echo "== $variant: configure and build ($dir)"
  cmake -S . -B "$dir" "${flags[@]}" >/dev/null
  cmake --build "$dir" -j"$jobs" "${targets[@]}" 2>&1 | grep -E "error|warning|Error" || true
  cmake --build "$dir" -j"$jobs" "${targets[@]}" >/dev/null  # fails the script on a build error
  echo "== $variant: tests"
  set +e
  ctest --test-dir "$dir" --output-on-failure -j"$jobs" 2>&1 | tee "$dir/ctest.log"
  rc=${PIPESTATUS[0]}
  set -e
  p=$(grep -cE "Test +#[0-9]+: .* Passed" "$dir/ctest.log" || true)
  f=$(grep -cE "Test +#[0-9]+: .*[ *](Failed|Timeout|Exception)" "$dir/ctest.log" || true)
  s=$(grep -cE "Test +#[0-9]+: .*Skipped" "$dir/ctest.log" || true)
  kr=$(grep -cE "Test +#[0-9]+: Kvm.* Passed" "$dir/ctest.log" || true)
  ks=$(grep -cE "Test +#[0-9]+: Kvm.*Skipped" "$dir/ctest.log" || true)
  echo "== $variant: KVM tests: $kr ran and passed, $ks skipped"
  if ((ks > 0)); then
    "$dir/tests/romulus_tests" --gtest_filter='KvmCheckpoint.*' 2>&1 | grep -m1 -o "needs /dev/kvm: .*" || true
  fi
  passed=$((passed + p)) failed=$((failed + f)) skipped=$((skipped + s))
  kvm_ran=$((kvm_ran + kr)) kvm_skipped=$((kvm_skipped + ks))
  count_netns "$dir/ctest.log"
  if ((rc != 0 && f == 0)); then failed=$((failed + 1)); fi
done
# ThreadSanitizer over the networking code: the ledger endpoint, the output gate and the
# replication transport, heartbeats and leases (the long exactness runs stay in the two builds
# above).
dir=build-tsan
echo "== tsan: configure and build ($dir)"
cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DROMULUS_TSAN=ON >/dev/null
cmake --build "$dir" -j"$jobs" --target romulus_tests romulus >/dev/null
echo "== tsan: networking tests"
set +e
TSAN_OPTIONS=halt_on_error=1 ctest --test-dir "$dir" --output-on-failure -j"$jobs" \
  -R 'OutputGate|ControlSocket|^Process\.|LocalHosts|WireFormat|Witness|Lease|Heartbeat|SwitchoverNetns|MirrorPromotion|Migration\.AnError|NodeTest\.AFailed|SilentPeer|SoftReplication\.APrimaryThatLies|LoadFailover|KvmLedger|KvmBadInput|KvmReplication\.(AWrongKey|Garbage|ARestarted)' 2>&1 |
  tee "$dir/ctest.log"
rc=${PIPESTATUS[0]}
set -e
p=$(grep -cE "Test +#[0-9]+: .* Passed" "$dir/ctest.log" || true)
f=$(grep -cE "Test +#[0-9]+: .*[ *](Failed|Timeout|Exception)" "$dir/ctest.log" || true)
s=$(grep -cE "Test +#[0-9]+: .*Skipped" "$dir/ctest.log" || true)
passed=$((passed + p)) failed=$((failed + f)) skipped=$((skipped + s))
kvm_ran=$((kvm_ran + $(grep -cE "Test +#[0-9]+: Kvm.* Passed" "$dir/ctest.log" || true)))
kvm_skipped=$((kvm_skipped + $(grep -cE "Test +#[0-9]+: Kvm.*Skipped" "$dir/ctest.log" || true)))
count_netns "$dir/ctest.log"
if ((rc != 0 && f == 0)); then failed=$((failed + 1)); fi

echo "Network-namespace tests over all builds: $netns_ran ran, $netns_skipped skipped"
echo "KVM tests over all builds: $kvm_ran ran, $kvm_skipped skipped"
echo "romulus: $passed passed, $failed failed, $skipped skipped"
((failed == 0))
