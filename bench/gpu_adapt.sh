#!/usr/bin/env bash
# bench_adapt.py on a GPU machine: ViT-B-32 fine-tuned with CUDA (AMP) on the same
# synthetic catalogue. Pretrained LAION weights when they are cached (the lent
# machines have no network: copy ~/.cache/huggingface there, or set RAIOX_WEIGHTS),
# else ViT-B-32 from random weights with --train all.
# Usage: bench/gpu_adapt.sh [extra bench_adapt.py options]
# Prints the JSON result on stdout and the table on stderr; copies both to $OUT if set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" >&2
WORK="${WORK:-$(mktemp -d)}"
mkdir -p "$WORK"
if HF_HUB_OFFLINE=1 "$PY" -c "import open_clip; open_clip.create_model_and_transforms('ViT-B-32', pretrained='laion2b_s34b_b79k')" >/dev/null 2>&1; then
  weights=(--pretrained laion2b_s34b_b79k --train last)
else
  echo "ViT-B-32 LAION weights not cached: training ViT-B-32 from random weights" >&2
  weights=(--pretrained none --train all)
fi
args=(
  --device cuda --model ViT-B-32 "${weights[@]}" --batch-size 96 --steps 2000
  --minutes 20 --work "$WORK" "$@"
)
HF_HUB_OFFLINE=1 "$PY" bench/bench_adapt.py "${args[@]}" > "$WORK/gpu_adapt.json" 2> >(tee "$WORK/gpu_adapt.txt" >&2)
cat "$WORK/gpu_adapt.json"
if [[ -n "${OUT:-}" ]]; then cp "$WORK/gpu_adapt.json" "$WORK/gpu_adapt.txt" "$OUT/"; fi
