"""Search benchmarks: pgvector distinct-implant top-k at catalogue scale, warm search
overhead over the model's forward pass, and cold `raiox search` from the shell.

    python bench/bench_search.py                       # 100,000 images, everything
    python bench/bench_search.py --images 20000 --skip-warm --skip-cold
    python bench/bench_search.py --reuse               # keep the loaded database

Prints one JSON object on stdout and a short table on stderr. The database is an
embedded PostgreSQL under --data (default /tmp/raiox-bench), or --database-url.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from raiox_cli import config, db
from raiox_cli.db import queries
from raiox_cli.search import query as search

MODEL_ID = "ViT-B-32:none"  # what `--model ViT-B-32 --pretrained none` searches with


def _percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    return {
        "p50_ms": round(statistics.median(ordered), 3),
        "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
        "mean_ms": round(statistics.fmean(ordered), 3),
    }


def clustered_vectors(
    n_images: int, per_implant: int, dim: int, seed: int, per_system: int = 5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors shaped like CLIP embeddings of one kind of picture: a large
    shared component, then manufacturer, system (sizes of one design look alike)
    and implant directions, then per-image noise. per_system=1 drops the system
    level: every other implant of a manufacturer is then an equally near runner-up,
    which makes ranks 2-3 a near-tie among hundreds (the hard case).
    Returns (vectors, implant of each vector, implant centres)."""
    rng = np.random.default_rng(seed)
    n_implants = max(1, n_images // per_implant)
    common = rng.normal(size=dim)
    common /= np.linalg.norm(common)
    implants = np.arange(n_implants)
    systems = implants // per_system
    makers = rng.normal(size=(8, dim)) / np.sqrt(dim)
    system_dirs = rng.normal(size=(int(systems.max()) + 1, dim)) / np.sqrt(dim)
    own = rng.normal(size=(n_implants, dim)) / np.sqrt(dim)
    system_weight = 0.35 if per_system > 1 else 0.0
    centres = (
        0.8 * common
        + 0.35 * makers[systems % 8]
        + system_weight * system_dirs[systems]
        + 0.45 * own
    )
    implant_of = np.arange(n_images) % n_implants
    noise = rng.normal(size=(n_images, dim)).astype(np.float32) / np.sqrt(dim)
    vectors = centres[implant_of].astype(np.float32) + 0.3 * noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, implant_of, centres


def query_vectors(centres: np.ndarray, n: int, seed: int) -> np.ndarray:
    """New views of random implants: noisier than catalogue images."""
    rng = np.random.default_rng(seed + 1)
    picks = rng.integers(0, len(centres), size=n)
    noise = rng.normal(size=(n, centres.shape[1])) / np.sqrt(centres.shape[1])
    q = (centres[picks] + 0.4 * noise).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def open_database(args: argparse.Namespace) -> str:
    if args.database_url:
        return args.database_url
    server = db.embedded_url(Path(args.data) / "pgdata")
    with psycopg.connect(server, autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = 'raiox_bench'").fetchone()
        if not found:
            conn.execute(sql.SQL("CREATE DATABASE raiox_bench"))
    base, _, query = server.partition("?")
    return f"{base.rsplit('/', 1)[0]}/raiox_bench?{query}"


def load_catalogue(conn: psycopg.Connection, args: argparse.Namespace) -> dict[str, Any]:
    """Fill an empty database with args.images vectors; reuse a loaded one."""
    model = queries.get_model(conn, MODEL_ID)
    if model is not None and queries.count_embeddings(conn, MODEL_ID) == args.images:
        return {"loaded": False}
    if model is not None:
        raise SystemExit("the bench database holds another size; use a new --data folder")
    started = time.perf_counter()
    vectors, implant_of, _ = clustered_vectors(
        args.images, args.per_implant, args.dim, args.seed, args.per_system
    )
    model = queries.register_model(conn, MODEL_ID, args.dim, 1)
    queries.drop_model_index(conn, model)
    n_implants = int(implant_of.max()) + 1
    implant_ids = [
        queries.upsert_implant(
            conn,
            {
                "key": f"m{i // args.per_system % 8}/s{i // args.per_system}/implant {i}",
                "name": f"Implant {i}",
                "manufacturer": f"Maker {i // args.per_system % 8}",
            },
        )
        for i in range(n_implants)
    ]
    queries.copy_images(
        conn,
        (
            (implant_ids[implant_of[n]], hashlib.sha256(str(n).encode()).hexdigest())
            for n in range(args.images)
        ),
    )
    ids = queries.image_ids(conn)
    queries.copy_embeddings(conn, MODEL_ID, zip(ids, vectors, strict=True))
    conn.commit()
    loaded = time.perf_counter()
    queries.set_build_memory(conn, args.build_memory)
    queries.register_model(conn, MODEL_ID, args.dim, 1)  # builds the HNSW index
    queries.activate_model(conn, MODEL_ID)
    queries.analyze_embeddings(conn)
    conn.commit()
    return {
        "loaded": True,
        "load_s": round(loaded - started, 1),
        "index_build_s": round(time.perf_counter() - loaded, 1),
    }


def bench_queries(conn: psycopg.Connection, args: argparse.Namespace) -> list[dict[str, Any]]:
    """p50/p95 of the distinct top-k search and its recall against exact search."""
    model = queries.active_model(conn)
    assert model is not None
    _, _, centres = clustered_vectors(
        args.images, args.per_implant, args.dim, args.seed, args.per_system
    )
    qs = query_vectors(centres, args.queries, args.seed)
    truth = [
        [r["id"] for r in queries.exact_nearest_implants(conn, model, q, k=args.k)] for q in qs
    ]
    search._configure(conn, args.ef_search[0])  # the session settings search runs with
    plan = queries.explain_nearest(conn, model, qs[0], k=args.k, candidates=100)
    results = []
    iterative_available = queries.iterative_scan_supported(conn)
    default_candidates = search.MIN_CANDIDATES, search.CANDIDATES_PER_IMPLANT
    runs = [(m, ef, c) for m in args.modes for ef in args.ef_search for c in args.candidates]
    for mode, ef, candidates in runs:
        if mode == "iterative" and not iterative_available:
            continue
        search.MIN_CANDIDATES, search.CANDIDATES_PER_IMPLANT = candidates, 0
        conn.execute("RESET ALL")
        search._configured.clear()
        supported = queries.iterative_scan_supported
        if mode == "plain":
            queries.iterative_scan_supported = lambda conn: False  # type: ignore[assignment]
        try:
            for q in qs[:10]:  # warm the cache
                search.search_vectors(conn, model, q, k=args.k, ef_search=ef)
            times, recalls, exact_used = [], [], 0
            for q, want in zip(qs, truth, strict=True):
                started = time.perf_counter()
                result = search.search_vectors(conn, model, q, k=args.k, ef_search=ef)
                times.append((time.perf_counter() - started) * 1000)
                got = [m.implant_id for m in result.matches]
                recalls.append(len(set(got) & set(want)) / len(want))
                exact_used += result.exact
        finally:
            queries.iterative_scan_supported = supported  # type: ignore[assignment]
        results.append(
            {
                "mode": mode,
                "ef_search": ef,
                "candidates": candidates,
                **_percentiles(times),
                f"recall_top{args.k}": round(statistics.fmean(recalls), 4),
                "exact_fallbacks": exact_used,
            }
        )
    search.MIN_CANDIDATES, search.CANDIDATES_PER_IMPLANT = default_candidates
    search._configured.clear()
    conn.execute("RESET ALL")
    return [{"index_used": f"Index Scan using {model.index_name}" in plan}, *results]


def bench_filter(conn: psycopg.Connection, args: argparse.Namespace) -> dict[str, Any]:
    """--manufacturer "Maker 3" (1/8 of the catalogue), still through the index:
    queries showing one of its implants (the use case: the clinic knows the brand)
    and queries showing another maker's implant (the scan must go far)."""
    model = queries.active_model(conn)
    assert model is not None
    _, _, centres = clustered_vectors(
        args.images, args.per_implant, args.dim, args.seed, args.per_system
    )
    makers = (np.arange(len(centres)) // args.per_system) % 8
    n = min(args.queries, 100)
    out: dict[str, Any] = {}
    for name, group in (("own_maker", makers == 3), ("other_maker", makers != 3)):
        qs = query_vectors(centres[group], n, args.seed + 7)
        times, recalls, exact_used = [], [], 0
        for q in qs:
            want = queries.exact_nearest_implants(conn, model, q, k=args.k, manufacturer="Maker 3")
            started = time.perf_counter()
            result = search.search_vectors(conn, model, q, k=args.k, manufacturer="Maker 3")
            times.append((time.perf_counter() - started) * 1000)
            got = {m.implant_id for m in result.matches}
            recalls.append(len(got & {r["id"] for r in want}) / max(1, len(want)))
            exact_used += result.exact
        out[name] = {
            **_percentiles(times),
            f"recall_top{args.k}": round(statistics.fmean(recalls), 4),
            "exact_fallbacks": exact_used,
        }
    plan = queries.explain_nearest(
        conn, model, centres[0], k=args.k, candidates=100, manufacturer="Maker 3"
    )
    out["index_used"] = f"Index Scan using {model.index_name}" in plan
    return out


def bench_warm(conn: psycopg.Connection, args: argparse.Namespace) -> dict[str, Any]:
    """The whole search core call vs the forward pass alone (ViT-B-32, random, CPU),
    without TTA (one forward pass) and with it (three, batched)."""
    import torch

    from raiox_cli import embedding, images
    from raiox_cli.training import synth

    embedder = embedding.load_embedder(embedding.ModelSpec("ViT-B-32", "none", None, "cpu"))
    design = synth.design_systems(1)[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "q.png"
        synth.render_view(design, seed=1, query=True).save(path)
        loaded = images.load_image(path)
    three, _ = search.oriented(loaded.image, True)
    timings: dict[str, list[float]] = {"forward": [], "search": [], "forward3": [], "tta": []}
    calls = {
        "forward": lambda: embedder.embed_images([loaded.image]),
        "search": lambda: search.search_image(conn, embedder, loaded, k=args.k, tta=False),
        "forward3": lambda: embedder.embed_images(three),
        "tta": lambda: search.search_image(conn, embedder, loaded, k=args.k, tta=True),
    }
    for call in calls.values():  # warm-up
        call()
    for _ in range(args.warm_runs):  # interleaved, so load changes hit all alike
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            timings[name].append((time.perf_counter() - started) * 1000)
    p50 = {name: statistics.median(values) for name, values in timings.items()}
    return {
        "forward_p50_ms": round(p50["forward"], 2),
        "search_p50_ms": round(p50["search"], 2),
        "search_adds_ms": round(p50["search"] - p50["forward"], 2),
        "forward_x3_p50_ms": round(p50["forward3"], 2),
        "search_tta_p50_ms": round(p50["tta"], 2),
        "search_tta_adds_ms": round(p50["tta"] - p50["forward3"], 2),
        "torch_threads": torch.get_num_threads(),
    }


def bench_cold(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Wall time of fresh `raiox` processes, as a user types them."""
    from raiox_cli.training import synth

    raiox = str(Path(sys.executable).with_name("raiox"))
    env = {
        **os.environ,
        "RAIOX_DATABASE_URL": url,
        "RAIOX_MODEL": "ViT-B-32",
        "RAIOX_PRETRAINED": "none",
        "RAIOX_DEVICE": "cpu",
    }
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "q.png"
        synth.render_view(synth.design_systems(1)[0], seed=1, query=True).save(image)
        bad = Path(tmp) / "bad.png"
        bad.write_text("not an image")
        runs = {
            "help": [raiox, "--help"],
            "search_unreadable_image": [raiox, "search", str(bad)],
            "search": [raiox, "search", str(image), "--json"],
        }
        for name, argv in runs.items():
            walls = []
            for _ in range(args.cold_runs):
                started = time.perf_counter()
                proc = subprocess.run(argv, env=env, capture_output=True, text=True)
                walls.append(time.perf_counter() - started)
            out[f"{name}_s"] = round(statistics.median(walls), 2)
            out[f"{name}_exit"] = proc.returncode
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--per-implant", type=int, default=50)
    parser.add_argument("--per-system", type=int, default=5, help="1: no system level (hard)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("-k", type=int, default=3)
    parser.add_argument(
        "--ef-search", type=lambda s: [int(v) for v in s.split(",")], default=[40, 100]
    )
    parser.add_argument("--modes", type=lambda s: s.split(","), default=["iterative", "plain"])
    parser.add_argument(
        "--candidates",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[search.MIN_CANDIDATES],
        help="first batch of nearest images (search.MIN_CANDIDATES); several to compare",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--build-memory", default="1GB")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "raiox-bench"))
    parser.add_argument("--database-url")
    parser.add_argument("--warm-runs", type=int, default=20)
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("--skip-search", action="store_true", help="only warm/cold runs")
    parser.add_argument("--skip-warm", action="store_true")
    parser.add_argument("--skip-cold", action="store_true")
    args = parser.parse_args()
    if args.dim != 512 and not (args.skip_warm and args.skip_cold):
        parser.error("--dim other than 512 needs --skip-warm --skip-cold (ViT-B-32 is 512-d)")

    url = open_database(args)
    db.migrate(config.resolve(database_url=url))
    report: dict[str, Any] = {
        "images": args.images,
        "implants": args.images // args.per_implant,
        "implants_per_system": args.per_system,
        "dim": args.dim,
        "queries": args.queries,
        "k": args.k,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    with psycopg.connect(url) as conn:
        register_vector(conn)
        report["setup"] = load_catalogue(conn, args)
        if not args.skip_search:
            index_used, *runs = bench_queries(conn, args)
            report["index_used"] = index_used["index_used"]
            report["search"] = runs
            report["manufacturer_filter"] = bench_filter(conn, args)
        if not args.skip_warm:
            report["warm"] = bench_warm(conn, args)
        conn.commit()
    if not args.skip_cold:
        report["cold"] = bench_cold(url, args)
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    _table(report)


def _table(report: dict[str, Any]) -> None:
    k = report["k"]
    lines = [
        f"{report['images']} images, {report['implants']} implants, {report['dim']}-d, "
        f"{report['queries']} queries, index used: {report.get('index_used')}",
    ]
    if "search" in report:
        lines.append(
            f"{'mode':<10} {'ef':>4} {'cand':>5} {'p50 ms':>8} {'p95 ms':>8} "
            f"{'recall@' + str(k):>9} {'exact':>6}"
        )
    for r in report.get("search", []):
        lines.append(
            f"{r['mode']:<10} {r['ef_search']:>4} {r['candidates']:>5} "
            f"{r['p50_ms']:>8.2f} {r['p95_ms']:>8.2f} "
            f"{r[f'recall_top{k}']:>9.4f} {r['exact_fallbacks']:>6}"
        )
    f = report.get("manufacturer_filter", {})
    for name in ("own_maker", "other_maker") if f else ():
        lines.append(
            f"--manufacturer, query of {name.replace('_', ' ')}: p50 {f[name]['p50_ms']:.2f} ms, "
            f"p95 {f[name]['p95_ms']:.2f} ms, recall {f[name][f'recall_top{k}']:.4f}, "
            f"exact fallbacks {f[name]['exact_fallbacks']}, index used: {f['index_used']}"
        )
    if "warm" in report:
        w = report["warm"]
        lines.append(
            f"warm: forward {w['forward_p50_ms']} ms, search {w['search_p50_ms']} ms "
            f"(adds {w['search_adds_ms']} ms); with TTA: forward x3 {w['forward_x3_p50_ms']} ms, "
            f"search {w['search_tta_p50_ms']} ms (adds {w['search_tta_adds_ms']} ms)"
        )
    if "cold" in report:
        c = report["cold"]
        lines.append(
            f"cold: --help {c['help_s']} s, unreadable image {c['search_unreadable_image_s']} s "
            f"(exit {c['search_unreadable_image_exit']}), search {c['search_s']} s"
        )
    lines.append(
        f"load average before/after: {report['load_average']} / {report['load_average_after']}"
    )
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
