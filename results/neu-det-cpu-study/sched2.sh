#!/bin/bash
# The CPU study rerun after the loader fix: at most $JOBS cells at a time (1 torch thread each), taken in
# the order of queue.txt (re-read every pass, so cells can be added), a cell only when the stages it shares
# with its seed's d3n cell exist. Resumable: rerun the script (a cell resumes where it stopped).
OUT=/work/study/neu-det-cpu-v2
JOBS=${JOBS:-2}
cd /work/snap
export PYTHONPATH=/work/snap OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
running() { pgrep -f "d3n.cli experiment .* --cells $1\$" > /dev/null; }
nrunning() { pgrep -fa "d3n.cli experiment" | grep -o -- "--cells .*" | sort -u | wc -l; }
ready() {  # $1 = cell
  local c=$1 d=$OUT/cells/d3n-${1##*-}
  [ -f $OUT/cells/$c/cell.json ] && return 1
  running $c && return 1
  case $c in
    d3n-*|long-baseline-*) return 0 ;;
    l2-*) [ -f $d/teacher/manifest.json ] ;;
    ddpm64-s0) [ -f $d/baseline/manifest.json ] ;;
    ddpm64-*) [ -f $d/baseline/manifest.json ] && [ -f $OUT/cells/ddpm64-s0/compress/manifest.json ] ;;
    *) [ -f $d/baseline/manifest.json ] ;;
  esac
}
while true; do
  left=0
  for c in $(grep -v '^#' $OUT/queue.txt); do
    [ -f $OUT/cells/$c/cell.json ] || left=1
    [ "$(nrunning)" -ge $JOBS ] && break
    if ready $c; then
      echo "=== $(date -Is) start $c"
      ( /work/main/.venv/bin/python -m d3n.cli experiment experiments/neu-det-cpu.yaml --out $OUT --cells $c \
          >> $OUT/run-$c.log 2>&1; echo "=== $(date -Is) end $c rc=$?" ) &
      sleep 5
    fi
  done
  [ $left = 0 ] && [ "$(nrunning)" = 0 ] && break
  sleep 30
done
echo "=== $(date -Is) queue done"
