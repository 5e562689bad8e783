"""Does a catalogue rendered from 3D models find implants better than 2 clean views?

Synthetic implants (synth.py's designs as 3D meshes, synth3d.py) give two catalogues
of the same implants:
  A: 2 clean 2D views per implant (synth.py, today's catalogue);
  B: `raiox render` of each implant's model (TURNSxTILTS views, each mirrored).
Both are searched with the same labelled queries: renders at random turns and
tilts (up to 25 degrees either way), rolled, in bone, beside a tooth and under a
crown, blurred and noisy ("3d"), and synth.py's own 2D X-ray-like queries ("2d").
Each catalogue runs the real commands on its own embedded PostgreSQL: init-db,
ingest, eval (before), `raiox adapt` with the same model, steps and batch (validated
on a separate set of query renders, --apply), eval (after). The model is raiox-small
trained from scratch (random weights before adapt: chance level). Prints one JSON
object on stdout and a table on stderr.

  OMP_NUM_THREADS=1 python bench/bench_render.py                 # 24 implants, 300 steps
  python bench/bench_render.py --systems 8 --steps 30 --views 4x1  # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from raiox_cli.catalogue import render
from raiox_cli.training import synth, synth3d


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _raiox(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "raiox_cli", *args], env=env, capture_output=True, text=True
    )
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"raiox {args[0]} exited {proc.returncode}")
    return proc.stdout


def _queries(root: Path, designs: list[synth.ImplantDesign], n: int, seed: int, size: int) -> Path:
    """Labelled query renders: root/<Manufacturer>/<Implant>/q_XX.png."""
    for d in designs:
        folder = root / d.manufacturer / d.name
        folder.mkdir(parents=True, exist_ok=True)
        for q in range(n):
            path = folder / f"q_{q:02d}.png"
            if not path.is_file():
                synth3d.query_render(d, seed=seed, index=q, size=size).save(path)
    return root


def _metrics(report: dict[str, Any]) -> dict[str, float]:
    return {k: report[k] for k in ("queries", "top1", "top3", "mrr")}


def _run_catalogue(
    name: str,
    catalogue: Path,
    home: Path,
    queries: dict[str, Path],
    val: Path,
    args: argparse.Namespace,
    results: dict[str, Any],
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAIOX_")}
    env.update(
        RAIOX_HOME=str(home),
        RAIOX_MODEL=args.model,
        RAIOX_PRETRAINED="none",
        RAIOX_DEVICE="cpu",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
    )
    started = time.perf_counter()
    _raiox(["init-db"], env)
    ingested = json.loads(_raiox(["ingest", str(catalogue), "--json"], env))
    before = {
        q: _metrics(json.loads(_raiox(["eval", str(path), "--json"], env)))
        for q, path in queries.items()
    }
    adapt_args = [
        "adapt",
        "--val-labels",
        str(val),
        "--holdout-implants",
        "0",
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--views",
        "2",
        "--eval-every",
        str(max(1, args.steps // 6)),
        "--patience",
        "100",
        "--seed",
        str(args.seed),
        "--json",
        "--apply",
        "--force",
    ]
    report = json.loads(_raiox(adapt_args, env))
    card = report["card"]
    after_env = {**env, "RAIOX_MODEL": card["architecture"], "RAIOX_WEIGHTS": report["weights"]}
    after = {
        q: _metrics(json.loads(_raiox(["eval", str(path), "--json"], after_env)))
        for q, path in queries.items()
    }
    results[name] = {
        "images": ingested.get("new", 0) + ingested.get("unchanged", 0),
        "before": before,
        "after": after,
        "training": card["training"],
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", type=int, default=24)
    parser.add_argument("--views", default="8x2", help="catalogue B: TURNSxTILTS (mirrored)")
    parser.add_argument("--queries", type=int, default=4, help="test queries per implant")
    parser.add_argument("--val", type=int, default=2, help="validation queries per implant")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--model", default="raiox-small")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="keep data and runs here")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="raiox-bench-render-"))
    designs = synth.design_systems(args.systems, args.seed)
    size = args.size
    flat = synth.make_catalogue(
        work / "A",
        systems=args.systems,
        views=2,
        queries=args.queries,
        seed=args.seed,
        size=(size, size),
    )
    synth3d.write_models(work / "models", designs)
    turns, tilts = render.parse_views(args.views)
    settings = render.RenderSettings(turns=turns, tilts=tilts, size=size, seed=args.seed)
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_self0 = time.process_time()
    started = time.perf_counter()
    rendered = render.render_catalogue([work / "models"], work / "B" / "catalogue", settings)
    render_wall = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    render_cpu = (
        cpu1.ru_utime
        + cpu1.ru_stime
        - cpu0.ru_utime
        - cpu0.ru_stime
        + time.process_time()
        - cpu_self0
    )
    queries = {
        "3d": _queries(work / "queries-3d", designs, args.queries, args.seed + 1, size),
        "2d": flat.queries_dir,
    }
    val = _queries(work / "val-3d", designs, args.val, args.seed + 2, size)

    results: dict[str, Any] = {}
    runs = [
        threading.Thread(
            target=_run_catalogue,
            args=(name, catalogue, work / name / "home", queries, val, args, results),
        )
        for name, catalogue in (("A", flat.catalogue), ("B", work / "B" / "catalogue"))
    ]
    for run in runs:
        run.start()
    for run in runs:
        run.join()

    out = {
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "setup": {
            "systems": args.systems,
            "catalogue_A": "2 clean 2D views per implant (synth.py)",
            "catalogue_B": f"raiox render --views {args.views} (+ mirrors)",
            "queries_per_implant": args.queries,
            "validation_renders_per_implant": args.val,
            "size": size,
            "model": f"{args.model}, trained from scratch (random weights before adapt)",
            "steps": args.steps,
            "batch_size": args.batch_size,
        },
        "render": {
            "images": rendered.images,
            "wall_s": round(render_wall, 1),
            "cpu_s": round(render_cpu, 1),
        },
        "catalogues": results,
    }
    print(json.dumps(out, indent=1))
    err = sys.stderr
    err.write(f"\n{args.systems} implants, {args.model} from scratch, {args.steps} steps\n")
    err.write("catalogue  images  queries | before top-1 top-3 | after top-1 top-3\n")
    for name in ("A", "B"):
        r = results.get(name)
        if not r:
            continue
        for q in queries:
            b, a = r["before"][q], r["after"][q]
            err.write(
                f"{name:>9} {r['images']:7d} {q:>8} |       {b['top1']:.3f} {b['top3']:.3f} |"
                f"      {a['top1']:.3f} {a['top3']:.3f}\n"
            )


if __name__ == "__main__":
    main()
