#!/usr/bin/env bash
# Installs the Node clients of the compatibility tests (see package.json).
set -euo pipefail
exec "$(dirname "$0")/../../scripts/npm-ci" "$(dirname "$0")"
