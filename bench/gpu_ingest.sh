#!/usr/bin/env bash
# Ingest benchmarks on the lent GPU machine (`device`): the same ratios as on CPU,
# with CUDA and fp16 autocast (embedding.py turns it on for cuda devices), then the
# Ray engine against the local engine (bench_engines.py; multi-GPU: one actor per GPU).
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
# The Ray engine on the same machine: one model actor per GPU (RAIOX_RAY_GPUS_PER_ACTOR
# =0.5 for two per GPU), read + decode tasks on the CPUs; against the local engine,
# which drives one GPU. Needs the extra: pip install -e '.[ray]'. RAY_ENGINES=0 skips.
if [[ "${RAY_ENGINES:-1}" != 0 ]]; then
  "$PY" -c "import torch; print(torch.cuda.device_count(), 'GPU(s) for the Ray engine')" >&2
  "$PY" bench/bench_engines.py --device cuda --model ViT-B-32 --batch-size 128 \
    --images "${RAY_IMAGES:-4096}" --size 1000x800 --work "$WORK" \
    > "$WORK/gpu_engines.json" 2> >(tee "$WORK/gpu_engines.txt" >&2)
  cat "$WORK/gpu_engines.json"
fi
if [[ -n "${OUT:-}" ]]; then cp "$WORK"/gpu_*.json "$WORK"/gpu_*.txt "$OUT/"; fi
