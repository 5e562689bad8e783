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
    top1 = float(np.mean(known_best[test].argmax(axis=1) == truth[test]))
    print(
        json.dumps(
            {
                "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
                "model_id": embedder.model_id,
                "test": {"in_catalogue": len(test), "out_of_catalogue": len(unknown)},
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
