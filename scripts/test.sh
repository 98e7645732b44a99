#!/usr/bin/env bash
# Runs every DeskVM test (installing missing system packages first): formatting, clippy,
# unit tests of every crate, engine tests with tiny guest programs, and the SeaBIOS boot.
# With CI=true a test that would skip for lack of KVM or firmware fails instead.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
export PATH="$HOME/.cargo/bin:$PATH"
export VNCDO="${XDG_CACHE_HOME:-$HOME/.cache}/deskvm/venv/bin/vncdo"
cargo fmt --all -- --check
# What every GNOME app ships must validate.
desktop-file-validate data/io.github.deskvm.DeskVM.desktop
appstreamcli validate --no-net --pedantic data/io.github.deskvm.DeskVM.metainfo.xml
glib-compile-schemas --strict --dry-run data
msgfmt --check -o /dev/null po/de.po
cargo clippy --workspace --all-targets --quiet -- -D warnings
# A test whose prerequisite (KVM, firmware, nasm) is missing prints "SKIPPED: reason" and
# passes outside CI; under CI=true it fails, so nothing skips there.
mkdir -p target
# The widget and window tests need a display and a session bus: the suite runs under a
# virtual X server and a private D-Bus session.
xvfb-run -a dbus-run-session -- cargo test --workspace --all-targets --no-fail-fast 2>&1 | tee target/test-output.txt
# One closing line for the whole suite.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "%d passed, %d failed\n", p, f }' target/test-output.txt
