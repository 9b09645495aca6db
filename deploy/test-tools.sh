#!/usr/bin/env bash
# Debian packages the test suite needs besides the venv: Chromium for the review console's
# browser tests (Playwright drives Debian's build; Playwright's own browser download is not
# used) and redis-server (deploy/local-stack.sh also installs it on demand).
# Idempotent: installs only what is missing; needs root (or passwordless sudo) the first time.
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# Fonts so the console screenshots render text (chromium pulls a minimal set only).
dpkg -s fonts-dejavu-core >/dev/null 2>&1 || missing+=(fonts-dejavu-core)

if ((${#missing[@]} == 0)); then
  exit 0
fi
echo "installing Debian packages for the tests: ${missing[*]}" >&2
SUDO=
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null 2>&1 || { echo "need root to install ${missing[*]} (apt-get)" >&2; exit 1; }
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q >/dev/null
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
