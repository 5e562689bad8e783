"""Webhook server benchmark: sustained POST /webhook acceptance (the 202 path) and
end-to-end analysis completion under concurrent loopback load, then a check that
no accepted analysis was lost or duplicated.

    python bench/bench_server.py                            # ViT-B-32, random weights, CPU
    python bench/bench_server.py --requests 400 --concurrency 32 --workers-threads 4
    python bench/bench_server.py --batch 1,8                # one-at-a-time vs batched, side by side
    python bench/bench_server.py --backend onnx --precision int8   # against --precision fp32

The server runs as its own process (`raiox serve-webhook-minimal`, token +
Standard Webhooks signatures) on an embedded PostgreSQL under a temporary home;
X-rays are synthetic radiographs served by a local HTTP server. Every
--replay-every-th delivery is sent twice (same webhook-id) to check dedupe.
Prints one JSON object on stdout and a short table on stderr.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from raiox_cli import config, db, lifecycle
from raiox_cli.catalogue import ingest
from raiox_cli.db import embedded
from raiox_cli.embedding import precision
from raiox_cli.server import auth
from raiox_cli.training import synth

WORK_PREFIX = "raiox-bench-server-"


def _percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    if not ordered:
        return {}
    return {
        "p50_ms": round(statistics.median(ordered), 1),
        "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 1),
        "max_ms": round(ordered[-1], 1),
    }


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def _serve_folder(folder: Path) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument(
        "--backend",
        default="torch",
        choices=config.BACKENDS,
        help="the server's RAIOX_BACKEND (auto picks onnx on a CPU: name what is measured)",
    )
    parser.add_argument("--precision", default="fp32", help="the server's RAIOX_PRECISION")
    parser.add_argument(
        "--int8-gate-cosine",
        type=float,
        default=0.98,
        help="the parity gate's cosine for the int8 export made here (random weights: "
        "speed only; bench_ingest.py says why)",
    )
    parser.add_argument("--requests", type=int, default=200, help="distinct deliveries")
    parser.add_argument("--concurrency", type=int, default=16, help="client threads")
    parser.add_argument("--workers-threads", type=int, default=2)
    parser.add_argument(
        "--batch",
        default="8",
        help="server --batch; a comma list (e.g. 1,8) runs each in turn on the same catalogue",
    )
    parser.add_argument("--systems", type=int, default=12, help="catalogue implants")
    parser.add_argument("--views", type=int, default=3, help="catalogue images per implant")
    parser.add_argument("--queries", type=int, default=3, help="distinct query X-rays per implant")
    parser.add_argument("--size", type=int, default=256, help="image height in pixels")
    parser.add_argument("--replay-every", type=int, default=10, help="0 = no replays")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="paced arrivals per second (0 = as fast as the clients can send: a burst)",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for all jobs")
    parser.add_argument(
        "--model-bound",
        action="store_true",
        help="only time the forward pass of one job (3 TTA images) against a batch of jobs "
        "(--batch's largest x 3) in this process: what batching alone can buy",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the server with py-spy (native frames) during the load and print where "
        "its CPU goes; the raw samples stay in the work folder",
    )
    args = parser.parse_args()
    if args.model_bound:
        print(json.dumps(_model_bound(args)))
        return
    # SIGTERM/SIGHUP unwind like Ctrl-C: the server child is stopped (finally in
    # _run) and the embedded PostgreSQL this process holds stops at exit.
    lifecycle.exit_on_termination()
    _stop_orphans()

    work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX))
    token = secrets.token_urlsafe(24)
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    env = {
        **os.environ,
        "RAIOX_HOME": str(work / "home"),
        "RAIOX_MODEL": args.model,
        "RAIOX_PRETRAINED": "none",
        "RAIOX_DEVICE": "cpu",
        "RAIOX_BACKEND": args.backend,
        "RAIOX_PRECISION": args.precision,
        "HF_HUB_OFFLINE": "1",
        "RAIOX_WEBHOOK_TOKEN": token,
        "RAIOX_WEBHOOK_SECRET": secret,
        "RAIOX_DOWNLOAD_ALLOW_LOOPBACK": "1",
    }
    for key in ("RAIOX_DATABASE_URL", "RAIOX_S3_BUCKET", "RAIOX_NOTIFY_URL"):
        env.pop(key, None)
    settings = config.resolve(env=env)
    size = (int(args.size * 0.8), args.size)
    print(f"building a {args.systems}x{args.views} catalogue with {args.model}...", file=sys.stderr)
    info = synth.make_catalogue(
        work / "synth", systems=args.systems, views=args.views, queries=args.queries, size=size
    )
    db.migrate(settings)
    precision.GATE_COSINE = args.int8_gate_cosine  # the int8 export is made here, not timed
    ingest.ingest_catalogue(settings, info.catalogue)
    images_server, images_base = _serve_folder(info.queries_dir)
    query_urls = [
        images_base + "/" + str(p.relative_to(info.queries_dir)).replace(" ", "%20")
        for p in info.query_files
    ]

    results = {}
    try:
        for batch in [int(b) for b in str(args.batch).split(",")]:
            if results:
                _forget_analyses(settings)  # each run starts from an empty queue
            results[batch] = _run(args, env, work, batch, token, secret, query_urls, settings)
    finally:
        images_server.shutdown()
    config_ = {
        "model": f"{args.model}:none (random weights)",
        "backend": args.backend,
        "precision": args.precision,
        "load_average": os.getloadavg(),
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "rate_per_s": args.rate or "burst",
        "workers_threads": args.workers_threads,
        "catalogue_images": args.systems * args.views,
        "image_size": list(size),
    }
    if len(results) == 1:
        result = {**next(iter(results.values())), "config": config_}
    else:
        result = {"runs": {f"batch_{b}": r for b, r in results.items()}, "config": config_}
        first, *rest = results
        base_rate = results[first]["end_to_end"]["analyses_per_s"] or 0
        result["speedup_vs_batch_" + str(first)] = {
            f"batch_{b}": round(results[b]["end_to_end"]["analyses_per_s"] / base_rate, 2)
            for b in rest
            if base_rate and results[b]["end_to_end"]["analyses_per_s"]
        }
    print(json.dumps(result))
    for batch, one in results.items():
        accept, e2e = one["accept"], one["end_to_end"]
        print(
            f"\n--batch {batch}:\n"
            f"accept (POST /webhook -> 202): {accept['req_per_s']} req/s, "
            f"p50 {accept['p50_ms']} ms, p95 {accept['p95_ms']} ms\n"
            f"end to end (accepted -> done): {e2e['analyses_per_s']} analyses/s, "
            f"p50 {e2e['p50_ms']} ms, p95 {e2e['p95_ms']} ms\n"
            f"lost {one['check']['lost']}, duplicated {one['check']['duplicated']}, "
            f"failed {one['check']['failed']}, replays answered with the same id: "
            f"{one['check']['replays_same_id']}/{one['check']['replays']}\n"
            f"CPU ms per analysis: {one['cpu_ms_per_analysis']}",
            file=sys.stderr,
        )
        if "profile" in one:
            print(f"where the server's samples fall: {one['profile']}", file=sys.stderr)
    for name, value in result.items():
        if name.startswith("speedup"):
            print(f"\nanalyses/s {name}: {value}", file=sys.stderr)


def _model_bound(args: argparse.Namespace, repeats: int = 5) -> dict[str, Any]:
    """Forward passes alone, one job's 3 images vs a full batch's, interleaved so the
    machine's load falls on both alike: per image, wall and CPU (all threads)."""
    import numpy as np

    from raiox_cli import embedding

    jobs = max(int(b) for b in str(args.batch).split(","))
    home = Path(tempfile.gettempdir()) / "raiox-bench-model-bound"  # the ONNX export, kept
    spec = embedding.ModelSpec(args.model, "none", None, "cpu", args.backend, home, args.precision)
    embedder = embedding.load_embedder(spec)
    from PIL import Image

    shape = embedder.preprocessor(Image.new("L", (args.size, args.size))).shape  # (3, H, W)
    rng = np.random.default_rng(0)
    one, many = (rng.random((n, *shape), dtype=np.float32) for n in (3, 3 * jobs))
    embedder.embed_tensors(many)  # warm-up
    wall = {"job": 0.0, "batch": 0.0}
    cpu = dict(wall)
    for _ in range(repeats):
        for name, pixels, passes in (("job", one, jobs), ("batch", many, 1)):
            started, cpu_started = time.perf_counter(), time.process_time()
            for _ in range(passes):
                embedder.embed_tensors(pixels)
            wall[name] += time.perf_counter() - started
            cpu[name] += time.process_time() - cpu_started
    images = 3 * jobs * repeats
    per_image = {
        f"{name}_{kind}_ms_per_image": round(table[name] * 1000 / images, 1)
        for kind, table in (("wall", wall), ("cpu", cpu))
        for name in table
    }
    return {
        "jobs_per_batch": jobs,
        **per_image,
        "bound_wall": round(wall["job"] / wall["batch"], 2),
        "bound_cpu": round(cpu["job"] / cpu["batch"], 2),
        "load_average": os.getloadavg(),
    }


