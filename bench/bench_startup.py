"""Cold start of the torch path: `raiox search q.png --json --no-tta` from the shell,
the code before the fast loader (a git worktree of --old-ref) against this tree.

    python bench/bench_startup.py                  # 3 paired runs, ViT-B-32
    python bench/bench_startup.py --runs 5 --old-ref main~3

Setting: a ViT-B-32 checkpoint with random weights in the real safetensors format
(written once under --work) in RAIOX_WEIGHTS, a 32-image synthetic catalogue
ingested first, the embedded PostgreSQL (each process starts and stops it, as a
user's would), RAIOX_BACKEND=torch. Each run is a whole process: wall time and
the peak RSS of the raiox process (/usr/bin/time), old and new alternating. Then the
breakdown: the same steps as `raiox search`, timed one by one in a child process
of each tree. The old and new answers must be the same (same scores).

Prints one JSON object on stdout and a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = "ViT-B-32"
# The commit before the fast loader and the checkpoint hash cache landed.
DEFAULT_OLD_REF = "767db72"

PHASES = r"""
import json, re, resource, sys, time
def rss():  # this process's resident MiB now
    status = open("/proc/self/status").read()
    return round(int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024)
t = [("start", time.perf_counter(), rss())]
def mark(name):
    t.append((name, time.perf_counter(), rss()))
from pathlib import Path
import raiox_cli.cli
from raiox_cli import config, db, embedding
from raiox_cli.search import query as search
mark("import raiox")
settings = config.resolve()
spec = embedding.ModelSpec.from_settings(settings)
data = search.read_query(Path(sys.argv[1]), settings)
loaded = search.load_query(Path(sys.argv[1]), settings, None, data=data)
mark("decode query")
conn = db.connect(settings).__enter__()
db.check_schema(conn)
mark("database start")
model = search.catalogue_model(conn, embedding.model_id(spec))
mark("model id (checkpoint hash)")
import torch
mark("import torch")
import open_clip
mark("import open_clip")
embedder = embedding.load_embedder(spec)
mark("model build + load")
pictures, orientations = search.oriented(loaded.image, False)
vectors = embedder.embed_images(pictures)
mark("embed (first forward)")
search.search_vectors(conn, model, vectors, k=3, manufacturer=None,
    ef_search=settings.ef_search, min_score=settings.min_score, orientations=orientations)
