#!/usr/bin/env bash
# The GPU paths, checked on one GPU machine (<= 10 min on one H100): run from the repository root
# in the project's environment (pip install -e ".[dev]"), with no other job on the GPU:
#
#     bash benchmarks/gpu_check.sh            # writes reports/benchmarks/gpu.md and gpu.json
#
#   1. commands on CUDA: train / evaluate / sample / train --resume (device auto), then the GPU
#      checkpoint evaluated and resumed on the CPU (CUDA_VISIBLE_DEVICES=""; its noise generator
#      is CUDA's), and that CPU checkpoint resumed on the GPU again;
#   2. torch.cuda.set_sync_debug_mode("warn") during 20 training steps (expected: no warning in a
#      deferred step, the one a CUDA run takes; the host step's syncs listed for contrast);
#   3. step time fp32 / bf16 / fp16 x batch 64 / 1024 for VPSDE and learned K = 3 at the digits and
#      MNIST shapes (and fp32 batch 64 with the host's per-step reads, for the gain);
#   4. a 2-trial Ray search on the GPU (budget.device cuda, resources.gpu 0.5: both trials share it).
# A failing check is recorded as FAIL with its last line and the script goes on; it exits 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK="${GPU_CHECK_WORK:-$(mktemp -d /tmp/mdmsearch-gpu-check.XXXX)}"
CLI="$WORK/cli.tsv"
: > "$CLI"
failed=0

check() {  # check NAME SECONDS COMMAND...: one row of the report
  local name="$1" limit="$2"; shift 2
  local out rc
  out=$(timeout "$limit" "$@" 2>&1); rc=$?
  local last; last=$(printf '%s\n' "$out" | grep -v '^\s*$' | tail -1 | tr '\t|' '  ' | cut -c1-160)
  if [ "$rc" -eq 0 ]; then printf '%s\tok\t%s\n' "$name" "$last" >> "$CLI"
  else printf '%s\tFAIL (exit %s)\t%s\n' "$name" "$rc" "$last" >> "$CLI"; failed=1; fi
  printf '%-55s exit %s  %s\n' "$name" "$rc" "$last"
}

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible')" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

RUN="$WORK/run"
FLAGS=(--dataset digits --process learned --n-aux 1 --device auto --eval-every 100 --n-samples 16 -q)
check "train on cuda (200 steps, learned K=1)" 120 mdmsearch train "${FLAGS[@]}" --steps 200 --out "$RUN"
check "evaluate on cuda" 60 mdmsearch evaluate "$RUN" --n 128 --n-t 4
check "evaluate --ode on cuda" 120 mdmsearch evaluate "$RUN" --n 16 --n-t 1 --ode
check "sample on cuda" 60 mdmsearch sample "$RUN" --n 16 --steps 50 --out "$WORK/samples.png"
check "train --resume on cuda (to 300)" 120 mdmsearch train "${FLAGS[@]}" --steps 300 --out "$RUN" --resume
check "GPU checkpoint: evaluate on the CPU" 60 env CUDA_VISIBLE_DEVICES= mdmsearch evaluate "$RUN" --n 64 --n-t 2
check "GPU checkpoint: train --resume on the CPU (to 320)" 120 \
  env CUDA_VISIBLE_DEVICES= mdmsearch train "${FLAGS[@]}" --steps 320 --out "$RUN" --resume
check "CPU checkpoint: train --resume on cuda (to 340)" 120 mdmsearch train "${FLAGS[@]}" --steps 340 --out "$RUN" --resume
check "fp16 run on cuda (100 steps)" 120 mdmsearch train "${FLAGS[@]}" --precision fp16 --steps 100 --out "$WORK/fp16"

check "sync warnings in 20 steps" 150 python benchmarks/gpu_check.py syncs "$WORK"
check "step times" 300 python benchmarks/gpu_check.py steps "$WORK"

SPEC="$WORK/ray.yaml"
cat > "$SPEC" <<EOF
study: gpu-check
studies_dir: $WORK/studies
data: {name: digits}
model: {name: unet, size: tiny}
budget: {steps: 100, eval_every: 50, eval_examples: 128, test_n_t: 2, n_samples: 0, device: cuda, quality: null}
sampler: {name: random}
pruner: {name: none}
baselines: [vpsde, cld]
n_trials: 2
workers: 2
executor: ray
resources: {cpu: 1, gpu: 0.5}
EOF
check "Ray search: 2 trials sharing the GPU (gpu 0.5, device cuda)" 240 mdmsearch run "$SPEC" --executor ray
check "Ray trial resources for device auto here" 30 python -c "
from mdmsearch.search.gpus import trial_resources; from mdmsearch.search.spec import SearchSpec
import torch; print(trial_resources(SearchSpec.model_validate({'study': 'x'}), cluster_gpus=torch.cuda.device_count()))"

python benchmarks/gpu_check.py compose "$WORK" || failed=1
echo "work files in $WORK"
exit "$failed"