def _cpu_s(pid: int, settings: config.Settings) -> dict[str, float]:
    """CPU seconds so far of the server process (all its threads) and of the
    embedded PostgreSQL's processes (every backend: the jobs' queries)."""
    import psutil

    def total(process: psutil.Process, reaped: bool = False) -> float:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            # The postmaster's reaped children: backends that already exited.
            extra = times.children_user + times.children_system if reaped else 0.0
            return times.user + times.system + extra
        return 0.0

    pgdata = str(settings.pgdata_dir)
    postgres = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"] and pgdata in " ".join(p.info["cmdline"])
    ]
    postmaster = [p for p in postgres if p.info["cmdline"][0].endswith("postgres")]
    backends = [child for root in postmaster for child in root.children()]
    return {
        "server": total(psutil.Process(pid)),
        "postgres": sum(total(p, reaped=True) for p in postmaster)
        + sum(total(p) for p in backends),
    }


# Where a sampled stack spends its time, first match from the leaf up; a stack that
# matches none is "other". Names are substrings of py-spy's frames.
PROFILE_PLACES = (
    ("model forward (ONNX Runtime)", ("onnxruntime", "InferenceSession.run", "MlasSgemm")),
    ("model forward (torch)", ("torch::", "at::", "libtorch")),
    ("preprocess", ("preprocess", "_transform", "resize", "ImagingResample")),
    ("decode", ("decode", "load_image", "ImagingDecode", "png_", "inflate", "PngImagePlugin")),
    ("de-identify", ("deidentify", "strip_metadata", "clean_bytes")),
    ("hash", ("sha256", "hashlib")),
    ("database", ("psycopg", "libpq", "pq_")),
    ("download", ("download", "httpx", "httpcore", "ssl")),
    ("signatures and auth", ("signature", "hmac", "verify")),
    ("event loop", ("uvicorn", "asyncio", "anyio", "starlette", "fastapi", "epoll")),
    ("idle wait", ("pthread_cond", "futex", "wait (threading", "select", "poll (")),
)


