"""Ingest benchmarks: prints one JSON object on stdout and a short table on stderr.

  model_only     ViT-B-32 throughput on pre-decoded tensors (batch 32): the ceiling
  breakdown      CPU ms per image outside the model, by step (read+hash, decode,
                 preprocess, de-identified copy, database), on the --size PNGs;
                 decode through Pillow alone beside it (before the fast-png extra)
  ingest         end-to-end `ingest` throughput on the same PNGs (model preloaded)
  ingest_split   ingest's CPU per image by stage (thread CPU): decode side, model,
                 database, the rest; with the fast-png extra and with Pillow alone
  batch_search   `raiox search` over the same PNGs as X-rays, TTA off and on
  accuracy       synthetic eval (top-1, MRR) in fp32, then int8 after reindex --precision int8
  tta_drift      TTA views as flips of the preprocessed array vs flipped pictures
  passive        model_only + ingest again with OMP_WAIT_POLICY=PASSIVE (only with --only)
  loop           the replaced system's way: load, preprocess, encode, insert, one
                 image at a time (a commit per image)
  decode_pool    decode+preprocess throughput: serial vs threads vs processes
  unchanged      wall time of `python -m raiox_cli ingest` over an unchanged catalogue
  rss            peak RSS of an ingest of a small vs a large catalogue

Each measured run is a fresh child process with its own embedded PostgreSQL (or
RAIOX_DATABASE_URL's server, one database per run is NOT created: leave it unset).

  python bench/bench_ingest.py                       # full size (takes a while on CPU)
  python bench/bench_ingest.py --images 64 --unchanged-images 300 --rss-images 40,400
  python bench/bench_ingest.py --device cuda --images 2048 --batch-size 128   # GPU
  python bench/bench_ingest.py --backend onnx --precision int8 --only model_only,ingest

--precision int8 quantises the export once (in the first child that needs it). Random
weights (`--pretrained none`, what these benchmarks run) are not a model whose
accuracy the parity gate protects: their int8 cosine to fp32 on ViT-B-32 is ~0.99,
either side of the gate, so the benchmark lowers the gate's cosine to
--int8-gate-cosine for its speed-only export (bench/README.md, "Precision").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from raiox_cli import config, db, embedding, images
from raiox_cli.db import queries
from raiox_cli.training import synth


def _parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def _catalogue(root: Path, count: int, size: tuple[int, int], views: int = 4) -> Path:
    """A synthetic catalogue of `count` images (cached between runs by name)."""
    marker = root / ".complete"
    if not marker.exists():
        systems = max(1, -(-count // views))
        info = synth.make_catalogue(root, systems=systems, views=views, queries=0, size=size)
        extra = info.catalogue_files[count:]
        for path in extra:
            path.unlink()
        marker.write_text("ok")
    return root / "catalogue"


def _onnx_cache(args: argparse.Namespace) -> Path:
    """One ONNX export for every run (each run's home links to it): exporting is
    minutes of torch on 2 cores, and no part of what is measured."""
    cache = args.work / "onnx-cache"
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def _settings(home: Path, args: argparse.Namespace, model: str | None = None) -> config.Settings:
    from raiox_cli.embedding import precision

    precision.GATE_COSINE = args.int8_gate_cosine  # random weights: speed only (docstring)
    precision.GATE_AGREEMENT = args.int8_gate_agreement  # to measure what the gate refuses
    if args.backend == "onnx" and not (home / "onnx").exists():
        home.mkdir(parents=True, exist_ok=True)
        (home / "onnx").symlink_to(_onnx_cache(args), target_is_directory=True)
    return config.resolve(
        env={**os.environ, "RAIOX_HOME": str(home)},
        model=model or args.model,
        pretrained="none",
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        backend=args.backend,
        precision=args.precision,
    )


def _cpu_s() -> float:
    """CPU seconds of this process, all threads: unlike wall time, not inflated by
    other processes competing for the cores."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- child-process measurements --------------------------------------------------------


def child_model_only(args: argparse.Namespace) -> dict[str, Any]:
    root = _catalogue(args.work / f"png-{args.images}", args.images, _parse_size(args.size))
    settings = _settings(args.work / "model-only-home", args)
    embedder = embedding.load_embedder(embedding.ModelSpec.from_settings(settings))
    files = sorted(root.rglob("*.png"))
    pixels = np.stack([embedder.preprocessor(images.load_image(p).image) for p in files])
    batches = [pixels[i : i + args.batch_size] for i in range(0, len(pixels), args.batch_size)]
    embedder.embed_tensors(batches[0])  # warm-up
    start, cpu = time.perf_counter(), _cpu_s()
    for batch in batches:
        embedder.embed_tensors(batch)
    elapsed = time.perf_counter() - start
    return {
        "images": len(files),
        "elapsed_s": elapsed,
        "images_per_s": len(files) / elapsed,
        "cpu_ms_per_image": (_cpu_s() - cpu) * 1000 / len(files),
    }


def child_ingest(args: argparse.Namespace) -> dict[str, Any]:
    from raiox_cli.catalogue.ingest import ingest_catalogue

    root = _catalogue(args.work / f"png-{args.images}", args.images, _parse_size(args.size))
    settings = _settings(Path(tempfile.mkdtemp(dir=args.work)), args)
    db.migrate(settings)
    embedder = embedding.load_embedder(embedding.ModelSpec.from_settings(settings))
    # Warm-up outside the clock, like model_only's.
    shape = embedder.preprocessor(images.load_image(next(root.rglob("*.png"))).image).shape
    embedder.embed_tensors(np.zeros((args.batch_size, *shape), np.float32))
    cpu = _cpu_s()
    report = ingest_catalogue(settings, root)
    return {
        "images": report.embedded,
        "failed": len(report.failed),
        "elapsed_s": report.elapsed_s,
        "images_per_s": report.images_per_s,
        "cpu_ms_per_image": (_cpu_s() - cpu) * 1000 / max(1, report.embedded),
    }


def child_breakdown(args: argparse.Namespace) -> dict[str, Any]:
    """CPU ms per image of each step ingest runs outside the model, one after another
    on the same files: the bytes read and hashed, decoded (with the preprocessing's
    decode_to), preprocessed, the de-identified copy stored. The database and the
    rest are what is left of ingest's CPU outside the model (main() subtracts).

    Before and after in one run: `decode` is the path ingest takes (Wuffs for a plain
    PNG when the fast-png extra is installed), `decode_pillow` the same files through
    Pillow alone (every PNG before the extra); `inflate_only` is zlib alone on the
    files' IDAT data (what any decoder pays before unfiltering the rows). Each step
    runs --breakdown-rounds times, interleaved; the fastest round counts (the least
    disturbed by the other processes on the machine)."""
    import hashlib
    import zlib

    from raiox_cli.clinics import privacy
    from raiox_cli.images import png
    from raiox_cli.store import objects as storage

    root = _catalogue(args.work / f"png-{args.images}", args.images, _parse_size(args.size))
    files = sorted(root.rglob("*.png"))[: min(args.images, 128)]
    settings = _settings(Path(tempfile.mkdtemp(dir=args.work)), args)
    db.migrate(settings)
    embedder = embedding.load_embedder(embedding.ModelSpec.from_settings(settings))
    store = storage.open_store(settings)
    decode_to = embedder.preprocessor.decode_to
    fast_png = png.available()
    steps: dict[str, float] = {}

    def timed(name: str, fn: Any, items: list[Any]) -> list[Any]:
        cpu = _cpu_s()
        out = [fn(item) for item in items]
        ms = (_cpu_s() - cpu) * 1000 / len(items)
        steps[name] = min(steps.get(name, ms), ms)
        return out

    def read_and_hash(path: Path) -> tuple[bytes, str]:
        data = path.read_bytes()
        return data, hashlib.sha256(data).hexdigest()

    def decode_with(enabled: bool) -> Any:
        def decode(d: tuple[bytes, str]) -> images.LoadedImage:
            png.ENABLED = enabled and fast_png
            try:
                return images.load_image(d[0], sha256=d[1], decode_to=decode_to)
            finally:
                png.ENABLED = fast_png

        return decode

    idat = [_idat(path.read_bytes()) for path in files]
    for _ in range(args.breakdown_rounds):
        data = timed("read_and_hash", read_and_hash, files)
        timed("decode_pillow", decode_with(False), data)
        loaded = timed("decode", decode_with(True), data)
        timed("inflate_only", zlib.decompress, idat)
        timed("preprocess", lambda li: embedder.preprocessor(li.image), loaded)
        timed(
            "deidentified_copy",
            lambda d: privacy.store_image(store, d[0], "PNG", settings, sha256=d[1]),
            data,
        )
    rows = [
        _row_filters(zlib.decompress(block), li.image)
        for block, li in zip(idat, loaded, strict=True)
    ]
    steps["images"] = len(files)
    steps["decoder"] = "wuffs" if fast_png else "pillow"
    steps["paeth_row_share"] = sum(r[4] for r in rows) / max(1, sum(sum(r) for r in rows))
    outside = ("read_and_hash", "decode", "preprocess", "deidentified_copy")
    steps["outside_model_ms"] = sum(steps[k] for k in outside)
    steps["outside_model_pillow_ms"] = (
        steps["outside_model_ms"] - steps["decode"] + steps["decode_pillow"]
    )
    return steps


def _idat(data: bytes) -> bytes:
    """A PNG's compressed pixel data (its IDAT chunks joined)."""
    at, blocks = 8, []
    while at + 8 <= len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        if data[at + 4 : at + 8] == b"IDAT":
            blocks.append(data[at + 8 : at + 8 + length])
        at += 12 + length
    return b"".join(blocks)


def _row_filters(raw: bytes, image: Any) -> list[int]:
    """How many rows use each PNG filter (None, Sub, Up, Average, Paeth): Paeth on an
    8-bit grey image is one serial chain per row, the dearest to undo."""
    width, height = image.size
    stride = width * len(image.getbands()) + 1
    counts = [0] * 5
    for row in range(height):
        counts[raw[row * stride] % 5] += 1
    return counts


def child_ingest_split(args: argparse.Namespace) -> dict[str, Any]:
    """ingest's CPU per image split by where it runs (each stage's own thread CPU),
    end to end: the decode side (read+hash, decode+preprocess, de-identified copy),
    the model (its batches plus the runtime's thread pools that live through the
    run), the writer's transactions (client side: the database server is another
    process, not counted), and the rest of the process (scan, queues, the main
    thread, and threads a multi-threaded runtime starts and ends on its own: with
    ViT-B-32 on ONNX Runtime most of `rest` is those, with raiox-tiny it is ~0.3 ms).
    --count 1: every PNG through Pillow alone."""
    import collections
    import threading

    from raiox_cli.catalogue import ingest, pipeline
    from raiox_cli.clinics import privacy
    from raiox_cli.images import png

    png.ENABLED = png.available() and args.count != 1
    spent: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def clocked(owner: Any, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def timed(*a: Any, **k: Any) -> Any:
            start = time.thread_time()
            try:
                return inner(*a, **k)
            finally:
                with lock:
                    spent[label] += time.thread_time() - start

        setattr(owner, name, timed)

    clocked(ingest.FilePrep, "__call__", "decode_side")
    clocked(pipeline, "read", "read_and_hash")
    clocked(pipeline, "decode", "decode_and_preprocess")
    clocked(privacy, "store_image", "deidentified_copy")
    clocked(ingest, "embed_batch", "model")
    pools = {"start": 0.0, "seen": 0.0}
    batch = ingest.embed_batch

    def embed_then_look(*a: Any, **k: Any) -> Any:
        # ingest's own model (and its thread pools) goes when ingest returns: read the
        # pools' CPU after each batch, while they are there.
        try:
            return batch(*a, **k)
        finally:
            pools["seen"] = max(pools["seen"], _native_threads_cpu_s())

    ingest.embed_batch = embed_then_look
    clocked(ingest.RootIngest, "_write", "database")
    root = _catalogue(args.work / f"png-{args.images}", args.images, _parse_size(args.size))
    settings = _settings(Path(tempfile.mkdtemp(dir=args.work)), args)
    db.migrate(settings)
    embedder = embedding.load_embedder(embedding.ModelSpec.from_settings(settings))
    shape = embedder.preprocessor(images.load_image(next(root.rglob("*.png"))).image).shape
    embedder.embed_tensors(np.zeros((args.batch_size, *shape), np.float32))  # warm-up
    cpu = _cpu_s()
    pools["start"] = pools["seen"] = _native_threads_cpu_s()
    report = ingest.ingest_catalogue(settings, root)
    spent["model"] += pools["seen"] - pools["start"]
    per_image = {k: v * 1000 / report.embedded for k, v in spent.items()}
    total = (_cpu_s() - cpu) * 1000 / report.embedded
    named = per_image["decode_side"] + per_image["model"] + per_image["database"]
    return {
        "images": report.embedded,
        "decoder": "wuffs" if png.ENABLED else "pillow",
        "cpu_ms_per_image": total,
        "outside_model_ms": total - per_image["model"],
        **{f"{k}_ms": v for k, v in per_image.items()},
        "rest_ms": total - named,
    }


def _native_threads_cpu_s() -> float:
    """CPU seconds of this process's threads that Python did not start: the model's
    thread pools (ONNX Runtime's, OpenMP's), which work only for the model. Linux
    only (/proc); 0 elsewhere."""
    import threading

    python = {t.native_id for t in threading.enumerate()}
    total = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            if int(tid) in python:
                continue
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def child_tta_drift(args: argparse.Namespace) -> dict[str, Any]:
    """TTA's mirrored and upside-down views as flips of the preprocessed array (what
    search does) against preprocessing flipped pictures (what it did): cosine of the
    vectors, per view, on query radiographs of several sizes; and the CPU of each."""
    from raiox_cli.catalogue import pipeline

    settings = _settings(args.work / "model-only-home", args)
    embedder = embedding.load_embedder(embedding.ModelSpec.from_settings(settings))
    views = pipeline.ORIENTATIONS
    pictures = [
        synth.render_view(design, seed=i, query=True, size=size)
        for i, design in enumerate(synth.design_systems(12, seed=7))
        for size in ((1000, 800), (801, 1003), (257, 333))
    ]
    cpu = _cpu_s()
    flipped_arrays = [pipeline.views_of(p, embedder.preprocessor, views) for p in pictures]
    arrays_ms = (_cpu_s() - cpu) * 1000 / len(pictures)
    cpu = _cpu_s()
    flipped_pictures = [
        np.stack([embedder.preprocessor(v) for v in pipeline.oriented(p, views)]) for p in pictures
    ]
    pictures_ms = (_cpu_s() - cpu) * 1000 / len(pictures)
    a = embedder.embed_tensors(np.concatenate(flipped_arrays))
    b = embedder.embed_tensors(np.concatenate(flipped_pictures))
    cosines = np.sum(a * b, axis=1).reshape(len(pictures), len(views))
    return {
        "queries": len(pictures),
        "min_cosine_per_view": dict(zip(views, cosines.min(axis=0).tolist(), strict=True)),
        "mean_cosine": float(cosines.mean()),
        "preprocess_cpu_ms_per_xray": {"array_flips": arrays_ms, "flipped_pictures": pictures_ms},
    }


def child_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    """The synthetic eval's top-1 and MRR, fp32 then int8 on the same catalogue and
    queries: ingest in fp32, evaluate, switch with reindex --precision int8 (the
    gate on the catalogue's own images), evaluate again (TTA off)."""
    from raiox_cli.catalogue import reindex
    from raiox_cli.catalogue.ingest import ingest_catalogue
    from raiox_cli.search import evaluate

    if args.accuracy_data:  # a synthetic set made before (the one a model was adapted on)
        catalogue, queries_dir = args.accuracy_data / "catalogue", args.accuracy_data / "queries"
    else:
        info = synth.make_catalogue(
            Path(tempfile.mkdtemp(dir=args.work)),
            systems=args.accuracy_systems,
            views=4,
            queries=3,
            size=(256, 320),
        )
        catalogue, queries_dir = info.catalogue, info.queries_dir
    args.backend = "onnx"
    settings = _settings(
        Path(tempfile.mkdtemp(dir=args.work)), args, model=args.accuracy_model
    ).replace(precision="fp32", tta=False, weights=args.accuracy_weights)
    db.migrate(settings)
    ingest_catalogue(settings, catalogue)
    result: dict[str, Any] = {
        "model": args.accuracy_model,
        "weights": str(args.accuracy_weights) if args.accuracy_weights else None,
        "implants": len({p.parent for p in catalogue.rglob("*.png")}),
        "gate_cosine": args.int8_gate_cosine,
        "gate_agreement": args.int8_gate_agreement,
    }
    for precision_ in ("fp32", "int8"):
        if precision_ == "int8":
            settings = settings.replace(precision="int8")
            try:
                report = reindex.reindex(settings, switch=True)
            except Exception as exc:  # the parity gate refusing int8 is a result too
                result["int8"] = {"refused": str(exc)}
                break
            assert report.ok and report.switched, report.to_dict()
        found = evaluate.evaluate_source(settings, queries_dir)
        result[precision_] = {
            "model_id": found.model_id,
            "queries": found.queries,
            "top1": found.top1,
            "top3": found.top3,
            "mrr": found.mrr,
        }
    with db.connect(settings) as conn:
        row = queries.active_model(conn)
    gate = embedding.onnx.cached_export(
        embedding.onnx.cache_dir(settings.home, row.model_id), row.model_id
    )
    result["gate"] = gate.meta.get("parity") if gate else None
    if "refused" not in result["int8"]:
        for metric in ("top1", "top3", "mrr"):
            drop = result["fp32"][metric] - result["int8"][metric]
            result[f"{metric}_drop_points"] = 100 * drop
    return result


def child_batch_search(args: argparse.Namespace) -> dict[str, Any]:
    """`raiox search` over the same PNGs as X-rays (a 32-image catalogue), TTA off
    and on; target: TTA off >= 0.8 of model only, TTA on <= 3 images per X-ray."""
    from raiox_cli.catalogue.ingest import ingest_catalogue
    from raiox_cli.search import batch as batch_search

    size = _parse_size(args.size)
    queries_root = _catalogue(args.work / f"png-{args.images}", args.images, size)
    settings = _settings(Path(tempfile.mkdtemp(dir=args.work)), args)
    db.migrate(settings)
    ingest_catalogue(settings, _catalogue(args.work / "png-32", 32, size))
    embedder = embedding.load_embedder(embedding.ModelSpec.from_settings(settings))
    files = sorted(queries_root.rglob("*.png"))
    result: dict[str, Any] = {"images": len(files)}
    # The model alone on these very images, in this process, just before and after the
    # searches: a ratio that compares like with like on a machine whose load moves.
    pixels = np.stack([embedder.preprocessor(images.load_image(p).image) for p in files])
    embedder.embed_tensors(pixels[: args.batch_size])  # warm-up
    model_runs = []

    def model_only() -> None:
        start, cpu = time.perf_counter(), _cpu_s()
        for i in range(0, len(pixels), args.batch_size):
            embedder.embed_tensors(pixels[i : i + args.batch_size])
        elapsed = time.perf_counter() - start
        model_runs.append(
            {
                "images_per_s": len(pixels) / elapsed,
                "cpu_ms_per_image": (_cpu_s() - cpu) * 1000 / len(pixels),
            }
        )

    model_only()
    for label, tta in (("no_tta", False), ("tta", True)):
        cpu = _cpu_s()
        report = batch_search.search_many(
            settings.replace(tta=tta), files, emit=lambda record: None
        )
        result[label] = {
            "answered": report.answered,
            "failed": len(report.failed),
            "elapsed_s": report.elapsed_s,
            "xrays_per_s": report.per_s,
            "cpu_ms_per_xray": (_cpu_s() - cpu) * 1000 / max(1, report.answered),
        }
        model_only()
    result["model_only_runs"] = model_runs
    return result


def child_loop(args: argparse.Namespace) -> dict[str, Any]:
    """One image at a time: load, preprocess, encode, insert, commit."""
    import hashlib

    import torch

    from raiox_cli.catalogue.scan import scan

    root = _catalogue(args.work / f"png-{args.images}", args.images, _parse_size(args.size))
    settings = _settings(Path(tempfile.mkdtemp(dir=args.work)), args)
    db.migrate(settings)
    embedder = embedding.load_embedder(embedding.ModelSpec.from_settings(settings))
    embedder.embed_tensors(torch.zeros(1, 3, 224, 224))
    files = scan(root).files[: args.loop_images]
    start = time.perf_counter()
    with db.connect(settings) as conn:
        queries.register_model(conn, embedder.model_id, embedder.dim, 1)
        conn.commit()
        for f in files:
            loaded = images.load_image(f.path)
            vector = embedder.embed_tensors(embedder.preprocess(loaded.image)[None])[0]
            implant_id = queries.upsert_implant(conn, f.implant.as_row())
            image_id = queries.upsert_image(
                conn,
                {
                    "implant_id": implant_id,
                    "sha256": hashlib.sha256(f.path.read_bytes()).hexdigest(),
                    "source_path": f.rel,
                },
            )
            queries.copy_embeddings(conn, embedder.model_id, [(image_id, vector)])
            conn.commit()
    elapsed = time.perf_counter() - start
    return {"images": len(files), "elapsed_s": elapsed, "images_per_s": len(files) / elapsed}


def _decode(path: Path) -> Any:
    embedder = embedding.load_embedder(embedding.ModelSpec("ViT-B-32", "none", None, "cpu"))
    return embedder.preprocess(images.load_image(path).image)


def child_decode_pool(args: argparse.Namespace) -> dict[str, Any]:
    root = _catalogue(args.work / f"png-{args.images}", args.images, _parse_size(args.size))
    files = sorted(root.rglob("*.png"))[: args.loop_images]
    workers = args.workers or os.cpu_count() or 1
    _decode(files[0])
    result = {}
    start = time.perf_counter()
    for path in files:
        _decode(path)
    result["serial"] = len(files) / (time.perf_counter() - start)
    with ThreadPoolExecutor(workers) as pool:
        start = time.perf_counter()
        list(pool.map(_decode, files))
        result["threads"] = len(files) / (time.perf_counter() - start)
    # spawn, not fork: forking a process whose torch thread pool is running hangs.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_decode, files[:workers]))  # model load in each worker, off the clock
        start = time.perf_counter()
        list(pool.map(_decode, files))
        result["processes"] = len(files) / (time.perf_counter() - start)
    return {"images": len(files), "workers": workers, "images_per_s": result}


def child_rss(args: argparse.Namespace) -> dict[str, Any]:
    from raiox_cli.catalogue.ingest import ingest_catalogue

    root = _catalogue(args.work / f"small-{args.count}", args.count, (320, 256))
    settings = _settings(Path(tempfile.mkdtemp(dir=args.work)), args, model=args.rss_model)
    db.migrate(settings)
    report = ingest_catalogue(settings, root)
    return {"images": report.embedded, "peak_rss_mb": _peak_rss_mb()}


CHILDREN = {
    "model_only": child_model_only,
    "ingest": child_ingest,
    "breakdown": child_breakdown,
    "ingest_split": child_ingest_split,
    "tta_drift": child_tta_drift,
    "accuracy": child_accuracy,
    "batch_search": child_batch_search,
    "loop": child_loop,
    "decode_pool": child_decode_pool,
    "rss": child_rss,
}


def _child(
    name: str, args: argparse.Namespace, *extra: str, env: dict[str, str] | None = None
) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", name, *_forward(args), *extra]
    done = subprocess.run(
        command, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})}
    )
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{name} {' '.join(extra)}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def _forward(args: argparse.Namespace) -> list[str]:
    out = []
    keys = ("images", "size", "model", "batch_size", "workers", "device", "backend", "work")
    more = ("precision", "int8_gate_cosine", "int8_gate_agreement", "accuracy_model")
    for key in (*keys, *more, "accuracy_systems"):
        out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    out += ["--loop-images", str(args.loop_images), "--rss-model", args.rss_model]
    out += ["--breakdown-rounds", str(args.breakdown_rounds)]
    for key in ("accuracy_weights", "accuracy_data"):
        if getattr(args, key) is not None:
            out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return out


