#!/usr/bin/env bash
# Runs DeskVM (installing missing system packages first). Arguments go to deskvm, e.g.
#   scripts/run.sh run --memory 512 --debugcon stdio
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh run
export PATH="$HOME/.cargo/bin:$PATH"
exec cargo run --release --quiet -- "$@"
