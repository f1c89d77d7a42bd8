#!/bin/bash
# GPU check of the current code: the default NumberLine command on cuda (bf16), beside the same
# command on this machine's CPU (2 threads, pinned), and the tests that train through the CLI.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{ nvidia-smi -L; nproc; lscpu | grep 'Model name'; python3 -c "import torch, transformers,
gymnasium; print(torch.__version__, transformers.__version__, gymnasium.__version__,
torch.cuda.get_device_name())"; } > $OUT/env.txt 2>&1
T=${1:-500}
K="family or each_game or cli_end_to_end or paper_preset or dry_run or nan_stops_the_run"
K="$K or checkpoint_sampling or ratio_is_one or kl_to_the_reference"
run() { OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 timeout $T taskset -c $1 python3 rl4vlm_min.py \
  --task numberline --seed 1 --output-dir /tmp/$2 > $OUT/$2.log 2>&1; echo "rc=$?" >> $OUT/$2.log; }
run 2,3 nl_gpu &
CUDA_VISIBLE_DEVICES= run 0,1 nl_cpu &
(timeout $T taskset -c 4-15 python3 -m pytest -q -p no:cacheprovider -n 8 test_min.py -k "$K" \
  > $OUT/pytest.log 2>&1; echo "rc=$?" >> $OUT/pytest.log) &
wait
cp /tmp/nl_gpu/metrics.jsonl $OUT/nl_gpu_metrics.jsonl
cp /tmp/nl_gpu/learning_curve.png $OUT/nl_gpu_curve.png
