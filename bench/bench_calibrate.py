"""`raiox calibrate` on the synthetic catalogue: do the numbers hold on X-rays the
calibration never saw? Prints one JSON object on stdout and a table on stderr.

The synthetic generator draws `--systems` implant systems; the last `--unknown` of
them are left out of the catalogue, so their X-ray-like queries are X-rays of
implants not in the catalogue. The known implants' queries are split once (seeded):
`--labelled` of them may calibrate ("200 labelled X-rays"), the rest (1240 with the
defaults) only measure, with every unknown query. Two calibrations are compared at targets
0.8, 0.9 and 0.95: **day one** (the catalogue source alone: augmented catalogue
images, implants left out) and **labelled** (the labelled X-rays). Measured: set
coverage against the target, mean set size, ECE (15 bins) and Brier of the
probability on X-rays of catalogued implants before (raw top score as the
probability) and after with the ECE a perfectly calibrated probability would still
show (the floor), the out-of-catalogue false alarms, AUROC (of the statistic in use
and of the top score) and FPR at 95% TPR; then the labelled calibration again on
--splits random splits (mean and sd: one split is one draw).

Six unknown designs are too few to judge an AUROC by: one design that happens to
be a near-twin of a catalogued one moves it by several points, and which designs
are hard changes from model to model. `--more-unknown M` (30 by default) adds the
X-ray-like queries of M more designs, drawn from generator design no.
`--unknown-offset` on (never the catalogue's, the unknown or the extra ones), to
every out-of-catalogue measure; the AUROC of the run's own six is printed beside
it, with the 5-95% range over resampled designs.

  python bench/bench_calibrate.py --model raiox-tiny                 # random weights
  python bench/bench_calibrate.py --model raiox-small --adapt-steps 600 --val-xrays 10 \
      --patience 10                                                  # trained first
  python bench/bench_calibrate.py --model raiox-small --adapt-steps 1500 --val-xrays 10 \
      --patience 15 --splits 20 --extra-systems 300      # issue 21's figures (~17 min)

A second run with the same --work reuses its data and adapted model (setup.json).

With --adapt-steps the model is first trained from scratch on the catalogue
(`raiox adapt --apply --force`; queries never trained on; --val-xrays: other draws of
the generator choose its checkpoint and when it stops); the catalogue source then
uses only the implants adapt held out of training. Search runs without TTA (one
orientation, a third of the CPU) in both calibration and measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _machine import cpu_model

from raiox_cli.training import synth

TARGETS = (0.8, 0.9, 0.95)


def _raiox(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "raiox_cli", *args], env=env, stdout=subprocess.PIPE, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"raiox {args[0]} exited {proc.returncode}")
    return proc.stdout


def _more_unknown(args: argparse.Namespace) -> list[synth.ImplantDesign]:
    """--more-unknown designs, after every design the run draws otherwise."""
    start = args.unknown_offset
    return synth.design_systems(start + args.more_unknown, args.seed)[start:]


def _data(args: argparse.Namespace, work: Path) -> tuple[Path, Path, Path]:
    """(catalogue of the known implants, their queries, the unknown implants' queries)."""
    root = work / "synth"
    width, _, height = args.size.partition("x")
    if not (root / ".complete").exists():
        info = synth.make_catalogue(
            root,
            systems=args.systems,
            views=args.views,
            queries=args.queries,
            size=(int(width), int(height)),
            seed=args.seed,
        )
        kept = info.implants[: args.systems - args.unknown]
        synth._write_csv(info.csv, [implant.design for implant in kept])
        for implant in info.implants[args.systems - args.unknown :]:
            shutil.rmtree(implant.folder)  # not in the catalogue
            target = root / "unknown" / implant.design.manufacturer / implant.design.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(implant.queries[0].parent), str(target))
        (root / ".complete").write_text("ok")
    # A later run with more --queries adds the missing ones (the generator draws query
    # q of an implant the same way whatever the count; the catalogue is unchanged, so
    # an adapted model in --work stays valid: it never trained on queries).
    size = (int(width), int(height))

    def render_missing(
        folder: Path, design: synth.ImplantDesign, names: dict[str, int], query: bool
    ) -> None:
        """Each file name -> generator view number, drawn only where it is missing."""
        for name, view in names.items():
            path = folder / name
            if not path.exists():
                folder.mkdir(parents=True, exist_ok=True)
                picture = synth.render_view(
                    design, seed=args.seed, query=query, size=size, view=view
                )
                path.write_bytes(synth.png_bytes(picture))

    for design in synth.design_systems(args.systems, args.seed):
        for base in (root / "queries", root / "unknown"):
            folder = base / design.manufacturer / design.name
            if folder.is_dir():
                render_missing(
                    folder, design, {f"q_{q:02d}.png": q for q in range(args.queries)}, True
                )
    # Validation X-rays for adapt (--val-xrays): other draws of the same generator
    # (view numbers from 1000, never a measured query), so its early stopping and
    # checkpoint choice follow X-ray-like images rather than saturated catalogue views.
    kept = synth.design_systems(args.systems, args.seed)[: args.systems - args.unknown]
    for design in kept:
        folder = root / "val-xrays" / design.manufacturer / design.name
        names = {f"v_{v:02d}.png": 1000 + v for v in range(args.val_xrays)}
        render_missing(folder, design, names, True)
    # --extra-systems: more designs of the same generator, drawn after the catalogue's
    # and the unknown ones (never those), as catalogue-style views: `adapt
    # --extra-labels` trains on them and nothing searches them.
    extra = synth.design_systems(args.systems + args.extra_systems, args.seed)[args.systems :]
    for design in extra:
        folder = root / "extra" / design.manufacturer / design.name
        render_missing(folder, design, {f"view_{v:02d}.png": v for v in range(args.views)}, False)
    for design in _more_unknown(args):
        folder = root / f"unknown-more-{args.unknown_offset}" / design.manufacturer / design.name
        render_missing(folder, design, {f"q_{q:02d}.png": q for q in range(args.queries)}, True)
    return root / "catalogue", root / "queries", root / "unknown"


