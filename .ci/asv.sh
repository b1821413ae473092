#!/usr/bin/env bash
# CI step for the asv benchmark suite (issue 5): check it, then run every benchmark once
# against the checkout, using the microattn installed in the active Python environment.
#
#   .ci/asv.sh                  # from anywhere; needs asv and an installed microattn
#   .ci/asv.sh -b LinearAttention   # extra arguments go to `asv run` (here: one class)
#
# Fails (non-zero) if the suite does not import, a benchmark raises, or one times out.
# Skipped combinations (NotImplementedError in setup: no GPU, over a size budget) are
# not failures. `asv run` itself already exits 2 when any benchmark failed; the log is
# scanned as well, so a failure can never hide behind a zero exit status.
set -uo pipefail

cd "$(dirname "$0")/.."
log="$(mktemp "${TMPDIR:-/tmp}/asv-ci.XXXXXX.log")"
trap 'rm -f "$log"' EXIT

python -c "import microattn" || { echo "asv.sh: microattn is not importable in this environment" >&2; exit 1; }

# Record this machine's description without prompting (asv asks interactively otherwise).
asv machine --yes >/dev/null || exit 1

asv check --python=same || { echo "asv.sh: asv check failed" >&2; exit 1; }

start=$SECONDS
asv run --python=same --quick --show-stderr --durations 10 "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
echo "asv.sh: quick run took $((SECONDS - start)) s, asv exit status $status"

# asv marks a failed benchmark "failed" on its result line, a timeout "timeout" (and an
# import failure of the whole suite with "Importing benchmark suite failed").
if grep -Eq '(failed|timeout)$|Importing benchmark suite failed|asv: benchmark failed' "$log"; then
    echo "asv.sh: benchmark failures:" >&2
    grep -E '(failed|timeout)$|Importing benchmark suite failed' "$log" >&2
    exit 1
fi
if [ "$status" -ne 0 ]; then
    echo "asv.sh: asv run exited with status $status" >&2
    exit "$status"
fi
echo "asv.sh: all benchmarks ran (skipped combinations are reported as n/a)"
