#!/usr/bin/env bash
# Runs the whole test suite: unit tests (mixminion/test) and, when present,
# tests with real processes (tests/).  Used by the README and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
# Vector tests read $TYPE3_VECTORS when set, else tests/vectors (our copy).
# The MTA test starts opensmtpd, which only runs as root: as anyone else,
# its MTA part is left out (CI runs as root, so runs it).
if [ "$(id -u)" -ne 0 ] && [ -z "${MIXMINION_SKIP_MTA:-}" ]; then
    echo "scripts/test.sh: not root, so MIXMINION_SKIP_MTA=1 (the MTA test needs root)" >&2
    export MIXMINION_SKIP_MTA=1
fi
if [ "$#" -eq 0 ]; then set -- mixminion tests; fi
exec python3 -m twisted.trial --temp-directory="${TMPDIR:-/tmp}/mixminion-trial-$$" "$@"
