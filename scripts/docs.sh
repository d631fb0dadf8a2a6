#!/usr/bin/env bash
# Rewrites what in docs/ is generated from the code: docs/configuration.md from the binary
# (`romulus help config --markdown`; the test Config.TheCheckedInReferenceIsWhatTheBinaryPrints
# fails until this has run after a change to cli/config_help.cc) and the diagrams' SVGs from their
# Graphviz sources (scripts/diagrams.sh). romulus(8) is written by the build itself.
# Usage: scripts/docs.sh [ROMULUS_BINARY]  (default: build-release/cli/romulus, as built by the
# test command)
set -euo pipefail
cd "$(dirname "$0")/.."
binary=${1:-build-release/cli/romulus}
[[ -x $binary ]] || { echo "docs: no $binary: build it first (or name the binary)" >&2; exit 1; }
"$binary" help config --markdown >docs/configuration.md
echo "docs: docs/configuration.md"
scripts/diagrams.sh
