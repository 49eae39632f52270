#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium for the data_prep review-page test
# (tests/test_data_prep_review.py), only when no Chromium is on the PATH.
# Called by .ci/run before the tests; safe to run any number of times.
set -euo pipefail
for name in chromium chromium-browser google-chrome; do
  if command -v "$name" >/dev/null 2>&1; then
    echo "setup_chromium: found $(command -v "$name")"
    exit 0
  fi
done
if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
else
  SUDO=
fi
echo "setup_chromium: installing Debian's chromium package"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium
command -v chromium
