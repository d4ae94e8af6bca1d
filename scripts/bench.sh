#!/usr/bin/env bash
# Engine benchmark (not part of the tests): 2 GiB seeded disk; see benches/engine_bench.py.
set -euo pipefail
source "$(dirname "$0")/_setup.sh"
exec .venv/bin/python benches/engine_bench.py "$@"
