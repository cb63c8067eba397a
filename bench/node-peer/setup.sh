#!/usr/bin/env bash
# Installs the Node packages of the benchmark's reference peer (see package.json) into
# bench/node-peer/node_modules with `npm ci`, when they are missing or when
# package-lock.json changed since the last install. Safe to run repeatedly.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

for tool in node npm; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "bench/node-peer/setup.sh: '$tool' not found on PATH; install Node.js and npm (e.g. 'apt-get install -y nodejs npm')" >&2
    exit 1
  fi
done

stamp="node_modules/.nsbridge-node-peer-stamp"
want="$(node -e 'const c=require("crypto"),f=require("fs");process.stdout.write(c.createHash("sha256").update(f.readFileSync("package-lock.json")).digest("hex")+" node "+process.versions.node.split(".")[0])')"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

echo "bench/node-peer/setup.sh: installing Node packages (npm ci)" >&2
# The .npmrc beside package.json sets audit=false, fund=false.
npm ci --no-audit --no-fund --loglevel=error >&2
printf '%s' "$want" >"$stamp"
