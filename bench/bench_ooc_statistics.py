"""Which open-set statistic tells X-rays of implants outside the catalogue from those
inside, on the model a `bench_calibrate.py --work DIR` run trained? Reads that run's
data, embeds its queries once (cached in DIR/ooc-statistics.npz) and prints the
out-of-catalogue AUROC of each candidate, on the same 1240 in-catalogue test queries
(the 200 labelled ones left out, as bench_calibrate splits them) and every unknown one.

  python bench/bench_ooc_statistics.py --work /tmp/bcal --model raiox-small

The candidates: the top implant's score (what raiox uses without real unknowns), the
margin and the top against the next nine (the features of the fitted statistic), the
k-th nearest catalogue image (kNN out-of-distribution detection), the nearest implant
centroid, a per-implant z-score of the top score (its mean and spread from the
labelled queries, shrunk to the global ones), the energy and maximum softmax
probability over implants at a few temperatures, and the top implant's best 3 images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from _machine import cpu_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="a bench_calibrate --work")
    parser.add_argument("--model", default="raiox-small")
    parser.add_argument("--labelled", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--background",
        type=Path,
        default=None,
        help="images of other designs (<Manufacturer>/<Implant>/*, none of the unknown ones; "
        "bench_calibrate --extra-systems writes DIR/synth/extra): adds the top score against "
        "the nearest of those designs",
    )
    parser.add_argument(
        "--more-unknown",
        type=int,
        default=0,
        help="X-rays of M more designs outside the catalogue (generator designs from no. "
        "--unknown-offset on: never the catalogue's, the run's unknown or extra ones), so that "
        "the AUROC rests on 6 + M designs instead of 6",
    )
    parser.add_argument("--unknown-offset", type=int, default=5000)
    parser.add_argument("--queries", type=int, default=60, help="X-rays per added design")
    parser.add_argument("--size", default="160x200", help="as the bench_calibrate run's")
    args = parser.parse_args()

    report = json.loads((args.work / "setup.json").read_text())["adapt"]
    for key in [k for k in os.environ if k.startswith("RAIOX_")]:
        del os.environ[key]
    os.environ.update(
        RAIOX_HOME=str(args.work / "home"),
        RAIOX_MODEL=args.model,
        RAIOX_PRETRAINED="none",
        RAIOX_DEVICE="cpu",
        RAIOX_TTA="0",
    )
    if report:
        os.environ["RAIOX_WEIGHTS"] = report["weights"]

    from raiox_cli import config, db, embedding
    from raiox_cli.catalogue.scan import IMAGE_SUFFIXES
    from raiox_cli.search import evaluate, measures
    from raiox_cli.search.calibration_data import Gallery

    settings = config.resolve()
    embedder = embedding.load_embedder(embedding.ModelSpec.from_settings(settings))
    with db.connect(settings) as conn:
        gallery = Gallery.load(conn, embedder.model_id)
        labelled = evaluate.labelled_queries(args.work / "synth" / "queries")
        index = evaluate._label_index(conn)
    position = {key: i for i, key in enumerate(gallery.keys)}
    truth = np.array([position[index[evaluate._normalise(q.label)]] for q in labelled])
    unknown_paths = sorted(
        p
        for p in (args.work / "synth" / "unknown").rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    cache = args.work / "ooc-statistics.npz"
    if cache.exists():
        saved = np.load(cache)
        known, unknown = saved["known"], saved["unknown"]
    else:

        def embed(paths: list[Path]) -> np.ndarray:
            found = evaluate._vectors(embedder, paths, settings, False)
            return np.stack([vectors[0] for _, vectors, _ in found if vectors is not None])

        known, unknown = embed([q.path for q in labelled]), embed(unknown_paths)
        np.savez(cache, known=known, unknown=unknown)
    background = background_of = None
    if args.background is not None:
        cache = args.work / f"ooc-background-{args.background.name}.npz"
        paths = sorted(
            p
            for p in args.background.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if cache.exists():
            background = np.load(cache)["vectors"]
        else:
            found = evaluate._vectors(embedder, paths, settings, False)
            background = np.stack([v[0] for _, v, _ in found if v is not None])
            np.savez(cache, vectors=background)
        designs = sorted({p.parent for p in paths})
        background_of = np.array([designs.index(p.parent) for p in paths])
    # Which design each unknown query shows (its folder), for the per-design spread.
    design_of = [str(p.parent) for p in unknown_paths]
    if args.more_unknown:
        from raiox_cli.training import synth

        width, _, height = args.size.partition("x")
        start = args.unknown_offset
        designs = synth.design_systems(start + args.more_unknown, args.seed)[start:]
        more_root = args.work / "synth" / f"unknown-more-{start}"
        more_paths = []
        for design in designs:
            folder = more_root / design.manufacturer / design.name
            folder.mkdir(parents=True, exist_ok=True)
            for q in range(args.queries):
                path = folder / f"q_{q:02d}.png"
                if not path.exists():
                    picture = synth.render_view(
                        design, seed=args.seed, query=True, size=(int(width), int(height)), view=q
                    )
                    path.write_bytes(synth.png_bytes(picture))
                more_paths.append(path)
        more_cache = args.work / f"ooc-more-{start}-{args.more_unknown}-{args.queries}.npz"
        if more_cache.exists():
            more = np.load(more_cache)["vectors"]
        else:
            found = list(evaluate._vectors(embedder, more_paths, settings, False))
            if any(v is None for _, v, _ in found):
                raise SystemExit("an added unknown query could not be read")
            more = np.stack([v[0] for _, v, _ in found])
            np.savez(more_cache, vectors=more)
        unknown = np.concatenate([unknown, more])
        design_of += [str(p.parent) for p in more_paths]
    if len(known) != len(labelled):
        raise SystemExit("a labelled query could not be read: the split would differ")

    order = np.random.default_rng(args.seed).permutation(len(known))  # as bench_calibrate
    calibration, test = order[: args.labelled], order[args.labelled :]
    images, implant_of, implants = gallery.vectors, gallery.implant_of, len(gallery.keys)

    def per_implant(similarity: np.ndarray) -> np.ndarray:
        best = np.full((len(similarity), implants), -np.inf)
        for j in range(implants):
            best[:, j] = similarity[:, implant_of == j].max(axis=1)
        return best

    centroids = np.stack([images[implant_of == j].mean(axis=0) for j in range(implants)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    known_best = per_implant(known @ images.T)
    right = known_best[calibration, truth[calibration]]
    mean_all, sd_all = right.mean(), right.std()
    mean, sd = np.full(implants, mean_all), np.full(implants, sd_all)
    for j in range(implants):
        own = right[truth[calibration] == j]
        weight = len(own) / (len(own) + 5)  # shrink a few queries to the global figures
        if len(own) > 1:
            mean[j] = weight * own.mean() + (1 - weight) * mean_all
            sd[j] = np.sqrt(weight * own.var() + (1 - weight) * sd_all**2)

    def statistics(vectors: np.ndarray) -> dict[str, np.ndarray]:
        similarity = vectors @ images.T
        best = per_implant(similarity)
        ranked = np.sort(best, axis=1)[:, ::-1]
        nearest = np.sort(similarity, axis=1)[:, ::-1]
        top = best.argmax(axis=1)
        rest = ranked[:, 1:10]
        found = {
            "top implant's score (in use)": ranked[:, 0],
            "margin to the 2nd": ranked[:, 0] - ranked[:, 1],
            "top - mean of the next 9": ranked[:, 0] - rest.mean(axis=1),
            "top's z among the next 9": (ranked[:, 0] - rest.mean(axis=1))
            / (rest.std(axis=1) + 1e-6),
            "nearest implant centroid": (vectors @ centroids.T).max(axis=1),
            "per-implant z of the top": (ranked[:, 0] - mean[top]) / sd[top],
            "top implant's best 3 images": np.array(
                [np.sort(similarity[i, implant_of == top[i]])[-3:].mean() for i in range(len(top))]
            ),
        }
        for k in (2, 4, 8):
            found[f"nearest image no. {k}"] = nearest[:, k - 1]
        if background is not None:
            other = vectors @ background.T
            nearest_other = np.stack(
                [other[:, background_of == j].max(axis=1) for j in range(background_of.max() + 1)],
                axis=1,
            )
            ordered = np.sort(nearest_other, axis=1)[:, ::-1]
            found["top - nearest other design"] = ranked[:, 0] - ordered[:, 0]
            found["top - mean of 5 nearest other designs"] = ranked[:, 0] - ordered[:, :5].mean(1)
            together = np.concatenate([best, nearest_other], axis=1)
            for t in (0.02, 0.05):
                mass = np.exp((together - together.max(axis=1, keepdims=True)) / t)
                found[f"catalogue share of softmax with others, T={t}"] = mass[:, :implants].sum(
                    axis=1
                ) / mass.sum(axis=1)
        for t in (0.02, 0.05):
            shifted = np.exp((best - ranked[:, :1]) / t).sum(axis=1)
            found[f"energy, T={t}"] = ranked[:, 0] + t * np.log(shifted)
            found[f"max softmax, T={t}"] = 1 / shifted
        return found

    inside, outside = statistics(known[test]), statistics(unknown)
    rows = {
        name: round(float(measures.auroc(list(-outside[name]), list(-inside[name]))), 3)
        for name in inside
    }
    # The AUROC's spread over which designs are unknown: resample designs (with their
    # queries) 1000 times; the first six are the bench_calibrate run's own.
    names = sorted(set(design_of))
    of = np.array([names.index(d) for d in design_of])
    original = np.isin(of, np.unique(of[: len(unknown_paths)]))
    rng = np.random.default_rng(args.seed)
    spread = {}
    for name in ("top implant's score (in use)", "nearest implant centroid"):
        draws = []
        for _ in range(1000 if args.more_unknown else 0):
            picked = np.concatenate(
                [np.flatnonzero(of == d) for d in rng.choice(len(names), len(names))]
            )
            draws.append(measures.auroc(list(-outside[name][picked]), list(-inside[name])))
        spread[name] = {
            "run's own unknown designs": round(
                float(measures.auroc(list(-outside[name][original]), list(-inside[name]))),
                3,
            ),
            "all designs": rows[name],
            "designs resampled, 5-95%": [
                round(float(q), 3) for q in np.quantile(draws, [0.05, 0.95])
            ]
            if draws
            else None,
            "per design, min/median/max": [
                round(float(q), 3)
                for q in np.quantile(
                    [
                        measures.auroc(list(-outside[name][of == d]), list(-inside[name]))
                        for d in range(len(names))
                    ],
                    [0, 0.5, 1],
                )
            ],
        }
    top1 = float(np.mean(known_best[test].argmax(axis=1) == truth[test]))
    print(
        json.dumps(
            {
                "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
                "model_id": embedder.model_id,
                "test": {
                    "in_catalogue": len(test),
                    "out_of_catalogue": len(unknown),
                    "unknown_designs": len(names),
                },
                "by_unknown_designs": spread,
                "top1": round(top1, 3),
                "ooc_auroc": rows,
            },
            indent=1,
        )
    )
    for name, value in rows.items():
        sys.stderr.write(f"{name:32} {value:.3f}\n")


if __name__ == "__main__":
    main()
