#!/usr/bin/env bash
# Runs every test twice, in a normal build (GCC) and in an AddressSanitizer + UBSan build (clang;
# the long exactness runs are a fifth as long there: testing::LongRun), and the networking tests
# a third time under ThreadSanitizer (GCC). The benchmarks are built (and so compiled
# warning-free) in the normal build only. The sanitizer build also holds the libFuzzer targets
# (fuzz/), which then run over their seed corpus, each input once, as a regression check.
# Tests that run a VM run once per platform this machine has (KVM where /dev/kvm works, the
# process platform on Linux 6.7 or later): their names end in /kvm or /process. With no platform
# at all they run once as /none and skip, saying why; the summary counts them per platform. The
# normal build runs them on every platform; the sanitizer builds on one (the process platform
# where there is one: the platform code below the VM is the same in both).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

jobs=$(nproc)
# Tests of hosts as network namespaces skip only without root, ip or nft; count them too.
count_netns() {
  netns_ran=$((netns_ran + $(grep -cE "Test +#[0-9]+: .*Netns.* Passed" "$1" || true)))
  netns_skipped=$((netns_skipped + $(grep -cE "Test +#[0-9]+: .*Netns.*Skipped" "$1" || true)))
}
# VM tests (Platforms/Vm*.*/PLATFORM) that passed on each platform, and those skipped.
count_vm() {
  vm_kvm=$(grep -cE "Test +#[0-9]+: Platforms/[^ ]*/kvm .* Passed" "$1" || true)
  vm_process=$(grep -cE "Test +#[0-9]+: Platforms/[^ ]*/process .* Passed" "$1" || true)
  vm_skipped=$(grep -cE "Test +#[0-9]+: Platforms/[^ ]* .*Skipped" "$1" || true)
  vm_kvm_ran=$((vm_kvm_ran + vm_kvm)) vm_process_ran=$((vm_process_ran + vm_process))
  vm_skipped_all=$((vm_skipped_all + vm_skipped))
}
# A build tree made by another generator (make, before the test command used Ninja) cannot be
# reconfigured with Ninja: start it afresh.
fresh_unless_ninja() {
  if [[ -f $1/CMakeCache.txt ]] && ! grep -q "^CMAKE_GENERATOR:INTERNAL=Ninja$" "$1/CMakeCache.txt"; then
    rm -rf "$1"
  fi
}
passed=0 failed=0 skipped=0 vm_kvm_ran=0 vm_process_ran=0 vm_skipped_all=0 netns_ran=0 netns_skipped=0
# The VM tests of the platform the sanitizer builds leave out ('' until the normal build ran).
other_platform=''
for variant in release asan; do
  dir=build-$variant
  # Line tables only (-g1, not -g): enough for file:line in a backtrace, and a tenth less to
  # compile (the build the test command makes; the sanitizer builds do the same).
  # Warnings are errors here (ROMULUS_WERROR), not in everyone's build.
  flags=(-G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O2 -g1 -DNDEBUG"
         -DROMULUS_WERROR=ON -DROMULUS_UNITY_BUILD=ON)
  targets=()
  exclude=()
  if [[ $variant == asan ]]; then
    # clang, so that the fuzz targets (libFuzzer is clang's) build in the same tree.
    flags+=(-DROMULUS_SANITIZE=ON -DROMULUS_FUZZ=ON -DCMAKE_C_COMPILER=clang
            -DCMAKE_CXX_COMPILER=clang++)
    targets=(--target romulus_tests romulus fuzzers)
    # A tree configured with another compiler cannot switch: start it afresh.
    if [[ -f $dir/CMakeCache.txt ]] && ! grep -q "^CMAKE_CXX_COMPILER:.*clang++" "$dir/CMakeCache.txt"; then
      rm -rf "$dir"
    fi
    # The Pacemaker cluster test runs in the normal build only: it takes minutes, mostly
    # Corosync's and Pacemaker's own timers, and the Romulus code it drives is the same that the
    # sanitizer builds test elsewhere (ocf-tester's run of the agent, PacemakerAgent, stays).
    # So does the nemesis's short schedule: its rounds would take minutes each here.
    skip='^PacemakerNetns\.|^Platforms/VmNemesis\.'
    if [[ -n $other_platform ]]; then skip+="|^Platforms/.*/$other_platform( |\$)"; fi
    exclude=(-E "$skip")
  fi
  fresh_unless_ninja "$dir"
  echo "== $variant: configure and build ($dir)"
  t0=$SECONDS
  cmake -S . -B "$dir" "${flags[@]}" >/dev/null
  cmake --build "$dir" -j"$jobs" "${targets[@]}" 2>&1 | grep -E "error|warning|Error" || true
  cmake --build "$dir" -j"$jobs" "${targets[@]}" >/dev/null  # fails the script on a build error
  echo "== $variant: built in $((SECONDS - t0)) s"
  t0=$SECONDS
  if [[ -n $other_platform && $variant == asan ]]; then
    echo "== $variant: tests (VM tests on one platform: those on $other_platform ran in the normal build)"
  else
    echo "== $variant: tests"
  fi
  set +e
  ctest --test-dir "$dir" --output-on-failure -j"$jobs" "${exclude[@]}" 2>&1 | tee "$dir/ctest.log"
  rc=${PIPESTATUS[0]}
  set -e
  p=$(grep -cE "Test +#[0-9]+: .* Passed" "$dir/ctest.log" || true)
  f=$(grep -cE "Test +#[0-9]+: .*[ *](Failed|Timeout|Exception)" "$dir/ctest.log" || true)
  s=$(grep -cE "Test +#[0-9]+: .*Skipped" "$dir/ctest.log" || true)
  count_vm "$dir/ctest.log"
  echo "== $variant: tests took $((SECONDS - t0)) s"
  echo "== $variant: VM tests: $vm_kvm ran on kvm, $vm_process ran on process, $vm_skipped skipped"
  if ((vm_skipped > 0)); then
    "$dir/tests/romulus_tests" --gtest_filter='Platforms/VmCheckpoint.*' 2>&1 |
      grep -m1 -o "needs a platform that runs VMs: .*" || true
  fi
  passed=$((passed + p)) failed=$((failed + f)) skipped=$((skipped + s))
  count_netns "$dir/ctest.log"
  if ((rc != 0 && f == 0)); then failed=$((failed + 1)); fi
  # With both platforms here, the sanitizer builds run the VM tests on the process platform only.
  if [[ $variant == release ]] && ((vm_kvm > 0 && vm_process > 0)); then other_platform=kvm; fi
