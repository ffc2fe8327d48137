#!/usr/bin/env bash
# `make demo`: an origin with the sample campaigns and a whole PoP (cache, engine, supervisor)
# on 127.0.0.1, until Ctrl-C. State lives in .adpop/ (delete it to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/adpop up --state .adpop "$@"