def _start_profile(pid: int, path: Path) -> subprocess.Popen:
    """py-spy sampling the server (all threads, native frames: it pauses the server
    100 times a second, so CPU figures of a --profile run run a little high)."""
    import shutil

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    command = [spy, "record", "--pid", str(pid), "--rate", "100", "--native"]
    command += ["--threads", "--format", "raw", "--output", str(path)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _profile_summary(path: Path) -> dict[str, Any]:
    """Samples by place (PROFILE_PLACES), and the heaviest leaf frames of "other"."""
    if not path.exists():
        return {"error": "py-spy wrote nothing (not installed, or not allowed to attach)"}
    places: dict[str, int] = {}
    others: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        for frame in reversed(frames):  # the leaf first
            place = next(
                (name for name, keys in PROFILE_PLACES if any(k in frame for k in keys)), None
            )
            if place:
                break
        else:
            place = "other"
            others[frames[-1][:120]] = others.get(frames[-1][:120], 0) + n
        places[place] = places.get(place, 0) + n
    share = {k: round(v / total, 3) for k, v in sorted(places.items(), key=lambda kv: -kv[1])}
    top = sorted(others.items(), key=lambda kv: -kv[1])[:15]
    return {"samples": total, "share": share, "other_leaves": {k: v for k, v in top}}


def _stop_orphans() -> None:
    """Stop embedded servers that killed (SIGKILL) earlier runs left behind."""
    for pgdata in Path(tempfile.gettempdir()).glob(WORK_PREFIX + "*/home/pgdata"):
        with contextlib.suppress(Exception):  # another run's, mid-start: leave it
            if embedded.inspect(pgdata).orphaned:
                embedded.stop(pgdata)
                print(f"stopped an orphaned PostgreSQL in {pgdata}", file=sys.stderr)


def _die_with_parent() -> None:
    """In the server child: SIGTERM when the bench dies, even by SIGKILL (Linux), so
    a killed bench never leaves a server holding the embedded database."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _forget_analyses(settings: config.Settings) -> None:
    with db.connect(settings) as conn:
        conn.execute("TRUNCATE analyses CASCADE")
        conn.commit()


def _run(
    args: argparse.Namespace,
    env: dict[str, str],
    work: Path,
    batch: int,
    token: str,
    secret: str,
    query_urls: list[str],
    settings: config.Settings,
) -> dict[str, Any]:
    """One server process with `--batch batch`, loaded as asked."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = work / f"server-batch{batch}.log"
    command = [
        sys.executable, "-m", "raiox_cli", "serve-webhook-minimal", "--port", str(port),
        "--workers-threads", str(args.workers_threads), "--batch", str(batch),
    ]  # fmt: skip
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            command, env=env, stdout=log, stderr=log, preexec_fn=_die_with_parent
        )
    try:
        started = time.monotonic()
        while True:
            if server.poll() is not None:
                raise SystemExit("server exited:\n" + log_path.read_text()[-2000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthcheck").status_code == 200:
                    break
            time.sleep(0.2)
        startup_s = time.monotonic() - started
        before = _cpu_s(server.pid, settings)
        profile = work / f"profile-batch{batch}.txt"
        sampler = _start_profile(server.pid, profile) if args.profile else None
        result = _load(args, base, token, secret, query_urls, settings)
        after = _cpu_s(server.pid, settings)
        if sampler is not None:
            sampler.send_signal(signal.SIGINT)  # py-spy writes its samples and exits
            sampler.wait(120)
            result["profile"] = {"samples_file": str(profile), **_profile_summary(profile)}
        done = result["end_to_end"]["done"] or 1
        # CPU per analysis: unlike analyses/s, barely moved by other processes on
        # the machine (a loaded CPU shows in wall time, not in what a job costs).
        result["cpu_ms_per_analysis"] = {
            name: round((after[name] - before[name]) * 1000 / done, 1) for name in before
        }
        result["server_startup_s"] = round(startup_s, 2)
        result["batch"] = batch
    finally:
        server.terminate()
        server.wait(60)
    return result


def _load(
    args: argparse.Namespace,
    base: str,
    token: str,
    secret: str,
    query_urls: list[str],
    settings: config.Settings,
) -> dict[str, Any]:
    deliveries = [
        (f"msg_bench_{n}", {"image_url": query_urls[n % len(query_urls)], "client_id": f"c{n}"})
        for n in range(args.requests)
    ]
    if args.replay_every:
        deliveries += [deliveries[n] for n in range(0, args.requests, args.replay_every)]
    local = threading.local()

    def send(item: tuple[int, tuple[str, dict[str, Any]]]) -> tuple[str, int, float, int]:
        index, delivery = item
        if args.rate > 0:  # open-loop pacing: arrivals do not wait for answers
            time.sleep(max(0.0, t0 + index / args.rate - time.perf_counter()))
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(timeout=60)
        msg_id, body = delivery
        raw = json.dumps(body).encode()
        headers = {
            **auth.signature_headers(secret, msg_id, raw),
            "content-type": "application/json",
            "authorization": f"Bearer {token}",
        }
        started = time.perf_counter()
        response = client.post(f"{base}/webhook", content=raw, headers=headers)
        elapsed = (time.perf_counter() - started) * 1000
        return msg_id, response.status_code, elapsed, response.json().get("id", -1)

    t0 = started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        answers = list(pool.map(send, enumerate(deliveries)))
    accept_wall = time.perf_counter() - started
    first = {}
    replays = replays_same = 0
    for msg_id, _status, _ms, analysis_id in answers[: args.requests]:
        first[msg_id] = analysis_id
    for msg_id, _status, _ms, analysis_id in answers[args.requests :]:
        replays += 1
        replays_same += first.get(msg_id) == analysis_id
    accepted = [a for a in answers[: args.requests] if a[1] == 202]

    deadline = time.monotonic() + args.timeout
    with db.connect(settings) as conn:
        while True:
            pending = conn.execute(
                "SELECT count(*) FROM analyses WHERE status IN ('pending', 'running')"
            ).fetchone()[0]
            conn.commit()
            if pending == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        rows = conn.execute(
            """SELECT public_id::text, idempotency_key, status,
                      extract(epoch FROM finished_at - created_at) * 1000,
                      extract(epoch FROM created_at), extract(epoch FROM finished_at)
               FROM analyses"""
        ).fetchall()
    done = [r for r in rows if r[2] == "done"]
    keys = [r[1] for r in rows]
    e2e_ms = [float(r[3]) for r in done]
    span = (max(float(r[5]) for r in done) - min(float(r[4]) for r in done)) if done else 0
    return {
        "accept": {
            "sent": len(answers),
            "status_202": len(accepted),
            "non_2xx": sum(1 for a in answers if not 200 <= a[1] < 300),
            "req_per_s": round(len(answers) / accept_wall, 1),
            **_percentiles([a[2] for a in answers]),
        },
        "end_to_end": {
            "done": len(done),
            "analyses_per_s": round(len(done) / span, 2) if span else None,
            **_percentiles(e2e_ms),
        },
        "check": {
            "lost": len({str(a[3]) for a in accepted} - {r[0] for r in rows}),
            "duplicated": len(keys) - len(set(keys)) + max(0, len(rows) - args.requests),
            "failed": sum(1 for r in rows if r[2] == "failed"),
            "unfinished": sum(1 for r in rows if r[2] in ("pending", "running")),
            "replays": replays,
            "replays_same_id": replays_same,
        },
    }


if __name__ == "__main__":
    main()
