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
temp="${TMPDIR:-/tmp}/mixminion-trial-$$"
if [ "$#" -gt 0 ]; then
    exec python3 -m twisted.trial --temp-directory="$temp" "$@"
fi
# The unit tests share nothing and run several at once; so do the tests
# with real processes that only check what the daemons do.
# Those that measure time, memory or load (module-level "TIMED = True")
# run one at a time, last: two at once on a two-core machine would
# measure each other.
status=0
# One worker more than there are cores: some start a processing child or
# an interpreter and wait for it (measured: 104 s with 3 workers on 2
# cores, 117 s with 2, on the same hour).
python3 -m twisted.trial -j"$(( $(nproc) + 1 ))" --temp-directory="$temp-unit" mixminion || status=$?
timed=$(grep -l '^TIMED = True' tests/test_*.py | sed 's#/#.#; s#\.py$##' | sort)
untimed=$(ls tests/test_*.py | sed 's#/#.#; s#\.py$##' | sort | comm -23 - <(echo "$timed"))
# The long ones ("SLOW = SECONDS" in the module) go first, longest first,
# so that the workers finish together rather than one of them running a
# long test alone at the end.
slow=$(grep -H '^SLOW = ' tests/test_*.py | sed 's#^\(.*\)\.py:SLOW = \([0-9]*\).*#\2 \1#' \
       | sort -rn | cut -d' ' -f2 | sed 's#/#.#')
untimed="$slow $(echo "$untimed" | comm -23 - <(echo "$slow" | sort))"
# They mostly wait (for mix intervals, votes, daemons): one worker more than
# there are cores keeps the cores busy (measured: 157 s with 3 workers on
# 2 cores, 187 s with 2).
python3 -m twisted.trial -j"$(( $(nproc) + 1 ))" --temp-directory="$temp-processes" $untimed || status=$?
python3 -m twisted.trial --temp-directory="$temp-timed" $timed || status=$?
exit "$status"