done

# Each fuzz target over its checked-in seed corpus, every input once (the regression check; the
# docs/testing.md says how to fuzz longer). A crash, a sanitizer report or a hang fails it.
fuzz_targets=0 fuzz_inputs=0 fuzz_failed=0
t0=$SECONDS
for corpus in fuzz/corpus/*/; do
  target=$(basename "$corpus")
  inputs=("$corpus"*)
  log=build-asan/fuzz/$target.log
  set +e
  "build-asan/fuzz/fuzz_$target" -timeout=60 "${inputs[@]}" >"$log" 2>&1
  rc=$?
  set -e
  ran=$(grep -c "^Executed " "$log" || true)
  fuzz_targets=$((fuzz_targets + 1)) fuzz_inputs=$((fuzz_inputs + ran))
  if ((rc != 0 || ran != ${#inputs[@]})); then
    fuzz_failed=$((fuzz_failed + 1)) failed=$((failed + 1))
    echo "== fuzz: $target: FAILED after $ran of ${#inputs[@]} inputs (exit $rc); the end of $log:"
    tail -n 30 "$log"
  else
    passed=$((passed + 1))
    echo "== fuzz: $target: $ran of ${#inputs[@]} inputs ran, no crash"
  fi
done
echo "== fuzz: took $((SECONDS - t0)) s"
# ThreadSanitizer over the networking code: the ledger endpoint, the output gate and the
# replication transport, heartbeats and leases, the proxy; and post-copy's fault thread (the long
# exactness runs stay in the two builds above). The VM tests among them run on the process platform only (the networking code
# does not depend on the platform; the two builds above run them on every one).
dir=build-tsan
echo "== tsan: configure and build ($dir)"
t0=$SECONDS
fresh_unless_ninja "$dir"
cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DROMULUS_TSAN=ON -DROMULUS_WERROR=ON \
  -DROMULUS_UNITY_BUILD=ON >/dev/null
cmake --build "$dir" -j"$jobs" --target romulus_tests romulus >/dev/null
echo "== tsan: built in $((SECONDS - t0)) s"
t0=$SECONDS
echo "== tsan: networking tests"
set +e
TSAN_OPTIONS=halt_on_error=1 ctest --test-dir "$dir" --output-on-failure -j"$jobs" \
  -R 'OutputGate|ControlSocket|^Systemd\.|^Metrics\.|^Process\.|^LocalHosts\.|WireFormat|^Witness\.|Lease|Heartbeat|SwitchoverNetns|MirrorPromotion|Migration\.AnError|NodeTest\.AFailed|^HealthMonitor\.|SilentPeer|SoftReplication\.APrimaryThatLies|LoadFailover|^ProxyTest\.|^ProxyCommand\.|^Bond\.|^Missing(Pages|Chunks)|/(VmLocalHosts\.|VmPostcopyMigration\.|VmLedger\.|VmBadInput\.|VmSystemd\.|VmReplication\.(AWrongKey|Garbage|ARestarted)).*/(process|none)( |$)' 2>&1 |
  tee "$dir/ctest.log"
rc=${PIPESTATUS[0]}
set -e
p=$(grep -cE "Test +#[0-9]+: .* Passed" "$dir/ctest.log" || true)
f=$(grep -cE "Test +#[0-9]+: .*[ *](Failed|Timeout|Exception)" "$dir/ctest.log" || true)
s=$(grep -cE "Test +#[0-9]+: .*Skipped" "$dir/ctest.log" || true)
passed=$((passed + p)) failed=$((failed + f)) skipped=$((skipped + s))
count_vm "$dir/ctest.log"
echo "== tsan: tests took $((SECONDS - t0)) s"
echo "== tsan: VM tests: $vm_kvm ran on kvm, $vm_process ran on process, $vm_skipped skipped"
count_netns "$dir/ctest.log"
if ((rc != 0 && f == 0)); then failed=$((failed + 1)); fi

echo "Fuzz targets over their seed corpus: $fuzz_targets targets, $fuzz_inputs inputs ran, $fuzz_failed failed (each target counts as one test below)"
echo "Network-namespace tests over all builds: $netns_ran ran, $netns_skipped skipped"
echo "VM tests over all builds: $vm_kvm_ran ran on kvm, $vm_process_ran ran on process, $vm_skipped_all skipped"
echo "The test command took $SECONDS s"
echo "romulus: $passed passed, $failed failed, $skipped skipped"
((failed == 0))
