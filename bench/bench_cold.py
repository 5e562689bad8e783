"""Cold start, side by side with rclip: whole processes, as a user types them.

    python bench/bench_cold.py                     # 256 images, 5 paired rounds
    python bench/bench_cold.py --runs 3 --skip-torch
    python bench/bench_cold.py --runs 2 --skip-torch --precisions fp32,int8

Both tools run ViT-B-32-256 with the same seeded random weights (raiox's
`--pretrained none`), rclip's exported the way its own converter does into
`$RCLIP_DATADIR/ViT-B-32-256-datacomp_s34b_b86k/{visual,textual}.onnx` (input
"input", output "output", dynamic batch) plus open_clip's BPE vocabulary. rclip
3.3.0 is installed by this script into its own venv (cached under --rclip-venv).

Measured per command (paired rounds, raiox and rclip alternating; medians):
wall seconds, CPU seconds (user + sys of the process and its children) and peak
RSS of the process tree (sampled every 20 ms; the embedded PostgreSQL detaches
from the tree, so its few MiB are not in it). Commands: cold `search q.png
--json --no-tta` (raiox onnx, raiox torch, rclip `-n -t 3`), ingest of the 256
images from an empty catalogue, ingest of one image (the fixed cost). Then the
breakdown of one cold search by phase (imports, database start, model load,
embedding, query), sequentially, for each backend; the ONNX Runtime thread
spinning setting on ingest; and parity of the two backends on ViT-B-32-256.
With --precisions fp32,int8 every raiox command runs in each precision, side by
side in the same rounds, plus int8's parity with fp32 (the gate's figures). The
int8 export is made once, before anything is timed, with the parity gate's
cosine at --int8-gate-cosine: random weights are speed-only (bench_ingest.py).

Prints one JSON object on stdout and a short table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
from _machine import compile_bytecode

MODEL = "ViT-B-32-256"
RCLIP_SUBDIR = "ViT-B-32-256-datacomp_s34b_b86k"
RCLIP_VERSION = "3.3.0"
SAMPLE_S = 0.02


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_rclip(venv: Path) -> Path:
    """rclip in its own virtual environment (created once, reused by reruns)."""
    rclip = venv / "bin" / "rclip"
    if rclip.exists():
        return rclip
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(_venv_python(venv)), "-m", "pip", "install", "-q", f"rclip=={RCLIP_VERSION}"],
        check=True,
    )
    return rclip


def measure(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> dict[str, Any]:
    """Wall, CPU and peak tree RSS of one whole command."""
    started = time.perf_counter()
    proc = psutil.Popen(
        argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peak = 0
    while proc.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(SAMPLE_S)
    wall = time.perf_counter() - started
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} exited {proc.returncode}: {err[-2000:]}")
    return {"wall_s": wall, "peak_mib": peak / 2**20, "stdout": out, "stderr": err}


def measured_cpu(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> dict[str, Any]:
    """measure() plus the CPU seconds of the command and its children (wait4)."""
    before = os.times()
    result = measure(argv, env, cwd)
    after = os.times()
    result["cpu_s"] = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return result


def _summary(samples: list[dict[str, Any]]) -> dict[str, float]:
    return {
        key: round(statistics.median(s[key] for s in samples), 2)
        for key in ("wall_s", "cpu_s", "peak_mib")
    }


def make_images(work: Path, count: int) -> tuple[Path, Path, Path]:
    """count PNGs in raiox's catalogue layout, a one-image catalogue, a query."""
    from raiox_cli.training import synth

    catalogue = work / "catalogue"
    if not catalogue.exists():
        views = 8
        info = synth.make_catalogue(
            work / "synth", systems=count // views, views=views, queries=1, size=(320, 400)
        )
        info.catalogue.rename(catalogue)
        shutil.copy(info.query_files[0], work / "q.png")
    one = work / "one" / "Acme" / "Single"
    if not one.exists():
        one.mkdir(parents=True)
        shutil.copy(next(catalogue.rglob("*.png")), one / "only.png")
    return catalogue, work / "one", work / "q.png"


