#!/bin/bash
# The other three games' default commands on the GPU at once (each process is launch-bound).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
T=${1:-360}
run() { OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 timeout $T taskset -c $1 python3 rl4vlm_min.py \
  --task $2 --seed 1 --output-dir /tmp/$2 > $OUT/$2.log 2>&1; echo "rc=$?" >> $OUT/$2.log; }
run 0,1 ezpoints & run 2,3 blackjack & run 4,5 points24 &
wait
