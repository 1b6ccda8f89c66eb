#!/usr/bin/env bash
# Run a command while the benchmarks' training clocks wait (bench/runner.py: HOLD): a test suite or a build beside a
# long benchmark, without its CPU time landing on a contender's clock.   tools/hold.sh make test
set -u
# Each holder its own file (bench/runner.py waits while /tmp/bench-hold or any /tmp/bench-hold.* exists), so
# holders may overlap.
hold=${BENCH_HOLD:-/tmp/bench-hold}.$$
touch "$hold"
trap 'rm -f "$hold"' EXIT
sleep 3  # a step under way finishes (the longest step is a second or two)
"$@"
