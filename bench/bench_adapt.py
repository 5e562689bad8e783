"""`raiox adapt` on the synthetic catalogue: does training from scratch (or
fine-tuning) make search find the right implant? Prints one JSON object on stdout
and a short table on stderr.

The synthetic generator draws `--systems` implant systems with `--views` clean
catalogue views each and `--queries` X-ray-like query views (rotation, scale,
crops, blur, noise, gamma, flips, neighbouring teeth and crowns). A fraction of the
implants (`--holdout-implants`) is held out of training entirely; every query is
held out of training and only validates (`raiox adapt --val-labels`). The curve is
the run's validation history: top-1/top-3/MRR against training minutes (and CPU
seconds and steps, since wall time on a shared machine is noisy) for queries of
implants seen in training ("xrays") and of implants held out ("unseen"). After
training, the catalogue is switched with `--apply --force` and `raiox eval` measures
the queries through the real search path.

  python bench/bench_adapt.py                          # raiox-small from scratch, 30 min cap
  python bench/bench_adapt.py --steps 300 --minutes 10          # a quicker look
  python bench/bench_adapt.py --device cuda --model ViT-B-32 --pretrained laion2b_s34b_b79k \\
      --train last --batch-size 96                              # GPU (bench/gpu_adapt.sh)

Each run uses its own embedded PostgreSQL under --work (a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _machine import cpu_model

from raiox_cli.training import synth


def _raiox(args: list[str], env: dict[str, str], *, stdout: bool = True) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "raiox_cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=None if not stdout else subprocess.PIPE,
        text=True,
    )
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stderr or "")
        raise SystemExit(f"raiox {args[0]} exited {proc.returncode}")
    return proc.stdout


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _row(m: dict[str, Any] | None) -> str:
    if not m or not m.get("n"):
        return "      -      -      -"
    return f"{m['top1']:6.3f} {m['top3']:6.3f} {m['mrr']:6.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", type=int, default=24)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--size", default="256x320", help="synthetic image size WxH")
    parser.add_argument("--holdout-implants", type=float, default=0.25)
    parser.add_argument("--model", default="raiox-small")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--train", default=None, help="last, all or lora (adapt's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--minutes", type=float, default=30.0, help="adapt --max-minutes")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=72)
    parser.add_argument("--views-per-implant", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--patience", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="keep data and runs here")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="raiox-bench-adapt-"))
    width, _, height = args.size.partition("x")
    data = work / "synth"
    if not (data / ".complete").exists():
        synth.make_catalogue(
            data,
            systems=args.systems,
            views=args.views,
            queries=args.queries,
            size=(int(width), int(height)),
            seed=args.seed,
        )
        (data / ".complete").write_text("ok")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAIOX_")}
    env.update(
        RAIOX_HOME=str(work / "home"),
        RAIOX_MODEL=args.model,
        RAIOX_PRETRAINED=args.pretrained,
        RAIOX_DEVICE=args.device,
    )
    _raiox(["init-db"], env)
    _raiox(["ingest", str(data / "catalogue"), "--json"], env)

    adapt_args = [
        "adapt",
        "--val-labels",
        str(data / "queries"),
        "--holdout-implants",
        str(args.holdout_implants),
        "--steps",
        str(args.steps),
        "--max-minutes",
        str(args.minutes),
        "--batch-size",
        str(args.batch_size),
        "--views",
        str(args.views_per_implant),
        "--patience",
        str(args.patience),
        "--seed",
        str(args.seed),
        "--progress",
        "--json",
        "--apply",
        "--force",
    ]
    for flag, value in (
        ("--train", args.train),
        ("--lr", args.lr),
        ("--eval-every", args.eval_every),
    ):
        if value is not None:
            adapt_args += [flag, str(value)]
    started, cpu_started = time.perf_counter(), _children_cpu_s()
    report = json.loads(_raiox(adapt_args, env, stdout=False))
    wall_s, cpu_s = time.perf_counter() - started, _children_cpu_s() - cpu_started
    card = report["card"]
    eval_env = {**env, "RAIOX_MODEL": card["architecture"], "RAIOX_WEIGHTS": report["weights"]}
    evaluated = json.loads(_raiox(["eval", str(data / "queries"), "--json"], eval_env))

    result = {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "device": card["device"],
            "load_average": os.getloadavg(),
        },
        "setup": {
            "systems": args.systems,
            "views": args.views,
            "queries_per_implant": args.queries,
            "size": args.size,
            "model": args.model,
            "pretrained": args.pretrained,
            "held_out_implants": card["data"]["held_out_implants"],
        },
        "hyperparameters": card["hyperparameters"],
        "before": card["metrics"]["before"],
        "after": card["metrics"]["after"],
        "curve": [
            {
                "step": h["step"],
                "minutes": h["minutes"],
                "cpu_s": h["cpu_s"],
                "loss": h["loss"],
                "seen": h["metrics"]["xrays"],
                "unseen": h["metrics"]["unseen"],
            }
            for h in card["history"]
        ],
        "training": card["training"],
        "command": {"wall_s": round(wall_s, 1), "cpu_s": round(cpu_s, 1)},
        "eval_after_apply": {
            k: evaluated[k] for k in ("model_id", "queries", "top1", "top3", "top5", "mrr")
        },
        "model_id": report["model_id"],
    }
    print(json.dumps(result, indent=1))

    err = sys.stderr
    err.write(f"\n{args.model} ({args.pretrained}) on {card['device']}\n")
    err.write("queries of implants      seen: top-1  top-3    MRR | unseen: top-1  top-3    MRR\n")
    for label, metrics in (("before", result["before"]), ("after", result["after"])):
        err.write(
            f"{label:>24}       {_row(metrics['xrays'])} |         {_row(metrics['unseen'])}\n"
        )
    err.write(
        "\n  step   min   CPU s    loss |  seen: top-1  top-3    MRR"
        " | unseen: top-1  top-3    MRR\n"
    )
    for point in result["curve"]:
        err.write(
            f"{point['step']:6d} {point['minutes']:5.1f} {point['cpu_s']:7.0f} "
            f"{point['loss'] or 0:7.3f} |        {_row(point['seen'])} |         "
            f"{_row(point['unseen'])}\n"
        )
    t = card["training"]
    err.write(
        f"\n{t['steps']} steps ({t['stopped']}), best at {t['best_step']}; training "
        f"{t['wall_s'] / 60:.1f} min wall, {t['cpu_s'] / 60:.1f} CPU min; raiox eval after "
        f"--apply (all {evaluated['queries']} queries, TTA {evaluated['tta']}): top-1 "
        f"{evaluated['top1']:.3f}, MRR {evaluated['mrr']:.3f}\n"
    )


if __name__ == "__main__":
    main()
