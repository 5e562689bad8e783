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

`--speed` measures render speed alone instead: `raiox render MODEL --views 12x3
--size 512 --force --jobs J` through the real CLI, per mesh and worker count, CPU
seconds (the process and its workers) first, then wall time with the load average,
and one view's projection alone in this process. Meshes: a CAD-style cylinder (r 2
x 10 mm, 25,008 sections, 100,032 faces, its sides 50k slivers as long as the
cylinder: `cylinder-sliver`) and synth.py's first two designs as threaded meshes
(`threaded`, 92,544 and 121,728 faces).

  python bench/bench_render.py --speed                           # both, 1 and 2 workers
  python bench/bench_render.py --speed --mesh cylinder-sliver --jobs 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _machine import cpu_model

from raiox_cli.catalogue import render
from raiox_cli.training import synth, synth3d


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


def _speed_meshes(which: str, folder: Path) -> list[Path]:
    import trimesh

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    if which in ("cylinder-sliver", "all"):
        path = folder / "cylinder_sliver.stl"
        trimesh.creation.cylinder(radius=2.0, height=10.0, sections=25008).export(path)
        paths.append(path)
    if which in ("threaded", "all"):
        paths += synth3d.write_models(folder / "threaded", synth.design_systems(2))
    return paths


def _projection_cpu(model: Path, size: int) -> dict[str, float]:
    """CPU seconds of one view's path lengths (supersampled as `raiox render` does)."""
    mesh = render.load_mesh(model)
    settings = render.RenderSettings(size=size)
    out = {}
    for turn, tilt in ((0, 0), (30, 20)):
        started = time.process_time()
        render.lengths_view(mesh, turn, tilt, size, settings.supersample)
        out[f"rot{turn:03d}_tilt{tilt:02d}"] = round(time.process_time() - started, 3)
    return out


def _timed_cli(args: list[str]) -> dict[str, Any]:
    """Run `raiox ARGS` as a child; its CPU (with its workers), peak memory and wall."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAIOX_")}
    load_before = os.getloadavg()
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "raiox_cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr.read().decode() if proc.stderr else "")
        raise SystemExit(f"raiox {args[0]} exited {proc.returncode}")
    return {
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "user_s": round(usage.ru_utime, 2),
        "sys_s": round(usage.ru_stime, 2),
        "max_rss_mb": round(usage.ru_maxrss / 1024),
        "wall_s": round(wall, 2),
        "load_average": [load_before, os.getloadavg()],
    }


def speed(args: argparse.Namespace) -> None:
    work = args.work or Path(tempfile.mkdtemp(prefix="raiox-bench-render-speed-"))
    views = args.views or "12x3"
    render.parse_views(views)  # a usage error before any work
    results = []
    import trimesh

    for model in _speed_meshes(args.mesh, work / "models"):
        faces = len(trimesh.load(model, force="mesh").faces)
        entry: dict[str, Any] = {
            "model": model.stem,
            "faces": faces,
            "projection_cpu_s": _projection_cpu(model, args.size),
        }
        for jobs in [int(j) for j in args.jobs.split(",")]:
            out = work / f"out-{model.stem}-{jobs}"
            cli = ["render", str(model), "--out", str(out), "--views", views]
            cli += ["--size", str(args.size), "--force", "--jobs", str(jobs)]
            run = _timed_cli(cli)
            run["images"] = len(list(out.rglob("*.png")))
            entry[f"jobs_{jobs}"] = run
        results.append(entry)
        sys.stderr.write(json.dumps(entry) + "\n")
    out = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "setup": {"views": f"{views} (+ mirrors)", "size": args.size, "supersample": 2},
        "results": results,
    }
    print(json.dumps(out, indent=1))
    err = sys.stderr
    err.write(f"\n{views} views + mirrors at {args.size} px, CPU s (wall s, load average)\n")
    for r in results:
        runs = [
            f"{k}: {v['cpu_s']} CPU s ({v['wall_s']} s, load {v['load_average'][0][0]:.1f})"
            for k, v in r.items()
            if k.startswith("jobs_")
        ]
        err.write(f"{r['model']:>20} {r['faces']:7d} faces | " + " | ".join(runs) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speed", action="store_true", help="render speed alone (see above)")
    parser.add_argument(
        "--mesh", choices=("cylinder-sliver", "threaded", "all"), default="all", help="--speed"
    )
    parser.add_argument("--jobs", default="1,2", help="--speed: worker counts, e.g. 1,2")
    parser.add_argument("--systems", type=int, default=24)
    parser.add_argument(
        "--views", default=None, help="catalogue B: TURNSxTILTS (mirrored) [8x2; --speed 12x3]"
    )
    parser.add_argument("--queries", type=int, default=4, help="test queries per implant")
    parser.add_argument("--val", type=int, default=2, help="validation queries per implant")
    parser.add_argument("--size", type=int, default=None, help="[256; --speed 512]")
    parser.add_argument("--model", default="raiox-small")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="keep data and runs here")
    args = parser.parse_args()
    if args.speed:
        args.size = args.size or 512
        speed(args)
        return
    args.views, args.size = args.views or "8x2", args.size or 256

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
            "cpu": cpu_model(),
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