def _measure_row(m: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "coverage", "target", "mean_set_size", "empty_sets", "top1", "ece_raw_score", "ece",
        "ece_floor", "ece_all", "brier_raw_score", "brier", "false_alarm", "detected",
        "ooc_auroc", "ooc_auroc_top_score", "ooc_fpr_at_95tpr", "in_catalogue",
        "out_of_catalogue",
    )  # fmt: skip
    return {k: (round(m[k], 4) if isinstance(m[k], float) else m[k]) for k in keys}


def _resampled(known: list, unknown: list, args: argparse.Namespace) -> dict[str, Any]:
    """One split is one draw: the labelled calibration again on --splits random splits
    of the same queries (mean, sd, and how often within 3 points of the target)."""
    from raiox_cli.search import calibrate

    found: dict[str, Any] = {}
    for target in TARGETS:
        rows = []
        for split in range(args.splits):
            order = np.random.default_rng([args.seed, 7, split]).permutation(len(known))
            fitted = calibrate.fit(
                [known[i] for i in order[: args.labelled]], model_id="m", target=target,
                tta=False, source="labels", counts={}, seed=split,
            )  # fmt: skip
            rows.append(
                calibrate.measure(fitted, [known[i] for i in order[args.labelled :]] + unknown)
            )
        stat = {}
        for key in ("coverage", "mean_set_size", "ece", "ece_floor", "false_alarm", "ooc_auroc"):
            values = np.array([r[key] for r in rows if r[key] is not None], dtype=float)
            stat[key] = {
                "mean": round(float(values.mean()), 4),
                "sd": round(float(values.std()), 4),
            }
        cover = np.array([r["coverage"] for r in rows])
        stat["coverage_within_3_points"] = round(float(np.mean(np.abs(cover - target) <= 0.03)), 3)
        found[str(target)] = stat
    return found


def _shape(d: synth.ImplantDesign) -> np.ndarray:
    """A design as the X-ray shows it up to scale (queries vary px/mm by +-20%): its
    proportions to the diameter, the taper, and one-hot body, thread profile, apex and
    connection."""
    ratios = [
        d.length_mm / d.diameter_mm,
        d.thread_pitch_mm / d.diameter_mm * 4,
        d.thread_depth_mm / d.diameter_mm * 4,
        d.collar_mm / d.diameter_mm,
        d.taper,
    ]
    kinds = [
        d.body == "tapered",
        *(d.thread_profile == p for p in ("v", "square", "buttress")),
        *(d.apex == a for a in ("rounded", "pointed", "flat")),
        *(d.connection == c for c in ("internal hex", "conical", "tri-channel", "external hex")),
    ]
    return np.array(ratios + [float(k) for k in kinds])


