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
# where there is one: the platform code below the VM is the same in both). Each sanitizer build
# compiles at the lowest CPU priority beside the previous build's tests, on what they leave idle.
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
passed=0 failed=0 skipped=0 vm_kvm_ran=0 vm_process_ran=0 vm_skipped_all=0 netns_ran=0 netns_skipped=0
# The VM tests of the platform the sanitizer builds leave out ('' until the normal build ran).
other_platform=''

# Configures and builds one variant in build-VARIANT, its output in build-VARIANT.log; records
# how long that took in build-VARIANT.took.
build() {
  local variant=$1 dir=build-$1 t0=$SECONDS
  # Line tables only (-g1, not -g): enough for file:line in a backtrace, and a tenth less to
  # compile (the build the test command makes; the sanitizer builds do the same).
  # Warnings are errors here (ROMULUS_WERROR), not in everyone's build.
  local flags=(-DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O2 -g1 -DNDEBUG"
               -DROMULUS_WERROR=ON)
  local targets=()
  case $variant in
  asan)
    # clang, so that the fuzz targets (libFuzzer is clang's) build in the same tree.
    flags+=(-DROMULUS_SANITIZE=ON -DROMULUS_FUZZ=ON -DCMAKE_C_COMPILER=clang
            -DCMAKE_CXX_COMPILER=clang++)
    targets=(--target romulus_tests romulus fuzzers)
    # A tree configured with another compiler cannot switch: start it afresh.
    if [[ -f $dir/CMakeCache.txt ]] && ! grep -q "^CMAKE_CXX_COMPILER:.*clang++" "$dir/CMakeCache.txt"; then
      rm -rf "$dir"
    fi
    ;;
  tsan)
    flags=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DROMULUS_TSAN=ON -DROMULUS_WERROR=ON)
    targets=(--target romulus_tests romulus)
    ;;
  esac
  local rc=0
  { cmake -S . -B "$dir" "${flags[@]}" && cmake --build "$dir" -j"$jobs" "${targets[@]}"; } \
    >"$dir.log" 2>&1 || rc=$?
  echo $((SECONDS - t0)) >"$dir.took"
  return $rc
}

# Starts building a variant in the background at the lowest CPU priority, so that it takes only
# what the tests running meanwhile leave idle (they wait on timers, peers and guests much of the
# time) and does not slow them.
build_beside() {
  ( renice -n 19 -p $BASHPID >/dev/null; build "$1" ) &
  eval "build_pid_$1=$!"
}

# Waits for a variant's build; a failed build ends the test command with its errors.
finish_build() {
  local variant=$1 dir=build-$1 pid_var=build_pid_$1 t0=$SECONDS rc=0
  if [[ -n ${!pid_var:-} ]]; then
    wait "${!pid_var}" || rc=$?
  else
    build "$variant" || rc=$?
  fi
  grep -E "error|warning" "$dir.log" || true
  if ((rc != 0)); then
    echo "== $variant: the build failed (exit $rc); the end of $dir.log:"
    tail -n 40 "$dir.log"
    exit 1
  fi
  echo "== $variant: built in $(cat "$dir.took") s (waited $((SECONDS - t0)) s for it here)"
}

# Runs a variant's tests with ctest (extra arguments: which) and adds up what they did.
run_tests() {
  local variant=$1 dir=build-$1 t0=$SECONDS rc
  shift
  set +e
  ctest --test-dir "$dir" --output-on-failure -j"$jobs" "$@" 2>&1 | tee "$dir/ctest.log"
  rc=${PIPESTATUS[0]}
  set -e
  local p f s
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
}

# The three builds overlap the tests: the sanitizer build compiles beside the normal build's
# tests, the ThreadSanitizer build beside the sanitizer build's tests.
echo "== release: configure and build (build-release)"
finish_build release
build_beside asan
# The Pacemaker cluster test first, with no other test beside it (the build yields to it): its
# fast path fences a node whose primary was silent for 500 ms, and with two more tests on two
# cores a live one was.
echo "== release: the Pacemaker cluster test, alone (the asan build compiles beside it, at low priority)"
run_tests release -R '^PacemakerNetns\.'
echo "== release: the other tests (the asan build compiles beside them, at low priority)"
run_tests release -E '^PacemakerNetns\.'
# With both platforms here, the sanitizer builds run the VM tests on the process platform only.
if ((vm_kvm > 0 && vm_process > 0)); then other_platform=kvm; fi

finish_build asan
build_beside tsan
# The Pacemaker cluster test runs in the normal build only: it takes minutes, mostly Corosync's
# and Pacemaker's own timers, and the Romulus code it drives is the same that the sanitizer
# builds test elsewhere (ocf-tester's run of the agent, PacemakerAgent, stays).
skip='^PacemakerNetns\.'
if [[ -n $other_platform ]]; then
  skip+="|^Platforms/.*/$other_platform( |\$)"
  echo "== asan: tests (VM tests on one platform: those on $other_platform ran in the normal build; the tsan build compiles beside them)"
else
  echo "== asan: tests (the tsan build compiles beside them)"
fi
run_tests asan -E "$skip"

# Each fuzz target over its checked-in seed corpus, every input once (the regression check; the
# README says how to fuzz longer). A crash, a sanitizer report or a hang fails it.
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
# replication transport, heartbeats and leases (the long exactness runs stay in the two builds
# above). The VM tests among them run on the process platform only (the networking code does not
# depend on the platform; the two builds above run them on every one).
finish_build tsan
echo "== tsan: networking tests"
TSAN_OPTIONS=halt_on_error=1 run_tests tsan \
  -R 'OutputGate|ControlSocket|^Systemd\.|^Metrics\.|^Process\.|^LocalHosts\.|WireFormat|^Witness\.|Lease|Heartbeat|SwitchoverNetns|MirrorPromotion|Migration\.AnError|NodeTest\.AFailed|SilentPeer|SoftReplication\.APrimaryThatLies|LoadFailover|/(VmLocalHosts\.|VmLedger\.|VmBadInput\.|VmSystemd\.|VmReplication\.(AWrongKey|Garbage|ARestarted)).*/(process|none)( |$)'

echo "Fuzz targets over their seed corpus: $fuzz_targets targets, $fuzz_inputs inputs ran, $fuzz_failed failed (each target counts as one test below)"
echo "Network-namespace tests over all builds: $netns_ran ran, $netns_skipped skipped"
echo "VM tests over all builds: $vm_kvm_ran ran on kvm, $vm_process_ran ran on process, $vm_skipped_all skipped"
echo "The test command took $SECONDS s"
echo "romulus: $passed passed, $failed failed, $skipped skipped"
((failed == 0))
