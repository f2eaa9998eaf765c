#!/bin/sh
# Run pytest N times in a row (default: the ROS graph tests) and tally the runs; stop at the first
# failure unless KEEP_GOING=1. With LOAD=1, one busy-loop process per core keeps the CPUs busy, as a
# loaded CI machine would. Usage: scripts/repeat_tests.sh N [pytest args...]
set -u
n=${1:-20}
[ $# -gt 0 ] && shift
[ $# -eq 0 ] && set -- -m ros
py=${PYTHON:-.venv/bin/python}
burners=""
if [ "${LOAD:-0}" = 1 ]; then
  for _ in $(seq "$(nproc)"); do
    "$py" -c "import time
end = time.monotonic() + 86400
while time.monotonic() < end: pass" &
    burners="$burners $!"
  done
fi
stop_burners() { [ -n "$burners" ] && kill $burners 2>/dev/null; burners=""; }
trap stop_burners EXIT
trap 'stop_burners; exit 130' INT TERM
passed=0 failed=0
for i in $(seq "$n"); do
  if "$py" -m pytest -q -p no:cacheprovider "$@" >"${TMPDIR:-/tmp}/repeat_tests.$i.log" 2>&1; then
    passed=$((passed + 1)); echo "run $i/$n: passed ($(tail -n 1 "${TMPDIR:-/tmp}/repeat_tests.$i.log"))"
  else
    failed=$((failed + 1)); echo "run $i/$n: FAILED, log: ${TMPDIR:-/tmp}/repeat_tests.$i.log"
    grep -E "^(FAILED|ERROR)" "${TMPDIR:-/tmp}/repeat_tests.$i.log" | head -n 5
    [ "${KEEP_GOING:-0}" = 1 ] || break
  fi
done
echo "repeat: $passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -eq "$n" ]
