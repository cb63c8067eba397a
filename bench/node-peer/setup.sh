#!/usr/bin/env bash
# Installs the Node packages of the benchmark's reference peer (see package.json).
set -euo pipefail
exec "$(dirname "$0")/../../scripts/npm-ci" "$(dirname "$0")"
