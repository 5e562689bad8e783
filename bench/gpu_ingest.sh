#!/usr/bin/env bash
# Ingest benchmarks on the lent GPU machine (`device`): the same ratios as on CPU,
# with CUDA and fp16 autocast (embedding.py turns it on for cuda devices).
# Usage: bench/gpu_ingest.sh [extra bench_ingest.py options]
# Prints the JSON result on stdout and the table on stderr; copies both to $OUT if set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" >&2
WORK="${WORK:-$(mktemp -d)}"
args=(
  --device cuda --model ViT-B-32 --batch-size 128 --images 2048 --size 1000x800
  --workers "$(nproc)" --loop-images 256 --unchanged-images 2000 --rss-images 200,2000
  --only model_only,ingest,loop,unchanged --work "$WORK" "$@"
)
"$PY" bench/bench_ingest.py "${args[@]}" > "$WORK/gpu_ingest.json" 2> >(tee "$WORK/gpu_ingest.txt" >&2)
cat "$WORK/gpu_ingest.json"
if [[ -n "${OUT:-}" ]]; then cp "$WORK/gpu_ingest.json" "$WORK/gpu_ingest.txt" "$OUT/"; fi
