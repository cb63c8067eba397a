#!/usr/bin/env bash
# Prepares the browser test of the live page (see live_page.js): Debian's chromium at
# /usr/bin/chromium, and playwright-core (which drives that Chromium and never
# downloads a browser of its own).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/../../scripts/apt-install" chromium chromium
"$here/../../scripts/npm-ci" "$here"