def export_for_rclip(datadir: Path) -> None:
    """The same random ViT-B-32-256 raiox builds, as rclip's converter writes it:
    visual.onnx (input -> output, image features) and textual.onnx (tokens ->
    text features), plus the tokenizer vocabulary it loads for text queries."""
    folder = datadir / RCLIP_SUBDIR
    if (folder / "visual.onnx").exists() and (folder / "textual.onnx").exists():
        return
    import open_clip
    import torch

    from raiox_cli import embedding

    folder.mkdir(parents=True, exist_ok=True)
    # The whole CLIP (raiox builds the image tower alone): under raiox's seed open_clip
    # builds the visual tower first, so its weights are the ones raiox uses.
    embedding.register_bundled_configs()
    torch.manual_seed(embedding.RANDOM_SEED)
    model = open_clip.create_model(MODEL, pretrained=None).eval()

    class Textual(torch.nn.Module):
        def __init__(self, clip: Any):
            super().__init__()
            self.clip = clip

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.clip.encode_text(tokens)

    axes = {"input": {0: "batch"}, "output": {0: "batch"}}
    size = model.visual.preprocess_cfg["size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    common = {"input_names": ["input"], "output_names": ["output"], "dynamic_axes": axes}
    torch.onnx.export(
        model.visual,
        (torch.zeros(1, 3, size, size),),
        str(folder / "visual.onnx"),
        dynamo=False,
        opset_version=18,
        **common,
    )
    tokens = open_clip.get_tokenizer(MODEL)(["an implant"])
    torch.onnx.export(
        Textual(model),
        (tokens,),
        str(folder / "textual.onnx"),
        dynamo=False,
        opset_version=18,
        **common,
    )
    vocab = Path(open_clip.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
    (datadir / "tokenizer").mkdir(exist_ok=True)
    shutil.copy(vocab, datadir / "tokenizer" / vocab.name)


def raiox_env(home: Path, backend: str, precision: str = "fp32") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAIOX_") and k != "PYTHONPATH"}
    env.update(
        RAIOX_HOME=str(home),
        RAIOX_MODEL=MODEL,
        RAIOX_PRETRAINED="none",
        RAIOX_DEVICE="cpu",
        RAIOX_BACKEND=backend,
        RAIOX_PRECISION=precision,
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    return env


def fresh_home(work: Path, name: str, exports: Path) -> Path:
    """An empty raiox home sharing the prepared ONNX export (ingest from empty
    measures the catalogue, not the one-time export)."""
    home = work / name
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    (home / "onnx").symlink_to(exports)
    return home


BREAKDOWN = r"""
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
from raiox_cli import cli, config, db, embedding
from raiox_cli.search import query as search
t_import = time.perf_counter()
settings = config.resolve()
spec = embedding.ModelSpec.from_settings(settings)
with db.connect(settings) as conn:
    db.check_schema(conn)
    t_db = time.perf_counter()
    embedder = embedding.load_embedder(spec)
    t_model = time.perf_counter()
    loaded = search.load_query(Path(sys.argv[1]), settings)
    embedder.embed_images([loaded.image])
    t_embed = time.perf_counter()
    search.search_image(conn, embedder, loaded, k=3, tta=False)
    t_search = time.perf_counter()
heavy = [m for m in ("torch", "torchvision", "open_clip") if m in sys.modules]
print(json.dumps({
    "imports_s": t_import - t0, "database_start_s": t_db - t_import,
    "model_load_s": t_model - t_db, "embedding_s": t_embed - t_model,
    "query_s": max(0.0, (t_search - t_embed) - (t_embed - t_model)),
    "total_s": t_search - t0, "heavy_imports": heavy}))
"""

PREPARE_INT8 = (
    "import sys; from raiox_cli.embedding import precision; "
    "precision.GATE_COSINE = float(sys.argv.pop(1)); "
    "from raiox_cli.cli import main; sys.argv[0] = 'raiox'; main()"
)

SPINNING = (
    "import sys; from raiox_cli.embedding import onnx; onnx.ALLOW_SPINNING = sys.argv.pop(1); "
    "from raiox_cli.cli import main; sys.argv[0] = 'raiox'; main()"
)


def parity(images: list[Path], home: Path) -> dict[str, Any]:
    """Both backends on the same images: min and mean cosine, same model id."""
    import numpy as np
    from PIL import Image

    from raiox_cli import embedding

    torch_side = embedding.load_embedder(embedding.ModelSpec(MODEL, "none", None, "cpu", "torch"))
    onnx_side = embedding.load_embedder(
        embedding.ModelSpec(MODEL, "none", None, "cpu", "onnx", home)
    )
    pictures = [Image.open(p).convert("L") for p in images]
    a, b = torch_side.embed_images(pictures), onnx_side.embed_images(pictures)
    cosines = np.sum(a * b, axis=1)
    return {
        "images": len(images),
        "min_cosine": float(cosines.min()),
        "mean_cosine": float(cosines.mean()),
        "same_model_id": torch_side.model_id == onnx_side.model_id,
        "export": {k: onnx_side.export.meta[k] for k in ("exporter", "opset", "max_abs_diff")},
    }


def int8_parity(images: list[Path], home: Path) -> dict[str, Any]:
    """int8 against fp32 on the same images (ONNX Runtime both): the gate's figures,
    and the export's own record of them."""
    from PIL import Image

    from raiox_cli import embedding
    from raiox_cli.embedding import precision

    spec = embedding.ModelSpec(MODEL, "none", None, "cpu", "onnx", home)
    fp32 = embedding.load_embedder(spec)
    int8 = embedding.load_embedder(replace(spec, precision="int8"))
    pictures = [Image.open(p).convert("L") for p in images]
    labels = [p.parent.name for p in images]
    figures = precision.parity(
        fp32.embed_images(pictures),
        int8.embed_images(pictures),
        labels,
        source="catalogue",
        judge_agreement=True,
    )
    return {"here": figures.to_dict(), "at_export": int8.export.meta["parity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5, help="paired rounds per command")
    parser.add_argument("--work", type=Path, default=Path("/tmp/raiox-bench-cold"))
    parser.add_argument("--rclip-venv", type=Path, default=Path("/tmp/raiox-bench-rclip-venv"))
    parser.add_argument("--skip-rclip", action="store_true")
    parser.add_argument("--skip-torch", action="store_true", help="no raiox torch runs")
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument("--skip-spinning", action="store_true")
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--precisions", default="fp32", help="comma list: fp32,int8")
    parser.add_argument("--int8-gate-cosine", type=float, default=0.98)
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    raiox = [sys.executable, "-m", "raiox_cli"]
    compile_bytecode(Path(__file__).resolve().parent.parent / "raiox_cli")  # as users have it
    catalogue, one, query = make_images(work, args.images)

    # Prepare: the ONNX export and a searchable catalogue for each tool (not timed).
    base = work / "home-search"
    if not (base / "onnx").exists():
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        subprocess.run([*raiox, "init-db"], env=raiox_env(base, "onnx"), check=True)
        subprocess.run([*raiox, "ingest", str(catalogue)], env=raiox_env(base, "onnx"), check=True)
    exports = (base / "onnx").resolve()
    precisions = args.precisions.split(",")
    homes = {"fp32": base}
    if "int8" in precisions:  # the int8 export (untimed), then a catalogue embedded in int8
        homes["int8"] = base.with_name("home-search-int8")
        if not (homes["int8"] / "onnx").exists():
            home = fresh_home(work, homes["int8"].name, exports)
            env = raiox_env(home, "onnx", "int8")
            gate = str(args.int8_gate_cosine)
            subprocess.run([*raiox, "init-db"], env=env, check=True)
            subprocess.run(
                [sys.executable, "-c", PREPARE_INT8, gate, "ingest", str(catalogue)],
                env=env,
                check=True,
            )
    rclip_env: dict[str, str] = {}
    if not args.skip_rclip:
        rclip = ensure_rclip(args.rclip_venv)
        datadir = work / "rclip-data"
        export_for_rclip(datadir)
        rclip_env = {**os.environ, "RCLIP_DATADIR": str(datadir)}
        rclip_env.pop("PYTHONPATH", None)
        if not (datadir / "db.sqlite3").exists():
            subprocess.run(
                [str(rclip), "-t", "1", str(query)],
                env=rclip_env,
                cwd=catalogue,
                check=True,
                capture_output=True,
            )

    search_argv = [*raiox, "search", str(query), "--json", "--no-tta"]
    commands: dict[str, tuple[list[str], dict[str, str], Path | None]] = {
        f"search_raiox_onnx{_suffix(p)}": (search_argv, raiox_env(homes[p], "onnx", p), None)
        for p in precisions
    }
    if not args.skip_torch:
        commands["search_raiox_torch"] = (search_argv, raiox_env(base, "torch"), None)
    if not args.skip_rclip:
        commands["search_rclip"] = (
            [str(rclip), "-n", "-t", "3", "-f", str(query)],
            rclip_env,
            catalogue,
        )

    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in commands}
    for round_ in range(args.runs):
        names = list(commands) if round_ % 2 == 0 else list(reversed(commands))
        for name in names:
            argv, env, cwd = commands[name]
            samples[name].append(measured_cpu(argv, env, cwd))
    report: dict[str, Any] = {
        "machine": _machine(),
        "images": args.images,
        "runs": args.runs,
        "cold_search": {name: _summary(s) for name, s in samples.items()},
    }

    if not args.skip_ingest:
        ingest: dict[str, list[dict[str, Any]]] = {}
        for round_ in range(args.runs):
            for what, folder in ((str(args.images), catalogue), ("1", one)):
                for p in precisions:
                    home = fresh_home(work, "home-ingest", exports)
                    env = raiox_env(home, "onnx", p)
                    subprocess.run([*raiox, "init-db"], env=env, check=True, capture_output=True)
                    run = measured_cpu([*raiox, "ingest", str(folder)], env)
                    ingest.setdefault(f"ingest_{what}_raiox_onnx{_suffix(p)}", []).append(run)
                if not args.skip_rclip:
                    (datadir / "db.sqlite3").unlink(missing_ok=True)
                    run = measured_cpu([str(rclip), "-t", "1", "-f", str(query)], rclip_env, folder)
                    ingest.setdefault(f"ingest_{what}_rclip", []).append(run)
            if round_ < 2 and not args.skip_spinning:  # ORT's idle threads spinning, or not
                for spin in ("1", "0"):
                    home = fresh_home(work, "home-ingest", exports)
                    env = raiox_env(home, "onnx")
                    subprocess.run([*raiox, "init-db"], env=env, check=True, capture_output=True)
                    run = measured_cpu(
                        [sys.executable, "-c", SPINNING, spin, "ingest", str(catalogue)], env
                    )
                    ingest.setdefault(f"ingest_{args.images}_spinning_{spin}", []).append(run)
        if not args.skip_rclip:  # leave rclip's index of the catalogue for reruns
            (datadir / "db.sqlite3").unlink(missing_ok=True)
            subprocess.run(
                [str(rclip), "-t", "1", str(query)],
                env=rclip_env,
                cwd=catalogue,
                check=True,
                capture_output=True,
            )
        report["ingest"] = {name: _summary(s) for name, s in ingest.items()}

    breakdown = {}
    for backend in ("onnx",) if args.skip_torch else ("torch", "onnx"):
        runs = []
        for _ in range(max(1, args.runs // 2)):
            proc = subprocess.run(
                [sys.executable, "-c", BREAKDOWN, str(query)],
                env=raiox_env(base, backend),
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        breakdown[backend] = {
            key: round(statistics.median(r[key] for r in runs), 3)
            for key in runs[0]
            if key != "heavy_imports"
        } | {"heavy_imports": runs[0]["heavy_imports"]}
    report["breakdown"] = breakdown
    if not args.skip_parity:
        report["parity"] = parity(sorted(catalogue.rglob("*.png"))[:32], base)
    if "int8" in precisions:
        report["int8_parity"] = int8_parity(sorted(catalogue.rglob("*.png")), base)
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    _table(report)


def _suffix(precision: str) -> str:
    return "" if precision == "fp32" else f"_{precision}"


def _machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "load_before": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def _table(report: dict[str, Any]) -> None:
    rows = {**report["cold_search"], **report.get("ingest", {})}
    print(f"{'command':32} {'wall s':>8} {'CPU s':>8} {'peak MiB':>9}", file=sys.stderr)
    for name, r in rows.items():
        print(
            f"{name:32} {r['wall_s']:8.2f} {r['cpu_s']:8.2f} {r['peak_mib']:9.0f}", file=sys.stderr
        )
    for backend, phases in report["breakdown"].items():
        print(f"breakdown {backend}: {phases}", file=sys.stderr)
    if "parity" in report:
        print(f"parity: {report['parity']}", file=sys.stderr)
    if "int8_parity" in report:
        print(f"int8 parity: {report['int8_parity']}", file=sys.stderr)


if __name__ == "__main__":
    main()
