#!/usr/bin/env bash
# Runs the whole test suite: unit tests (mixminion/test) and, when present,
# tests with real processes (tests/).  Used by the README and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
# Vector tests read $TYPE3_VECTORS when set, else tests/vectors (our copy).
if [ "$#" -eq 0 ]; then set -- mixminion tests; fi
exec python3 -m twisted.trial --temp-directory="${TMPDIR:-/tmp}/mixminion-trial-$$" "$@"
