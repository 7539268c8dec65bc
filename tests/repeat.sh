#!/usr/bin/env bash
# Run one pytest node N times and count failures (for flaky tests), e.g.
#   tests/repeat.sh 20 tests/test_trainer_distributed.py::test_two_process_run_resume_and_run_directory
# Each run's output is kept under $REPEAT_LOG_DIR (default: a new temporary directory) when it fails.
set -u
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 N PYTEST_NODE [PYTEST_ARGS...]" >&2
  exit 2
fi
n=$1; shift
py=${PYTHON:-python}
logs=${REPEAT_LOG_DIR:-$(mktemp -d -t repeat-XXXXXX)}
mkdir -p "$logs"
fail=0
for i in $(seq 1 "$n"); do
  if "$py" -m pytest -x -q -p no:cacheprovider "$@" >"$logs/run_$i.log" 2>&1; then
    rm -f "$logs/run_$i.log"
    echo "run $i/$n: pass"
  else
    fail=$((fail + 1))
    echo "run $i/$n: FAIL (log: $logs/run_$i.log)"
  fi
done
echo "$fail of $n runs failed: $*"
[ "$fail" -eq 0 ]
