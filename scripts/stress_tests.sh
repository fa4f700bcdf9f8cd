#!/usr/bin/env bash
# Repeat every test file that starts several processes (pytest marker `multiprocess`: gloo groups,
# torchrun) RUNS times in a row and count the runs that pass. A file stops at its first failure,
# whose log is kept and named. Exit status 1 if any run failed.
#
#   bash scripts/stress_tests.sh [RUNS] [FILE ...]     (default: 20 runs of every such file)
#
# Run it with nothing else on the machine: the counts (and the times, printed per file) are then
# what CI sees.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
runs="${1:-20}"
shift $(($# > 0 ? 1 : 0))
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
  mapfile -t files < <(python -m pytest -q --collect-only -p no:cacheprovider -m multiprocess | grep "::" |
    cut -d: -f1 | sort -u)
fi
logs="$(mktemp -d)"
failed=0
for file in "${files[@]}"; do
  passed=0
  start=$SECONDS
  for _ in $(seq 1 "$runs"); do
    if python -m pytest -q -p no:cacheprovider -m multiprocess "$file" >"$logs/run.log" 2>&1; then
      passed=$((passed + 1))
    else
      log="$logs/$(basename "$file" .py).log"
      mv "$logs/run.log" "$log"
      failed=1
      break
    fi
  done
  printf '%-58s %3d/%d passed in %4d s%s\n' "$file" "$passed" "$runs" $((SECONDS - start)) \
    "$([ "$passed" -lt "$runs" ] && echo "  (failed run: $log)")"
done
exit "$failed"
