#!/usr/bin/env bash
# Installs the Debian 12 packages Romulus builds and tests with. Safe to run again: it installs
# only what is missing, and needs root only when something is.
set -euo pipefail

# clang builds the sanitizer build and the fuzz targets; libclang-rt-14-dev holds its sanitizer
# runtimes and libFuzzer (only recommended by clang, so named here). prometheus: the metrics
# tests run its server and promtool against the daemons' /metrics. systemd: systemd-analyze
# verifies the units; dpkg-dev: dpkg-shlibdeps, with which cpack names the package's libraries.
# pacemaker, corosync, pacemaker-cli-utils and resource-agents: the cluster test runs a real
# Corosync + Pacemaker cluster over the OCF agent (ocf/romulus), and ocf-tester checks the agent.
# stress-ng: the nemesis (scripts/nemesis.sh) starves the hosts of CPU with it. graphviz:
# scripts/diagrams.sh renders docs/diagrams/*.dot. libxml2-utils: xmllint checks that the timeline
# `romulus demo --plot` writes is well-formed XML.
packages=(
  cmake ninja-build g++ make pkg-config clang-format clang libclang-rt-14-dev
  libboost-dev libprotobuf-dev protobuf-compiler libxxhash-dev libabsl-dev
  libgtest-dev libgmock-dev libbenchmark-dev libssl-dev liblz4-dev libsystemd-dev
  iproute2 nftables prometheus pacemaker corosync pacemaker-cli-utils resource-agents
  systemd dpkg-dev stress-ng graphviz libxml2-utils
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  echo "setup: all ${#packages[@]} packages present"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "setup: missing packages: ${missing[*]}; run this script as root (it uses apt-get)" >&2
  exit 1
fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: done"
