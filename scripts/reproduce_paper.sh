#!/usr/bin/env bash
# Reproduce the DiTAS paper's setting end to end (docs/METHOD.md §10):
#   DiT-XL/2, ImageNet 256x256 and 512x512, 50 and 100 DDPM steps, cfg 1.5, 10K samples,
#   W4A8 and W8A8, both schemes (ditas, reference), plus the FP baseline;
#   QuantDiT.py (calibrate at the sampling step count) -> sample_merge_TAS.py over torchrun on all
#   GPUs -> evaluator.py (ADM Inception features) -> scripts/collect_table.py -> table.md.
#
# Needs (paths are flags / environment variables, defaults in brackets):
#   pretrained_models/DiT-XL-2-256x256.pt, pretrained_models/DiT-XL-2-512x512.pt   [--ckpt-dir pretrained_models]
#   ADM reference batches VIRTUAL_imagenet256_labeled.npz, VIRTUAL_imagenet512.npz [--ref-dir pretrained_models]
#   the VAE stabilityai/sd-vae-ft-ema (Hugging Face cache or a local folder)      [--vae ema]
#   torch-fidelity + its Inception weights for evaluator.py (DITAS_INCEPTION_WEIGHTS)
#
# Usage:
#   scripts/reproduce_paper.sh [--out DIR] [--nproc N] [--num-samples 10000] [--sizes "256 512"]
#       [--steps "50 100"] [--bits "W4A8 W8A8"] [--schemes "ditas reference"] [--batch 32] [--dry-run]
#   scripts/reproduce_paper.sh --smoke      # the same code path on CPU in about a minute: the bundled
#                                           # digits DiT (or --smoke-ckpt/--smoke-model), 16 px, tiny N
#                                           # and steps, digits features, reduced LoRA
# Every stage is skipped when its output exists (quantized checkpoint dir, .npz, metrics JSON), so
# an interrupted run resumes; sample_merge_TAS.py also resumes inside a run from its shards.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"

