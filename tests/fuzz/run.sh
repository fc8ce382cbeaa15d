#!/bin/sh
# run.sh - drive the libFuzzer targets (called by CMake; see docs/fuzzing.md).
#
#   run.sh fuzz BUILD_DIR TARGET...   replay the regressions, then fuzz each target for
#                                     $FUZZ_SECONDS (default 60) on a copy of its seed
#                                     corpus in BUILD_DIR/fuzz-work/<target>/corpus; one
#                                     target at a time. Non-zero if any target failed.
#   run.sh replay BINARY DIR          run BINARY once over each file in DIR (ctest).
set -u
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1}"
here=$(cd "$(dirname "$0")" && pwd)

replay() { # binary dir
    files=$(find "$2" -type f ! -name '.*' | sort)
    if [ -z "$files" ]; then
        echo "no regression inputs in $2"
        return 0
    fi
    # shellcheck disable=SC2086 # file names are ours: no spaces
    "$1" $files
}

mode=${1:-}
case $mode in
replay)
    replay "$2" "$3" >"${TMPDIR:-/tmp}/fuzz-replay.$$" 2>&1
    rc=$?
    [ $rc -eq 0 ] || cat "${TMPDIR:-/tmp}/fuzz-replay.$$"
    grep -c '^Executed ' "${TMPDIR:-/tmp}/fuzz-replay.$$" | sed 's/$/ inputs replayed/'
    rm -f "${TMPDIR:-/tmp}/fuzz-replay.$$"
    exit $rc
    ;;
fuzz) ;;
*)
    echo "usage: $0 fuzz BUILD_DIR TARGET... | replay BINARY DIR" >&2
    exit 2
    ;;
esac

build=$2
shift 2
secs=${FUZZ_SECONDS:-60}
failed=""
summary=$build/fuzz-work/summary.txt
mkdir -p "$build/fuzz-work"
: >"$summary"
for t in "$@"; do
    bin=$build/fuzz_$t
    work=$build/fuzz-work/$t
    mkdir -p "$work/corpus" "$work/artifacts"
    cp -R "$here/corpus/$t/." "$work/corpus/" # seeds join what earlier runs found
    if ! replay "$bin" "$here/regressions/$t" >"$work/replay.log" 2>&1; then
        tail -n 40 "$work/replay.log"
        echo "fuzz_$t: a regression input fails again (log: $work/replay.log)"
        failed="$failed $t"
        continue
    fi
    set -- -max_total_time="$secs" -print_final_stats=1 -timeout=30 -rss_limit_mb=4096 \
        -artifact_prefix="$work/artifacts/"
    case $t in
    http) set -- "$@" -max_len=8192 -dict="$here/http.dict" ;;
    codec) set -- "$@" -dict="$here/codec.dict" ;;
    esac
    echo "fuzz_$t: ${secs} s ..."
    "$bin" "$@" "$work/corpus" >"$work/fuzz.log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/fuzz.log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$work/fuzz.log")
    ncorpus=$(find "$work/corpus" -type f | wc -l)
    crashes=$(find "$work/artifacts" -type f | wc -l)
    line="fuzz_$t: ${secs} s, ${execs:-?} execs, ${rate:-?} exec/s, corpus ${ncorpus} files, exit $rc, artifacts ${crashes}"
    echo "$line" | tee -a "$summary"
    if [ $rc -ne 0 ]; then
        grep -A 30 -m 1 -E '^==[0-9]+==|runtime error|^fuzz_|deadly signal|timeout' "$work/fuzz.log" | head -n 60
        echo "fuzz_$t FAILED: log $work/fuzz.log, input(s) in $work/artifacts/"
        echo "  add the input to tests/fuzz/regressions/$t/ once fixed"
        failed="$failed $t"
    fi
done
if [ -n "$failed" ]; then
    echo "fuzzing failed:$failed"
    exit 1
fi
echo "fuzzing: no crashes (summary: $summary)"
