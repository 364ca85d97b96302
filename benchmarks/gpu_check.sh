#!/usr/bin/env bash
# GPU verification for the model (issue 3), run once on a lent GPU machine from the repository root.
#
# That machine has its own python3 with torch/torchvision/numpy/pandas but no network, so it needs:
#   .whl/    py3.12 wheels of what it lacks (benchmarks/prepare_gpu_carry.sh downloads them)
#   .carry/public.tar.xz   the imported public dataset (data/public + data/public.dvc), made here with
#                          `cxr data import ../shared/data/covid-chestxray-dataset --name public`
# Results go to $OUT (default ./gpu-out): summary.txt, bench.jsonl, train5.json, eval_cpu.json,
# train_long.json, artifacts.tar.gz, log.txt. Each step runs on even if an earlier one failed.
set -u
# Knobs only for a CPU dry run of this script (defaults are the GPU check).
DEV=${CHECK_DEVICE:-cuda} ENC=${CHECK_ENCODER:-densenet121} SIZE=${CHECK_SIZE:-224} BATCH=${CHECK_BATCH:-64}
STEPS=${CHECK_STEPS:-50} EPOCHS=${CHECK_EPOCHS:-5} LONG=${CHECK_LONG_EPOCHS:-40}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
REPO=$PWD
LOG=$OUT/log.txt
SUM=$OUT/summary.txt
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 COLUMNS=120
step() { echo "== $(date -u +%T) $*" | tee -a "$SUM" >>"$LOG"; }

step "install carried wheels"
if [ -z "${SKIP_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 \
    || { echo "wheel install failed" | tee -a "$SUM"; exit 1; }
  export PYTHONPATH=/tmp/site:$REPO
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee -a "$SUM"
python3 -c "import torch, monai, mlflow, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'monai', monai.__version__, 'mlflow', mlflow.__version__, 'numpy', numpy.__version__, 'gpu', torch.cuda.get_device_name())" 2>&1 | tee -a "$SUM"
echo "cpu cores: $(nproc); code commit: $(git rev-parse HEAD 2>/dev/null || echo 'no .git on this machine')" | tee -a "$SUM"

step "unpack dataset"
PROJ=${CHECK_PROJECT:-/tmp/proj}
export CXR_PROJECT_ROOT=$PROJ CXR_HOME=$PROJ/.cxr
mkdir -p "$PROJ" && tar -xJf .carry/public.tar.xz -C "$PROJ" && ls "$PROJ/data" | tee -a "$SUM"

step "pytest -m gpu"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_model_units.py 2>&1 | tail -5 | tee -a "$SUM"

step "benchmark: synthetic arrays, densenet121 224 bf16 batch 64 (the issue's command)"
timeout 180 python3 benchmarks/train_throughput.py --device $DEV --image-size $SIZE --encoder $ENC \
  --batch-size $BATCH --steps $STEPS >>"$OUT/bench.jsonl" 2>>"$LOG"; tail -1 "$OUT/bench.jsonl" | tee -a "$SUM"

step "cxr train --dataset public --device cuda --epochs 5 (the issue's command)"
t0=$SECONDS
timeout 300 python3 -m app.cli train --dataset public --device $DEV --epochs $EPOCHS \
  --encoder $ENC --image-size $SIZE --json >"$OUT/train5.json" 2>>"$LOG"
echo "rc=$? wall_s=$((SECONDS - t0))" | tee -a "$SUM"; cut -c1-600 "$OUT/train5.json" | tee -a "$SUM"

step "evaluate the GPU-trained version 1 in a fresh CPU-only process (CUDA hidden)"
t0=$SECONDS
CUDA_VISIBLE_DEVICES= timeout 150 python3 -m app.cli evaluate --model-version 1 --dataset public --json \
  >"$OUT/eval_cpu.json" 2>>"$LOG"
echo "rc=$? wall_s=$((SECONDS - t0))" | tee -a "$SUM"
python3 - "$OUT/train5.json" "$OUT/eval_cpu.json" <<'EOF' 2>&1 | tee -a "$SUM"
import json, sys
t = json.load(open(sys.argv[1]))["evaluation"]
e = json.load(open(sys.argv[2]))
c = e["covid19_vs_rest"]
for k in ("auroc", "sensitivity", "specificity"):
    print(f"{k}: trained-on-GPU eval {t[k]['value']:.4f}  fresh CPU process {c[k]['value']:.4f}")
EOF

step "benchmark: the imported public dataset, same settings"
timeout 180 python3 benchmarks/train_throughput.py --device $DEV --image-size $SIZE --encoder $ENC \
  --batch-size $BATCH --steps $STEPS --dataset public >>"$OUT/bench.jsonl" 2>>"$LOG"; tail -1 "$OUT/bench.jsonl" | tee -a "$SUM"

step "longer real-data run: densenet121 224, up to 40 epochs, patience 8"
t0=$SECONDS
timeout 300 python3 -m app.cli train --dataset public --device $DEV --epochs $LONG \
  --encoder $ENC --image-size $SIZE --patience 8 --json \
  >"$OUT/train_long.json" 2>>"$LOG"
echo "rc=$? wall_s=$((SECONDS - t0))" | tee -a "$SUM"; cut -c1-600 "$OUT/train_long.json" | tee -a "$SUM"

step "collect evaluation artefacts"
(cd "$CXR_HOME" && find . \( -name 'evaluation.json' -o -name '*.png' -o -name 'test_predictions*' \) -size -2M -print0 \
  | tar -czf "$OUT/artifacts.tar.gz" --null -T -) && ls -la "$OUT" | tee -a "$SUM"
step "done"
