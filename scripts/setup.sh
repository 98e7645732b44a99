#!/usr/bin/env bash
# Installs what DeskVM needs on Debian 12 when it is missing: the system packages for
# building and running (GTK 4, libadwaita, libslirp, SeaBIOS firmware) and, for the test
# suite, the real software the tests hold DeskVM to (assembler, qemu-img, GRUB tooling,
# VNC clients, OCR, Xvfb, validators) plus vncdotool from PyPI in a private venv. Safe to
# run again: it installs only what is missing.
#   scripts/setup.sh run    packages to build and run DeskVM
#   scripts/setup.sh test   the above plus what the test suite needs
set -euo pipefail

purpose=${1:-run}
run_packages=(pkg-config libgtk-4-dev libadwaita-1-dev libslirp-dev seabios)
test_packages=(nasm qemu-utils grub-pc-bin grub-common xorriso mtools vncsnapshot tesseract-ocr tesseract-ocr-eng
  python3-venv xvfb xauth dbus dbus-x11 at-spi2-core xdotool imagemagick desktop-file-utils
  appstream libglib2.0-bin gettext python3-dogtail gir1.2-atspi-2.0 python3-gi ipxe-qemu x11-utils)

packages=("${run_packages[@]}")
if [ "$purpose" = test ]; then
  packages+=("${test_packages[@]}")
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "DeskVM setup: installing ${missing[*]}"
  sudo_cmd=()
  if [ "$(id -u)" -ne 0 ]; then
    sudo_cmd=(sudo)
  fi
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# vncdotool (a VNC client the display tests drive) is only on PyPI: a private venv.
if [ "$purpose" = test ]; then
  venv="${XDG_CACHE_HOME:-$HOME/.cache}/deskvm/venv"
  if [ ! -x "$venv/bin/vncdo" ]; then
    echo "DeskVM setup: installing vncdotool into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q vncdotool
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "DeskVM setup: Rust is missing; installing it with rustup (Debian 12's rustc is too old)"
    if ! command -v curl >/dev/null 2>&1; then
      DEBIAN_FRONTEND=noninteractive ${sudo_cmd[@]+"${sudo_cmd[@]}"} apt-get install -y -qq curl ca-certificates
    fi
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component clippy,rustfmt
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi

if [ ! -e /dev/kvm ]; then
  echo "DeskVM setup: warning: /dev/kvm does not exist; enable VT-x/AMD-V and load kvm_intel or kvm_amd" >&2
elif [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
  echo "DeskVM setup: warning: no access to /dev/kvm; add yourself to the kvm group: sudo usermod -aG kvm \$USER" >&2
fi