mark("query (pgvector)")
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({
    "phases_s": {b[0]: round(b[1] - a[1], 3) for a, b in zip(t, t[1:])},
    "rss_after_mib": {name: mib for name, _, mib in t[1:]},
    "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
    "peak_rss_mib": round(usage.ru_maxrss / 1024),
}))
"""


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """One whole process under /usr/bin/time: wall seconds, peak RSS, CPU seconds.
    (Not os.wait4 from here: Linux carries a process's peak RSS across fork and
    exec, so a child would report at least this benchmark's own.) cwd must not be
    a source tree: `python -m` and `-c` import from the working directory first."""
    with tempfile.NamedTemporaryFile("r") as stats:
        timed = ["/usr/bin/time", "-o", stats.name, "-f", "%e %M %U %S", *argv]
        proc = subprocess.run(timed, env=env, cwd=cwd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        wall, peak_kib, user, system = (float(x) for x in stats.read().split()[-4:])
    return {
        "wall_s": wall,
        "peak_rss_mib": peak_kib / 1024,
        "cpu_s": user + system,
        "stdout": proc.stdout,
    }


def _old_tree(ref: str, work: Path) -> Path:
    tree = work / f"old-{ref.replace('/', '_').replace('~', '_')}"
    if not tree.exists():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref],
            check=True,
            capture_output=True,
        )
    return tree


def _checkpoint(work: Path) -> Path:
    """ViT-B-32 with random weights, saved the way open_clip checkpoints are (in a
    child process: this one stays small)."""
    path = work / "vit-b-32-random.safetensors"
    if not path.exists():
        code = (
            "import sys, torch, open_clip; from safetensors.torch import save_file;"
            "torch.manual_seed(0); m = open_clip.create_model(sys.argv[1]);"
            "save_file({k: v.contiguous() for k, v in m.state_dict().items()}, sys.argv[2])"
        )
        tmp = path.with_suffix(".tmp")
        subprocess.run([sys.executable, "-c", code, MODEL, str(tmp)], check=True, cwd=work)
        tmp.rename(path)
    return path


def _setup(work: Path, env: dict[str, str], new: dict[str, str]) -> Path:
    from raiox_cli.training import synth

    catalogue = work / "catalogue"
    if not (catalogue / ".complete").exists():
        synth.make_catalogue(catalogue, systems=8, views=4, queries=0, size=(640, 512))
        (catalogue / ".complete").write_text("ok")
    query = work / "q.png"
    synth.render_view(synth.design_systems(1)[0], seed=1, query=True).save(query)
    raiox = [sys.executable, "-m", "raiox_cli"]
    _run([*raiox, "ingest", str(catalogue / "catalogue")], {**env, **new}, work)
    return query


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--old-ref", default=DEFAULT_OLD_REF)
    parser.add_argument("--work", type=Path, default=Path("/tmp/raiox-bench-startup"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="home-", dir=args.work))
    env = {
        **os.environ,
        "RAIOX_HOME": str(home),
        "RAIOX_MODEL": MODEL,
        "RAIOX_WEIGHTS": str(_checkpoint(args.work)),
        "RAIOX_DEVICE": "cpu",
        "RAIOX_BACKEND": "torch",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("RAIOX_DATABASE_URL", None)
    trees = {"old": _old_tree(args.old_ref, args.work), "new": ROOT}
    paths = {name: {"PYTHONPATH": str(tree)} for name, tree in trees.items()}
    query = _setup(args.work, env, paths["new"])
    search = [sys.executable, "-m", "raiox_cli", "search", str(query), "--json", "--no-tta"]

    baseline = {
        "python": [sys.executable, "-c", "pass"],
        "import torch": [sys.executable, "-c", "import torch"],
        "import open_clip": [sys.executable, "-c", "import open_clip"],
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in [*trees, *baseline]}
    for _ in range(args.runs):  # paired: every kind once per round
        for name in trees:
            runs[name].append(_run(search, {**env, **paths[name]}, args.work))
        for name, argv in baseline.items():
            runs[name].append(_run(argv, env, args.work))
    answers = {name: json.loads(runs[name][-1]["stdout"]) for name in trees}
    same = [m["score"] for m in answers["old"]["matches"]] == [
        m["score"] for m in answers["new"]["matches"]
    ]
    phases = {
        name: json.loads(
            _run([sys.executable, "-c", PHASES, str(query)], {**env, **paths[name]}, args.work)[
                "stdout"
            ]
        )
        for name in trees
    }
    report = {
        "machine": cpu_model(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "old_ref": args.old_ref,
        "runs": args.runs,
        "same_answer": same,
        "whole_process": {
            name: {
                "wall_s": _median(r, "wall_s"),
                "peak_rss_mib": round(_median(r, "peak_rss_mib")),
                "cpu_s": _median(r, "cpu_s"),
                "walls_s": [round(x["wall_s"], 2) for x in r],
            }
            for name, r in runs.items()
        },
        "breakdown": phases,
    }
    print(json.dumps(report, indent=1))
    _table(report)


def _table(report: dict[str, Any]) -> None:
    w = sys.stderr.write
    w(f"{report['machine']}, {report['cpus']} CPUs, load {report['load_average']}\n")
    w(f"{'':18} {'wall s':>8} {'peak MiB':>9} {'CPU s':>7}\n")
    for name, r in report["whole_process"].items():
        w(f"{name:18} {r['wall_s']:8.2f} {r['peak_rss_mib']:9d} {r['cpu_s']:7.2f}\n")
    w(f"same answer old/new: {report['same_answer']}\n\n")
    w(f"{'breakdown':27} {'old s':>6} {'new s':>6} {'old MiB':>8} {'new MiB':>8} (RSS after)\n")
    old, new = (report["breakdown"][k] for k in ("old", "new"))
    for phase, took in old["phases_s"].items():
        w(
            f"{phase:27} {took:6.2f} {new['phases_s'][phase]:6.2f} "
            f"{old['rss_after_mib'][phase]:8d} {new['rss_after_mib'][phase]:8d}\n"
        )


if __name__ == "__main__":
    main()
