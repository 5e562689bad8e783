"""Webhook server benchmark: sustained POST /webhook acceptance (the 202 path) and
end-to-end analysis completion under concurrent loopback load, then a check that
no accepted analysis was lost or duplicated.

    python bench/bench_server.py                            # ViT-B-32, random weights, CPU
    python bench/bench_server.py --requests 400 --concurrency 32 --workers-threads 4
    python bench/bench_server.py --batch 1,8                # one-at-a-time vs batched, side by side

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

from raiox_cli import config, db, ingest, synth
from raiox_cli.server import auth


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
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="raiox-bench-server-"))
    token = secrets.token_urlsafe(24)
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    env = {
        **os.environ,
        "RAIOX_HOME": str(work / "home"),
        "RAIOX_MODEL": args.model,
        "RAIOX_PRETRAINED": "none",
        "RAIOX_DEVICE": "cpu",
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
            f"{one['check']['replays_same_id']}/{one['check']['replays']}",
            file=sys.stderr,
        )
    for name, value in result.items():
        if name.startswith("speedup"):
            print(f"\nanalyses/s {name}: {value}", file=sys.stderr)


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
        server = subprocess.Popen(command, env=env, stdout=log, stderr=log)
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
        result = _load(args, base, token, secret, query_urls, settings)
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