def _by_unknown_system(
    args: argparse.Namespace,
    unknown_dirs: list[Path],
    unknown: list,
    inside_test: list,
    statistic: Any,
) -> list[dict[str, Any]]:
    """Each implant left out of the catalogue on its own: its queries' AUROC against
    the in-catalogue test queries, and the catalogued design nearest to it in shape
    (an X-ray cannot tell two near-identical designs apart, whatever the statistic)."""
    from raiox_cli.search import measures

    paths = _unknown_paths(unknown_dirs)
    if len(paths) != len(unknown):  # a query could not be read: the order no longer holds
        return []
    designs = synth.design_systems(args.systems, args.seed)
    known = designs[: args.systems - args.unknown]
    left_out = designs[args.systems - args.unknown :] + _more_unknown(args)
    extra = synth.design_systems(args.systems + args.extra_systems, args.seed)[args.systems :]
    inside = [statistic(s.scores) for s in inside_test if s.scores]
    rows = []
    for design in left_out:
        mine = [
            statistic(s.scores)
            for s, path in zip(unknown, paths, strict=True)
            if (path.parent.parent.name, path.parent.name) == (design.manufacturer, design.name)
            and s.scores
        ]
        if not mine:
            continue
        gaps = [float(np.abs(_shape(design) - _shape(k)).sum()) for k in known]
        twin = known[int(np.argmin(gaps))]
        trained = [float(np.abs(_shape(design) - _shape(k)).sum()) for k in extra]
        rows.append(
            {
                "implant": design.name,
                "added": design not in designs,
                "queries": len(mine),
                "auroc": round(float(measures.auroc([-x for x in mine], [-x for x in inside])), 3),
                "nearest_known": twin.name,
                "shape_distance": round(min(gaps), 3),
                "nearest_extra_distance": round(min(trained), 3) if trained else None,
                "design": f"{design.body} {design.connection}, {design.notes}",
                "nearest_design": f"{twin.body} {twin.connection}, {twin.notes}",
            }
        )
    return rows


def _unknown_paths(folders: list[Path]) -> list[Path]:
    """The unknown queries' files in the order evaluate.unknown_samples reads them."""
    from raiox_cli.search.evaluate import IMAGE_SUFFIXES

    return [
        p
        for folder in folders
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    ]


