#!/usr/bin/env bash
# Prepares the browser tests of the live page (see live_page.js):
#  1. Debian's `chromium` at /usr/bin/chromium (apt-get, as root or through sudo);
#  2. the Node packages of package.json (playwright-core, which drives that system
#     Chromium and never downloads a browser of its own) in tests/browser/node_modules,
#     installed with `npm ci` when missing or when package-lock.json changed since the
#     last install.
# Safe to run repeatedly; does nothing when everything is in place.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

chromium="/usr/bin/chromium"

if [[ ! -x "$chromium" ]]; then
  if [[ "$(id -u)" -eq 0 ]]; then
    as_root=()
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
  else
    echo "tests/browser/setup.sh: $chromium is missing and this user can neither install packages (not root) nor use sudo without a password;" >&2
    echo "  install it as root: apt-get update && apt-get install -y --no-install-recommends chromium" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # Wait for another apt/dpkg run to finish instead of failing on its lock.
  apt=(apt-get -o DPkg::Lock::Timeout=600)
  echo "tests/browser/setup.sh: installing Debian's chromium" >&2
  # Without package lists (fresh image) or with stale ones the install fails: update then.
  if ! "${as_root[@]}" "${apt[@]}" install -y --no-install-recommends chromium >&2; then
    "${as_root[@]}" "${apt[@]}" update >&2
    "${as_root[@]}" "${apt[@]}" install -y --no-install-recommends chromium >&2
  fi
  if [[ ! -x "$chromium" ]]; then
    echo "tests/browser/setup.sh: apt-get installed chromium but $chromium is still missing" >&2
    exit 1
  fi
fi

for tool in node npm; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "tests/browser/setup.sh: '$tool' not found on PATH; install Node.js and npm (e.g. 'apt-get install -y nodejs npm')" >&2
    exit 1
  fi
done

stamp="node_modules/.nsbridge-browser-stamp"
want="$(node -e 'const c=require("crypto"),f=require("fs");process.stdout.write(c.createHash("sha256").update(f.readFileSync("package-lock.json")).digest("hex")+" node "+process.versions.node.split(".")[0])')"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

echo "tests/browser/setup.sh: installing Node packages (npm ci)" >&2
# The .npmrc beside package.json sets audit=false, fund=false. playwright-core has no
# install script; PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD is set anyway, in case a later version adds one.
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error >&2
printf '%s' "$want" >"$stamp"