def unchanged(args: argparse.Namespace) -> dict[str, Any]:
    """Wall time of the CLI over an unchanged catalogue, process start included."""
    root = _catalogue(
        args.work / f"small-{args.unchanged_images}", args.unchanged_images, (320, 256)
    )
    home = Path(tempfile.mkdtemp(dir=args.work))
    env = {
        **os.environ,
        "RAIOX_HOME": str(home),
        "RAIOX_MODEL": args.rss_model,
        "RAIOX_PRETRAINED": "none",
        "RAIOX_DEVICE": "cpu",
    }
    env.pop("RAIOX_DATABASE_URL", None)
    cli = [sys.executable, "-m", "raiox_cli"]
    subprocess.run([*cli, "init-db"], env=env, check=True, capture_output=True)
    subprocess.run([*cli, "ingest", str(root), "--json"], env=env, check=True, capture_output=True)
    start = time.perf_counter()
    done = subprocess.run(
        [*cli, "ingest", str(root), "--json"], env=env, check=True, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    report = json.loads(done.stdout)
    return {
        "images": report["unchanged"],
        "wall_s": wall,
        "core_s": report["elapsed_s"],
        "embedded": report["embedded"],
        "model_loaded": report["model_loaded"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", default="1000x800", help="WxH of the synthetic PNGs")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="0 = CPU count")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--backend",
        default="torch",
        choices=config.BACKENDS,
        help="RAIOX_BACKEND for every run (auto picks onnx on a CPU: name what is measured)",
    )
    parser.add_argument("--precision", default="fp32", help="fp32, int8 (onnx), fp16/bf16 (cuda)")
    parser.add_argument(
        "--int8-gate-cosine",
        type=float,
        default=0.98,
        help="the parity gate's cosine for this speed-only export (random weights)",
    )
    parser.add_argument(
        "--int8-gate-agreement",
        type=float,
        default=0.99,
        help="the parity gate's top-3 agreement (lower it to measure a model it refuses)",
    )
    parser.add_argument("--accuracy-model", default="raiox-tiny", help="model for accuracy")
    parser.add_argument("--accuracy-systems", type=int, default=40, help="implants for accuracy")
    parser.add_argument(
        "--accuracy-weights", type=Path, default=None, help="accuracy: a checkpoint (raiox adapt's)"
    )
    parser.add_argument(
        "--accuracy-data",
        type=Path,
        default=None,
        help="accuracy: a synthetic set (catalogue/, queries/) instead of a fresh one",
    )
    parser.add_argument("--loop-images", type=int, default=128, help="images for the loop")
    parser.add_argument("--unchanged-images", type=int, default=2000)
    parser.add_argument("--rss-images", default="200,2000")
    parser.add_argument("--rss-model", default="raiox-tiny", help="model for unchanged/rss runs")
    parser.add_argument("--only", default="", help="comma list of sections to run")
    parser.add_argument(
        "--breakdown-rounds", type=int, default=3, help="breakdown: rounds, the fastest counts"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="model_only/ingest pairs, side by side, N times"
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "raiox-bench")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return

    only = set(filter(None, args.only.split(",")))
    want = lambda name: not only or name in only  # noqa: E731
    result: dict[str, Any] = {
        "machine": f"{os.cpu_count()} CPUs",
        "model": args.model,
        "device": args.device,
        "batch_size": args.batch_size,
        "size": args.size,
        "backend": args.backend,
        "precision": args.precision,
        "load_before": os.getloadavg(),
    }
    for _ in range(args.repeat):
        if want("model_only"):
            _keep(result, "model_only", _child("model_only", args))
        if want("ingest"):
            _keep(result, "ingest", _child("ingest", args))
        if "passive" in only:  # the same pair with OpenMP threads that sleep at once
            passive = {"OMP_WAIT_POLICY": "PASSIVE"}
            _keep(result, "model_only_passive", _child("model_only", args, env=passive))
            _keep(result, "ingest_passive", _child("ingest", args, env=passive))
    if want("breakdown"):
        result["breakdown"] = _child("breakdown", args)
    if want("ingest_split"):
        result["ingest_split"] = {
            "fast_png": _child("ingest_split", args),
            "pillow": _child("ingest_split", args, "--count", "1"),
        }
    if want("accuracy"):
        result["accuracy"] = _child("accuracy", args)
    if want("tta_drift"):
        result["tta_drift"] = _child("tta_drift", args)
    if want("batch_search"):
        result["batch_search"] = _child("batch_search", args)
    if want("loop"):
        result["loop"] = _child("loop", args)
    if want("decode_pool"):
        result["decode_pool"] = _child("decode_pool", args)
    if want("unchanged"):
        result["unchanged"] = unchanged(args)
    if want("rss"):
        small, large = (int(n) for n in args.rss_images.split(","))
        result["rss"] = {
            str(small): _child("rss", args, "--count", str(small)),
            str(large): _child("rss", args, "--count", str(large)),
        }
        result["rss"]["growth"] = (
            result["rss"][str(large)]["peak_rss_mb"] / result["rss"][str(small)]["peak_rss_mb"] - 1
        )
    for name in ("model_only", "ingest", "model_only_passive", "ingest_passive"):
        if name in result and len(result[name]) == 1:
            result[name] = result[name][0]
        elif name in result:
            result[name + "_runs"] = result.pop(name)
    if "ingest_runs" in result and "model_only_runs" in result:
        result["ingest_over_model_only_runs"] = [
            i["images_per_s"] / m["images_per_s"]
            for m, i in zip(result["model_only_runs"], result["ingest_runs"], strict=True)
        ]
    if "ingest_passive" in result and "model_only_passive" in result:
        result["passive_ingest_over_model_only"] = (
            result["ingest_passive"]["images_per_s"] / result["model_only_passive"]["images_per_s"]
        )
    if "ingest" in result and "model_only" in result and "breakdown" in result:
        outside = result["ingest"]["cpu_ms_per_image"] - result["model_only"]["cpu_ms_per_image"]
        result["breakdown"]["ingest_outside_model_ms"] = outside
        result["breakdown"]["database_and_rest_ms"] = (
            outside - result["breakdown"]["outside_model_ms"]
        )
    if "ingest" in result and "model_only" in result:
        result["ingest_over_model_only"] = (
            result["ingest"]["images_per_s"] / result["model_only"]["images_per_s"]
        )
        # What a quiet CPU-bound machine would show if decoding overlaps perfectly:
        # the model's CPU cost over the whole pipeline's (this process's threads).
        result["cpu_ratio"] = (
            result["model_only"]["cpu_ms_per_image"] / result["ingest"]["cpu_ms_per_image"]
        )
    if "batch_search" in result:
        # Against the model alone in the same process, timed before and after each
        # search (the mean of the two runs around it).
        searched = result["batch_search"]
        runs = searched["model_only_runs"]
        around = {
            label: [
                (runs[n][key] + runs[n + 1][key]) / 2
                for key in ("images_per_s", "cpu_ms_per_image")
            ]
            for n, label in enumerate(("no_tta", "tta"))
        }
        rate, cpu = around["no_tta"]
        result["search_no_tta_over_model_only"] = searched["no_tta"]["xrays_per_s"] / rate
        result["search_no_tta_cpu_ratio"] = cpu / searched["no_tta"]["cpu_ms_per_xray"]
        rate, cpu = around["tta"]
        result["search_tta_images_per_xray"] = rate / searched["tta"]["xrays_per_s"]
        result["search_tta_cpu_images_per_xray"] = searched["tta"]["cpu_ms_per_xray"] / cpu
    if "ingest" in result and "loop" in result:
        result["ingest_over_loop"] = (
            result["ingest"]["images_per_s"] / result["loop"]["images_per_s"]
        )
    result["load_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    _table(result)


def _keep(result: dict[str, Any], name: str, run: dict[str, Any]) -> None:
    result.setdefault(name, []).append(run)


def _table(r: dict[str, Any]) -> None:
    rows = []
    for n, ratio in enumerate(r.get("ingest_over_model_only_runs", []), start=1):
        m, i = r["model_only_runs"][n - 1], r["ingest_runs"][n - 1]
        rows.append(
            (
                f"run {n}: model only / ingest (img/s; CPU ms/img)",
                f"{m['images_per_s']:.1f} / {i['images_per_s']:.1f} "
                f"({m['cpu_ms_per_image']:.0f} / {i['cpu_ms_per_image']:.0f}): "
                f"ratio {ratio:.2f}",
            )
        )
    if "passive_ingest_over_model_only" in r:
        m, i = r["model_only_passive"], r["ingest_passive"]
        rows.append(
            (
                "OMP_WAIT_POLICY=PASSIVE: model only / ingest",
                f"{m['images_per_s']:.1f} / {i['images_per_s']:.1f} "
                f"({m['cpu_ms_per_image']:.0f} / {i['cpu_ms_per_image']:.0f}): "
                f"ratio {r['passive_ingest_over_model_only']:.2f}",
            )
        )
    if "model_only" in r:
        rows.append(("model only (img/s)", f"{r['model_only']['images_per_s']:.1f}"))
    if "ingest" in r:
        rows.append(("ingest end-to-end (img/s)", f"{r['ingest']['images_per_s']:.1f}"))
    if "ingest_over_model_only" in r:
        rows.append(("  ratio to model only (>= 0.85)", f"{r['ingest_over_model_only']:.2f}"))
    if "cpu_ratio" in r:
        rows.append(
            (
                "  CPU ms/image model only vs ingest",
                f"{r['model_only']['cpu_ms_per_image']:.0f} vs "
                f"{r['ingest']['cpu_ms_per_image']:.0f} (ratio {r['cpu_ratio']:.2f})",
            )
        )
    if "batch_search" in r:
        b = r["batch_search"]
        for label in ("no_tta", "tta"):
            rows.append(
                (
                    f"batch search, {label} (X-rays/s; CPU ms/X-ray)",
                    f"{b[label]['xrays_per_s']:.1f}; {b[label]['cpu_ms_per_xray']:.0f}",
                )
            )
    if "search_no_tta_over_model_only" in r:
        rows.append(
            (
                "  no TTA: ratio to model only (>= 0.8), wall; CPU",
                f"{r['search_no_tta_over_model_only']:.2f}; {r['search_no_tta_cpu_ratio']:.2f}",
            )
        )
        rows.append(
            (
                "  TTA: model images per X-ray (<= 3), wall; CPU",
                f"{r['search_tta_images_per_xray']:.2f}; {r['search_tta_cpu_images_per_xray']:.2f}",
            )
        )
    if "breakdown" in r:
        b = r["breakdown"]
        rows.append(
            (
                f"CPU ms/image outside the model ({b['decoder']}; Pillow alone)",
                f"{b['outside_model_ms']:.1f} ({b['outside_model_pillow_ms']:.1f})",
            )
        )
        for step in ("read_and_hash", "decode", "decode_pillow", "inflate_only", "preprocess"):
            rows.append((f"  {step}", f"{b[step]:.2f}"))
        rows.append(("  deidentified_copy", f"{b['deidentified_copy']:.2f}"))
        rows.append(("  rows filtered with Paeth", f"{b['paeth_row_share']:.0%}"))
    for label, split in r.get("ingest_split", {}).items():
        rows.append(
            (
                f"ingest CPU ms/image outside the model ({label}: {split['decoder']})",
                f"{split['outside_model_ms']:.1f}: decode side {split['decode_side_ms']:.1f} "
                f"(decode+preprocess {split['decode_and_preprocess_ms']:.1f}), "
                f"database {split['database_ms']:.2f}, rest {split['rest_ms']:.2f}",
            )
        )
    if "loop" in r:
        rows.append(("one-at-a-time loop (img/s)", f"{r['loop']['images_per_s']:.1f}"))
    if "ingest_over_loop" in r:
        rows.append(("  ingest / loop", f"{r['ingest_over_loop']:.2f}x"))
    if "decode_pool" in r:
        for kind, rate in r["decode_pool"]["images_per_s"].items():
            rows.append((f"decode+preprocess {kind} (img/s)", f"{rate:.1f}"))
    if "unchanged" in r:
        u = r["unchanged"]
        rows.append(
            (
                f"unchanged re-ingest of {u['images']} (< 5 s)",
                f"{u['wall_s']:.2f} s wall, model loaded: {u['model_loaded']}",
            )
        )
    if "rss" in r:
        for count, value in r["rss"].items():
            if count != "growth":
                rows.append((f"peak RSS, {count} images (MB)", f"{value['peak_rss_mb']:.0f}"))
        rows.append(("  growth (<= 10%)", f"{r['rss']['growth'] * 100:.1f}%"))
    width = max(len(name) for name, _ in rows) if rows else 0
    for name, value in rows:
        print(f"{name:<{width}}  {value}", file=sys.stderr)


if __name__ == "__main__":
    main()
