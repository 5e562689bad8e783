"""The Ray engine against the local engine: the same `raiox ingest` of the same
catalogue, each run a fresh CLI process with its own embedded PostgreSQL. Prints
one JSON object on stdout and a short table on stderr.

  local          --engine local (decode threads, the model in the main thread)
  ray_own        --engine ray, starting (and stopping) its own local Ray instance:
                 what a one-machine user pays
  ray_joined     --engine ray joining a Ray instance already running (started by
                 this script): what a cluster user pays per job

  python bench/bench_engines.py                          # 256 images 1000x800, CPU
  python bench/bench_engines.py --images 64 --model raiox-tiny
  python bench/bench_engines.py --device cuda --images 2048 --batch-size 128   # GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from raiox_cli.training import synth

RUNS = ("local", "ray_own", "ray_joined")


def _catalogue(root: Path, count: int, size: tuple[int, int], views: int = 4) -> Path:
    """A synthetic catalogue of `count` images (cached between runs by name)."""
    marker = root / ".complete"
    if not marker.exists():
        systems = max(1, -(-count // views))
        info = synth.make_catalogue(root, systems=systems, views=views, queries=0, size=size)
        for path in info.catalogue_files[count:]:
            path.unlink()
        marker.write_text("ok")
    return root / "catalogue"


def _ingest(args: argparse.Namespace, catalogue: Path, engine: str, **env: str) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(dir=args.work))
    environ = {
        **os.environ,
        "RAIOX_HOME": str(home),
        "RAIOX_MODEL": args.model,
        "RAIOX_PRETRAINED": "none",
        "RAIOX_DEVICE": args.device,
        "RAIOX_BATCH_SIZE": str(args.batch_size),
        **env,
    }
    for name in ("RAIOX_DATABASE_URL", *([] if "RAY_ADDRESS" in env else ["RAY_ADDRESS"])):
        environ.pop(name, None)
    cli = [sys.executable, "-m", "raiox_cli"]
    subprocess.run([*cli, "init-db"], env=environ, check=True, capture_output=True)
    command = [*cli, "ingest", str(catalogue), "--json", "--no-store", "--engine", engine]
    start = time.perf_counter()
    done = subprocess.run(command, env=environ, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{engine} ingest failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "embedded": report["embedded"],
        "wall_s": round(wall, 2),
        "core_s": report["elapsed_s"],
        "images_per_s_wall": round(report["embedded"] / wall, 2),
        "images_per_s_core": report["images_per_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", default="1000x800", help="WxH of the synthetic PNGs")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default=",".join(RUNS), help="comma list of runs")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "raiox-bench")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    width, _, height = args.size.partition("x")
    catalogue = _catalogue(
        args.work / f"engines-{args.images}-{args.size}", args.images, (int(width), int(height))
    )
    wanted = args.only.split(",")
    result: dict[str, Any] = {
        "images": args.images,
        "size": args.size,
        "model": args.model,
        "batch_size": args.batch_size,
        "device": args.device,
        "cpus": os.cpu_count(),
    }
    if "local" in wanted:
        result["local"] = _ingest(args, catalogue, "local")
    if "ray_own" in wanted:
        result["ray_own"] = _ingest(args, catalogue, "ray")
    if "ray_joined" in wanted:
        import ray

        start = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False)
        result["ray_start_s"] = round(time.perf_counter() - start, 2)
        try:
            address = ray.get_runtime_context().gcs_address
            result["ray_joined"] = _ingest(args, catalogue, "ray", RAY_ADDRESS=address)
        finally:
            ray.shutdown()
    if "local" in result:
        for run in ("ray_own", "ray_joined"):
            if run in result:
                result[f"{run}_over_local_wall"] = round(
                    result[run]["wall_s"] / result["local"]["wall_s"], 2
                )
    print(json.dumps(result, indent=2))
    _table(result)


def _table(r: dict[str, Any]) -> None:
    print(f"{r['images']} images {r['size']}, {r['model']}, {r['device']}", file=sys.stderr)
    for run in RUNS:
        if run in r:
            x = r[run]
            ratio = r.get(f"{run}_over_local_wall")
            extra = f"  ({ratio:.2f}x local's wall time)" if ratio else ""
            print(
                f"{run:<11} {x['wall_s']:>7.1f} s wall, {x['images_per_s_wall']:>6.1f} img/s "
                f"with process start; {x['images_per_s_core']:>6.1f} img/s in ingest{extra}",
                file=sys.stderr,
            )
    if "ray_start_s" in r:
        print(f"starting the joined Ray instance: {r['ray_start_s']:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