OUT="results/paper"
NPROC=""
NUM_SAMPLES=10000
SIZES="256 512"
STEPS="50 100"
BITS="W4A8 W8A8"
SCHEMES="ditas reference"
BATCH=32
CKPT_DIR="pretrained_models"
REF_DIR="pretrained_models"
VAE="ema"
CFG=1.5
SEED=0
DRY_RUN=0
SMOKE=0
SMOKE_CKPT="assets/dit_t2_digits16.safetensors"
SMOKE_MODEL="DiT-T/2"
QUANT_EXTRA=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --nproc) NPROC="$2"; shift 2 ;;
    --num-samples) NUM_SAMPLES="$2"; shift 2 ;;
    --sizes) SIZES="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --bits) BITS="$2"; shift 2 ;;
    --schemes) SCHEMES="$2"; shift 2 ;;
    --batch) BATCH="$2"; shift 2 ;;
    --ckpt-dir) CKPT_DIR="$2"; shift 2 ;;
    --ref-dir) REF_DIR="$2"; shift 2 ;;
    --vae) VAE="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --smoke) SMOKE=1; shift ;;
    --smoke-ckpt) SMOKE_CKPT="$2"; shift 2 ;;
    --smoke-model) SMOKE_MODEL="$2"; shift 2 ;;
    --quant-extra) read -r -a QUANT_EXTRA <<< "$2"; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [[ $SMOKE == 1 ]]; then
  # Same stages and scripts, on CPU: digits model at 16 px, tiny N and steps, digits features.
  [[ $OUT == results/paper ]] && OUT="results/paper-smoke"
  [[ $NUM_SAMPLES == 10000 ]] && NUM_SAMPLES=16
  [[ $SIZES == "256 512" ]] && SIZES="16"
  [[ $STEPS == "50 100" ]] && STEPS="3"
  [[ $BATCH == 32 ]] && BATCH=8
  NPROC="${NPROC:-1}"
  FEATURES="digits"
  VAE="none"
  [[ ${#QUANT_EXTRA[@]} -eq 0 ]] && QUANT_EXTRA=(--lora-rank 4 --lora-iters 2 --no-preview)
  DEVICE=(--device cpu)
else
  FEATURES="inception"
  DEVICE=()
fi
if [[ -z $NPROC ]]; then
  NPROC=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [[ $NPROC -ge 1 ]] || NPROC=1
fi

run() {  # echo a command, then run it unless --dry-run
  echo "+ $*"
  [[ $DRY_RUN == 1 ]] || "$@"
}

sampler() {  # sample_merge_TAS.py over torchrun on NPROC processes (plain python for one)
  if [[ $NPROC -gt 1 ]]; then
    run "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" sample_merge_TAS.py "$@"
  else
    run "$PY" sample_merge_TAS.py "$@"
  fi
}

model_flags() {  # model_flags SIZE -> the flags that pick the FP model
  local size=$1
  if [[ $SMOKE == 1 ]]; then
    echo --model "$SMOKE_MODEL" --ckpt "$SMOKE_CKPT" --image-size "$size" --num-classes 10 --vae none
  else
    echo --model DiT-XL/2 --ckpt "$CKPT_DIR/DiT-XL-2-${size}x${size}.pt" --image-size "$size" --num-classes 1000 \
      --vae "$VAE"
  fi
}

ref_batch() {
  local size=$1
  if [[ $SMOKE == 1 ]]; then echo assets/digits_ref.npz
  elif [[ $size == 256 ]]; then echo "$REF_DIR/VIRTUAL_imagenet256_labeled.npz"
  else echo "$REF_DIR/VIRTUAL_imagenet${size}.npz"
  fi
}

one_npz() {  # the .npz sample_merge_TAS.py wrote into a sample dir
  local found
  found=$(ls "$1"/*.npz 2>/dev/null || true)
  if [[ $DRY_RUN == 1 ]]; then echo "$1/SAMPLES.npz"; return; fi
  if [[ $(echo "$found" | grep -c .) -ne 1 ]]; then echo "error: expected one .npz in $1, found: $found" >&2; exit 1; fi
  echo "$found"
}

evaluate() {  # evaluate SIZE SAMPLE_DIR METRICS_JSON
  local npz
  npz=$(one_npz "$2")
  if [[ -f $3 ]]; then echo "= $3 exists"; return; fi
  run "$PY" evaluator.py "$(ref_batch "$1")" "$npz" --features "$FEATURES" --json "$3" "${DEVICE[@]}"
}

if [[ $SMOKE == 0 && $DRY_RUN == 0 ]]; then  # fail early, before hours of GPU time, on a missing input
  for size in $SIZES; do
    for f in "$CKPT_DIR/DiT-XL-2-${size}x${size}.pt" "$(ref_batch "$size")"; do
      [[ -f $f ]] || { echo "error: $f not found (see docs/REPRODUCE.md)" >&2; exit 2; }
    done
  done
fi

mkdir -p "$OUT/metrics"
echo "reproduce_paper: out=$OUT nproc=$NPROC N=$NUM_SAMPLES sizes=[$SIZES] steps=[$STEPS] bits=[$BITS]" \
     "schemes=[$SCHEMES] features=$FEATURES$([[ $SMOKE == 1 ]] && echo ' (smoke)')"
for size in $SIZES; do
  read -r -a MODEL <<< "$(model_flags "$size")"
  for steps in $STEPS; do
    common=(--num-sampling-steps "$steps" --cfg-scale "$CFG" --num-fid-samples "$NUM_SAMPLES"
            --per-proc-batch-size "$BATCH" --global-seed "$SEED" "${DEVICE[@]}")
    tag="${size}px-${steps}steps"
    # FP baseline
    dir="$OUT/samples/$tag-fp"
    sampler "${MODEL[@]}" "${common[@]}" --sample-dir "$dir"
    evaluate "$size" "$dir" "$OUT/metrics/$tag-fp.json"
    for bits in $BITS; do
      w=${bits#W}; w=${w%%A*}; a=${bits#*A}
      for scheme in $SCHEMES; do
        name="$tag-$bits-$scheme"
        qdir="$OUT/ckpt/$name"
        if [[ -f $qdir/quant_config.json ]]; then
          echo "= $qdir exists"
        else  # calibration at the sampling step count, the paper's setting
          run "$PY" QuantDiT.py "${MODEL[@]}" --num-sampling-steps "$steps" --weight-bit "$w" --act-bit "$a" \
            --scheme "$scheme" --seed 1 --out "$qdir" --overwrite "${DEVICE[@]}" "${QUANT_EXTRA[@]}"
        fi
        dir="$OUT/samples/$name"
        sampler --path "$qdir" "${common[@]}" --sample-dir "$dir"
        evaluate "$size" "$dir" "$OUT/metrics/$name.json"
      done
    done
  done
done
run "$PY" scripts/collect_table.py "$OUT/metrics" --out "$OUT/table.md"
