#!/usr/bin/env bash
# Debian packages the test suite needs besides the venv: Tesseract with its English and Hindi
# language models (OCR of text inside images; tesserocr's wheel brings the library itself,
# these bring the models and the `tesseract` command), Chromium for the review console's
# browser tests (Playwright drives Debian's build; Playwright's own browser download is not
# used), redis-server (deploy/local-stack.sh also installs it on demand) and promtool, from
# Debian's `prometheus` package (2.42), for the alert rules' unit tests. That package ships a
# Prometheus server service: it must not be left running, so services are kept from starting
# during the install (policy-rc.d) and, under systemd, disabled and stopped after it.
# Also the S3Proxy jar (below). Idempotent: installs only what is missing; needs root (or
# passwordless sudo) the first time for the Debian packages.
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# Fonts so the console screenshots render text (chromium pulls a minimal set only).
dpkg -s fonts-dejavu-core >/dev/null 2>&1 || missing+=(fonts-dejavu-core)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
for pkg in tesseract-ocr tesseract-ocr-eng tesseract-ocr-hin; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done

# S3Proxy (Apache-2.0, from Maven Central): a real S3-compatible server for the evidence store's
# S3 integration test (tests/integration/test_evidence_s3.py). One self-contained jar, pinned by
# its sha256; it runs on the Java the Kafka broker already needs.
S3PROXY_VERSION=4.1.0
S3PROXY_SHA256=a4d025969aaf796616ed4b1e2491d87d455ce84bb28cb9db086b2e6aaa68b48d
S3PROXY_JAR=${MODSTREAM_S3PROXY_JAR:-$HOME/.cache/modstream/s3proxy-$S3PROXY_VERSION.jar}
if [[ ! -f $S3PROXY_JAR ]] || ! echo "$S3PROXY_SHA256  $S3PROXY_JAR" | sha256sum -c --quiet - >/dev/null 2>&1; then
  echo "downloading S3Proxy $S3PROXY_VERSION from Maven Central into $S3PROXY_JAR" >&2
  mkdir -p "$(dirname "$S3PROXY_JAR")"
  url=https://repo1.maven.org/maven2/org/gaul/s3proxy/$S3PROXY_VERSION/s3proxy-$S3PROXY_VERSION-jar-with-dependencies.jar
  python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$url" "$S3PROXY_JAR.partial"
  echo "$S3PROXY_SHA256  $S3PROXY_JAR.partial" | sha256sum -c --quiet - ||
    { rm -f "$S3PROXY_JAR.partial"; echo "S3Proxy jar does not match its pinned sha256" >&2; exit 1; }
  mv -f "$S3PROXY_JAR.partial" "$S3PROXY_JAR"
fi

# Label Studio 1.23.2 (Apache-2.0, from PyPI) in a venv of its own (its Django pins must not meet
# the project's): a real server for the Label Studio round trip (tests/e2e/test_label_studio_server.py).
# A failed install is not fatal: that test then skips, naming this log.
LABEL_STUDIO_VERSION=1.23.2
LABEL_STUDIO_VENV=${MODSTREAM_LABEL_STUDIO_VENV:-$HOME/.cache/modstream/label-studio-$LABEL_STUDIO_VERSION}
if [[ ! -f $LABEL_STUDIO_VENV/.complete ]]; then
  echo "installing Label Studio $LABEL_STUDIO_VERSION from PyPI into $LABEL_STUDIO_VENV" >&2
  rm -rf "$LABEL_STUDIO_VENV"
  mkdir -p "$(dirname "$LABEL_STUDIO_VENV")"
  if python3 -m venv "$LABEL_STUDIO_VENV" &&
    "$LABEL_STUDIO_VENV/bin/pip" install -q --disable-pip-version-check "label-studio==$LABEL_STUDIO_VERSION" \
      >"$LABEL_STUDIO_VENV.log" 2>&1; then
    touch "$LABEL_STUDIO_VENV/.complete"
  else
    echo "warning: Label Studio could not be installed (log: $LABEL_STUDIO_VENV.log); its test will skip" >&2
  fi
fi

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
# policy-rc.d exiting 101 tells invoke-rc.d not to start services; keep an existing one.
policy=/usr/sbin/policy-rc.d
added_policy=
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod 755 "$policy"
  added_policy=1
fi
trap 'if [[ -n $added_policy ]]; then $SUDO rm -f "$policy"; fi' EXIT
$SUDO apt-get update -q >/dev/null
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
# Under systemd the unit may still be enabled (it would start at the next boot): disable and stop it.
if [[ -d /run/systemd/system ]] && systemctl list-unit-files prometheus.service >/dev/null 2>&1; then
  $SUDO systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi
