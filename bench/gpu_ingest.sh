#!/usr/bin/env bash
# Ingest benchmarks on the lent GPU machine (`device`), in each precision: the same
# ratios as on CPU with CUDA in fp32 and fp16 (torch autocast, RAIOX_PRECISION=fp16),
# and int8 (ONNX Runtime on the machine's CPUs, for comparison with its GPU), then the
# Ray engine against the local engine (bench_engines.py; multi-GPU: one actor per GPU).
# Usage: bench/gpu_ingest.sh [extra bench_ingest.py options]
#   PRECISIONS="fp32 fp16 int8" (default) picks which run; RAY_ENGINES=0 skips Ray.
# Prints the JSON results on stdout and the tables on stderr; copies them to $OUT if set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" >&2
WORK="${WORK:-$(mktemp -d)}"
mkdir -p "$WORK"
common=(
  --model ViT-B-32 --images 2048 --size 1000x800 --workers "$(nproc)" --work "$WORK"
)
for precision in ${PRECISIONS:-fp32 fp16 int8}; do
  case "$precision" in
    int8) # ONNX Runtime runs int8 on the CPU: the GPU machine's cores, batch 32
      args=(--device cpu --backend onnx --precision int8 --batch-size 32 --images 512
            --only model_only,ingest,breakdown) ;;
    *)
      args=(--device cuda --backend torch --precision "$precision" --batch-size 128
            --loop-images 256 --unchanged-images 2000 --rss-images 200,2000
            --only model_only,ingest,breakdown,loop,unchanged) ;;
  esac
  "$PY" bench/bench_ingest.py "${common[@]}" "${args[@]}" "$@" \
    > "$WORK/gpu_ingest_$precision.json" 2> >(tee "$WORK/gpu_ingest_$precision.txt" >&2)
  cat "$WORK/gpu_ingest_$precision.json"
done
# Cosine of fp16 (and bf16) autocast to fp32 on the GPU: they share fp32's model id,
# so a catalogue built on the GPU is searched on a CPU; this is the drift that allows.
"$PY" - > "$WORK/gpu_precision_drift.json" <<'PYEOF'
import json
import numpy as np
from dataclasses import replace
from raiox_cli import embedding
from raiox_cli.embedding import precision
samples = precision.synthetic_samples()
spec = embedding.ModelSpec("ViT-B-32", "none", None, "cuda", "torch")
fp32 = embedding.load_embedder(spec).embed_images([s.image for s in samples])
out = {}
for half in ("fp16", "bf16"):
    got = embedding.load_embedder(replace(spec, precision=half)).embed_images([s.image for s in samples])
    figures = precision.parity(fp32, got, [s.label for s in samples], source="synthetic", judge_agreement=False)
    out[half] = figures.to_dict()
print(json.dumps(out))
PYEOF
cat "$WORK/gpu_precision_drift.json"
if [[ "${RAY_ENGINES:-1}" != 0 ]]; then
  "$PY" -c "import torch; print(torch.cuda.device_count(), 'GPU(s) for the Ray engine')" >&2
  "$PY" bench/bench_engines.py --device cuda --model ViT-B-32 --batch-size 128 \
    --images "${RAY_IMAGES:-4096}" --size 1000x800 --work "$WORK" \
    > "$WORK/gpu_engines.json" 2> >(tee "$WORK/gpu_engines.txt" >&2)
  cat "$WORK/gpu_engines.json"
fi
if [[ -n "${OUT:-}" ]]; then cp "$WORK"/gpu_*.json "$WORK"/gpu_*.txt "$OUT/"; fi