def _auroc_over_designs(
    per_system: list[dict[str, Any]],
    unknown_dirs: list[Path],
    inside_test: list,
    unknown: list,
    own: int,
    fitted: Any,
    args: argparse.Namespace,
) -> dict[str, Any] | None:
    """The labelled fit's open-set AUROC over all unknown designs, over the run's own
    ones, and its spread when the designs themselves are resampled (1000 draws)."""
    from raiox_cli.search import measures

    if not per_system or not args.more_unknown:
        return None
    statistic = fitted.ooc_statistic
    inside = [-statistic(s.scores) for s in inside_test if s.scores]
    outside = [-statistic(s.scores) if s.scores else np.inf for s in unknown]
    paths = _unknown_paths(unknown_dirs)
    if len(paths) != len(outside):  # a query could not be read: the order no longer holds
        return None
    design_of = [(p.parent.parent.name, p.parent.name) for p in paths]
    groups = [
        np.array([x for x, d in zip(outside, design_of, strict=True) if d == design])
        for design in sorted(set(design_of))
    ]
    rng = np.random.default_rng(args.seed)
    draws = [
        measures.auroc(
            list(np.concatenate([groups[i] for i in rng.choice(len(groups), len(groups))])),
            inside,
        )
        for _ in range(1000)
    ]
    return {
        "designs": len(groups),
        "all": round(float(measures.auroc(outside, inside)), 3),
        "own": round(float(measures.auroc(outside[:own], inside)), 3),
        "resampled_5_95": [round(float(q), 3) for q in np.quantile(draws, [0.05, 0.95])],
        "per_design_min_median_max": [
            round(float(q), 3) for q in np.quantile([r["auroc"] for r in per_system], [0, 0.5, 1])
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", type=int, default=30)
    parser.add_argument("--unknown", type=int, default=6, help="systems left out of the catalogue")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--queries", type=int, default=60, help="X-ray-like queries per system")
    parser.add_argument("--labelled", type=int, default=200)
    parser.add_argument("--catalogue-queries", type=int, default=400)
    parser.add_argument("--size", default="160x200", help="synthetic image size WxH")
    parser.add_argument("--model", default="raiox-tiny")
    parser.add_argument("--adapt-steps", type=int, default=0, help="0: the model as it is")
    parser.add_argument("--adapt-minutes", type=float, default=40.0)
    parser.add_argument("--augment", default="radiograph", help="raiox adapt --augment")
    parser.add_argument("--patience", type=int, default=6, help="raiox adapt --patience")
    parser.add_argument(
        "--val-xrays", type=int, default=0, help="X-ray-like validation images per implant"
    )
    parser.add_argument(
        "--extra-systems",
        type=int,
        default=0,
        help="more generated designs adapt trains on (--extra-labels), never in the catalogue",
    )
    parser.add_argument(
        "--more-unknown",
        type=int,
        default=30,
        help="X-rays of M more designs outside the catalogue in every out-of-catalogue measure",
    )
    parser.add_argument(
        "--unknown-offset",
        type=int,
        default=5000,
        help="generator design number the --more-unknown designs start from",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--splits", type=int, default=50, help="resampled labelled splits")
    parser.add_argument("--work", type=Path, default=None, help="keep data and runs here")
    args = parser.parse_args()
    if args.more_unknown and args.unknown_offset < args.systems + args.extra_systems:
        parser.error("--unknown-offset must be at least --systems + --extra-systems")

    work = args.work or Path(tempfile.mkdtemp(prefix="raiox-bench-calibrate-"))
    catalogue, known_dir, unknown_dir = _data(args, work)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAIOX_")}
    env.update(
        RAIOX_HOME=str(work / "home"),
        RAIOX_MODEL=args.model,
        RAIOX_PRETRAINED="none",
        RAIOX_DEVICE="cpu",
        RAIOX_TTA="0",
    )
    started = time.perf_counter()
    done = work / "setup.json"  # a second run with the same --work measures the same model
    report: dict[str, Any] | None = None
    if done.exists():
        report = json.loads(done.read_text()).get("adapt")
    else:
        _raiox(["init-db"], env)
        _raiox(["ingest", str(catalogue), "--json"], env)
        if args.adapt_steps:
            report = json.loads(
                _raiox(
                    ["adapt", "--steps", str(args.adapt_steps), "--max-minutes",
                     str(args.adapt_minutes), "--batch-size", "72", "--lr", "2e-3",
                     "--seed", str(args.seed), "--augment", args.augment, "--json", "--apply",
                     "--force", "--patience", str(args.patience),
                     *(["--val-labels", str(work / "synth" / "val-xrays")] if args.val_xrays
                       else []),
                     *(["--extra-labels", str(work / "synth" / "extra")] if args.extra_systems
                       else [])],
                    env,
                )
            )  # fmt: skip
        done.write_text(json.dumps({"adapt": report}))
    adapted = None
    if report is not None:
        env["RAIOX_WEIGHTS"] = report["weights"]
        adapted = {
            "steps": report["card"]["training"]["steps"],
            "held_out_implants": report["card"]["data"]["held_out_implants"],
            "after": report["card"]["metrics"]["after"].get("all"),
        }
    setup_s = time.perf_counter() - started
    os.environ.update(env)
    for key in [k for k in os.environ if k.startswith("RAIOX_") and k not in env]:
        del os.environ[key]

    from raiox_cli import config, db, embedding
    from raiox_cli.search import calibrate, calibration_data, evaluate

    settings = config.resolve()
    embedder = embedding.load_embedder(embedding.ModelSpec.from_settings(settings))
    started = time.perf_counter()
    with db.connect(settings) as conn:
        known, _ = calibration_data.labels_samples(conn, embedder, settings, known_dir)
        unknown, _ = evaluate.unknown_samples(conn, embedder, settings, unknown_dir)
        own_unknown = len(unknown)
        more_dir = work / "synth" / f"unknown-more-{args.unknown_offset}"
        if args.more_unknown:
            more, _ = evaluate.unknown_samples(conn, embedder, settings, more_dir)
            unknown = unknown + more
        day_one, day_one_counts = calibration_data.catalogue_samples(
            conn,
            embedder,
            settings,
            calibration_data.training_of(settings),
            n=args.catalogue_queries,
            seed=args.seed,
        )
    search_s = time.perf_counter() - started
    order = np.random.default_rng(args.seed).permutation(len(known))
    labelled = [known[i] for i in order[: args.labelled]]
    test = [known[i] for i in order[args.labelled :]] + unknown

    results: dict[str, Any] = {}
    for name, samples, source in (
        ("day_one", day_one, "catalogue"),
        ("labelled", labelled, "labels"),
    ):
        for target in TARGETS:
            fitted = calibrate.fit(
                samples, model_id=embedder.model_id, target=target, tta=False, source=source,
                counts={},
            )  # fmt: skip
            results.setdefault(name, {})[str(target)] = _measure_row(
                calibrate.measure(fitted, test)
            )

    resampled = _resampled(known, unknown, args) if args.splits else None
    fitted = calibrate.fit(
        labelled, model_id=embedder.model_id, target=0.9, tta=False, source="labels", counts={}
    )
    inside_test = test[: len(test) - len(unknown)]
    unknown_dirs = [unknown_dir] + ([more_dir] if args.more_unknown else [])
    per_system = _by_unknown_system(args, unknown_dirs, unknown, inside_test, fitted.ooc_statistic)
    by_designs = _auroc_over_designs(
        per_system, unknown_dirs, inside_test, unknown, own_unknown, fitted, args
    )

    out = {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "load_average": [round(x, 1) for x in os.getloadavg()],
        },
        "setup": {
            "model_id": embedder.model_id,
            "systems": args.systems,
            "unknown_systems": args.unknown,
            "extra_systems": args.extra_systems,
            "queries_per_system": round((len(known) + len(unknown)) / args.systems, 1),
            "size": args.size,
            "tta": False,
            "adapted": adapted,
            "calibration": {"day_one": day_one_counts, "labelled": len(labelled)},
            "test": {
                "in_catalogue": len(test) - len(unknown),
                "out_of_catalogue": len(unknown),
                "unknown_designs": args.unknown + args.more_unknown,
            },
            "setup_s": round(setup_s, 1),
            "search_s": round(search_s, 1),
        },
        "results": results,
        "labelled_resampled": {"splits": args.splits, "by_target": resampled},
        "ooc_by_unknown_system": per_system,
        "ooc_auroc_over_designs": by_designs,
    }
    print(json.dumps(out, indent=1))
    err = sys.stderr
    err.write(f"\n{embedder.model_id}: {out['setup']['test']} test queries\n")
    err.write(
        "source    target  cover  set  empty  top1  ECEraw  ECE  floor Brier  FA   AUROC "
        "(top) FPR95\n"
    )
    for name, rows in results.items():
        for target, m in rows.items():
            err.write(
                f"{name:9} {target:6} {m['coverage']:.3f} {m['mean_set_size']:4.2f} "
                f"{m['empty_sets']:.2f} {m['top1']:.3f} {m['ece_raw_score']:.3f} {m['ece']:.3f} "
                f"{m['ece_floor']:.3f} {m['brier']:.3f} {m['false_alarm']:.3f} "
                f"{m['ooc_auroc'] or 0:.3f} ({m['ooc_auroc_top_score'] or 0:.3f}) "
                f"{m['ooc_fpr_at_95tpr'] or 0:.3f}\n"
            )
    err.write("left out of the catalogue: AUROC of its queries, the nearest catalogued shape\n")
    for row in (r for r in per_system if not r["added"]):
        err.write(
            f"  {row['implant']:24} {row['auroc']:.3f}  nearest {row['nearest_known']:24} "
            f"distance {row['shape_distance']:.2f}"
            + (
                f", nearest trained extra {row['nearest_extra_distance']:.2f}"
                if row["nearest_extra_distance"] is not None
                else ""
            )
            + f"\n    {row['design']}\n    "
            f"{row['nearest_design']}\n"
        )
    if by_designs:
        err.write(
            f"open-set AUROC (labelled, 0.9) over {by_designs['designs']} unknown designs: "
            f"{by_designs['all']:.3f} (designs resampled 5-95%: "
            f"{by_designs['resampled_5_95'][0]:.3f}-{by_designs['resampled_5_95'][1]:.3f}); "
            f"the run's own {args.unknown}: {by_designs['own']:.3f}; per design min/median/max "
            + "/".join(f"{x:.3f}" for x in by_designs["per_design_min_median_max"])
            + "\n"
        )
    for target, stat in (resampled or {}).items():
        err.write(
            f"labelled, {args.splits} splits, {target}: coverage {stat['coverage']['mean']:.3f}"
            f" +- {stat['coverage']['sd']:.3f} (within 3 points "
            f"{stat['coverage_within_3_points']:.0%}), ECE {stat['ece']['mean']:.3f} +- "
            f"{stat['ece']['sd']:.3f} (floor {stat['ece_floor']['mean']:.3f}), AUROC "
            f"{stat['ooc_auroc']['mean']:.3f}\n"
        )


if __name__ == "__main__":
    main()
