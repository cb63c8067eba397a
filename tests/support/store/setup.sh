#!/usr/bin/env bash
# Installs the compatibility store (nx-27017, pinned in requirements.txt) into
# target/test-store/venv. Most tests prefer a better MongoDB when there is one
# (MONGODB_URI, or mongod on PATH: see tests/support/store.rs); a few need this store
# for what only it can be made to show (a short change history). Re-installs only when
# the pins change.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../../.." && pwd)
if [ -n "${MONGODB_URI:-}" ]; then
  echo "test store: MONGODB_URI is set; most tests use it"
elif command -v mongod >/dev/null 2>&1; then
  echo "test store: mongod on PATH; most tests start a throw-away replica set"
fi
requirements="$repo/tests/support/store/requirements.txt"
venv="$repo/target/test-store/venv"
stamp="$venv/.requirements"
if [ -x "$venv/bin/python" ] && cmp -s "$requirements" "$stamp"; then
  echo "test store: compatibility store already installed"
  exit 0
fi
python=${PYTHON:-python3}
command -v "$python" >/dev/null 2>&1 || {
  echo "test store: need python3 (3.11+) to install the compatibility store, or set MONGODB_URI" >&2
  exit 1
}
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$requirements"
cp "$requirements" "$stamp"
echo "test store: compatibility store installed in target/test-store/venv"
