"""int8: the exported image tower quantised by ONNX Runtime, behind a parity gate.

The quantised graph is built from the verified fp32 export (onnx.py) and kept
beside it, under its own model id (`...@int8`), with the same checks. Only the
matrix multiplies are quantised (the attention and MLP projections: nearly all of
a ViT's arithmetic); the patch-embedding convolution, LayerNorm, softmax, GELU and
the residual adds stay fp32, since that is where int8 would cost the most accuracy
for the least time (bench/README.md, "Precision").

Before an int8 model is used, it must agree with fp32 on the catalogue's own
images (synthetic implant radiographs when the catalogue is empty or not at hand):
the top-3 implants of each image, asked leave-one-out, must agree on average at
GATE_AGREEMENT or above, and the mean cosine to fp32's vectors must be
GATE_COSINE or above. Random weights (`--pretrained none`) rank implants by noise
(their scores differ by less than int8's error), so there only the cosine is judged.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from raiox_cli.errors import ModelUnavailable
from raiox_cli.training import synth

log = logging.getLogger(__name__)

GATE_AGREEMENT = 0.99
GATE_COSINE = 0.99
TOP_K = 3
# The gate's and the calibration's images: enough implants that a top-3 means
# something, few enough that quantising stays seconds on a small model.
MAX_SAMPLES = 96
SYNTHETIC_SYSTEMS = 16
SYNTHETIC_VIEWS = 4
QUANTISED_OPS = ("MatMul", "Gemm")
# Chosen by measurement on ViT-B-32-256 (bench/README.md, "Precision"): static
# quantisation calibrated on the gate's images, QDQ format, per-tensor weights, only
# the products with a weight (attention's own Q.K and A.V products stay fp32: the
# same speed, a closer cosine).
METHOD = {
    "mode": "static",
    "format": "QDQ",
    "per_channel": False,
    "ops": list(QUANTISED_OPS),
    "weights_only": True,
}


class PrecisionRefused(ModelUnavailable):
    """The int8 model does not agree with fp32 closely enough (the parity gate)."""


@dataclass(frozen=True)
class Sample:
    """One gate image: the implant it shows and its pixels."""

    label: str
    image: Image.Image


SampleSource = Callable[[], Sequence[Sample]]


@dataclass(frozen=True)
class Parity:
    """How an int8 model's vectors compare with fp32's on the gate's images."""

    images: int
    source: str  # "catalogue" or "synthetic"
    mean_cosine: float
    min_cosine: float
    agreement: float  # mean share of fp32's top-3 implants that int8 also ranks top-3
    agreement_judged: bool

    @property
    def passed(self) -> bool:
        cosine_ok = self.mean_cosine >= GATE_COSINE
        return cosine_ok and (self.agreement >= GATE_AGREEMENT or not self.agreement_judged)

    def describe(self) -> str:
        judged = "" if self.agreement_judged else " (not judged: random weights)"
        return (
            f"top-{TOP_K} implant agreement {self.agreement:.3f}{judged} (gate "
            f"{GATE_AGREEMENT}), mean cosine {self.mean_cosine:.4f} (gate {GATE_COSINE}) "
            f"on {self.images} {self.source} images"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def synthetic_samples() -> list[Sample]:
    """Implant radiographs made here (training/synth.py), seeded: the gate's images
    when there is no catalogue to take them from."""
    samples = []
    for design in synth.design_systems(SYNTHETIC_SYSTEMS):
        for view in range(SYNTHETIC_VIEWS):
            image = synth.render_view(design, seed=0, query=view == 0, view=view)
            samples.append(Sample(design.key, image))
    return samples


def top_k_agreement(reference: np.ndarray, other: np.ndarray, labels: Sequence[str]) -> float:
    """For each image asked against the others (leave-one-out), the share of the
    reference's top-k implants (best image per implant) that `other` also ranks
    top-k; the mean over images."""
    codes = np.unique(np.asarray(labels), return_inverse=True)[1]
    shares = [
        len(set(top) & set(mine)) / len(top)
        for top, mine in zip(
            _top_implants(reference, codes), _top_implants(other, codes), strict=True
        )
    ]
    return float(np.mean(shares)) if shares else 1.0


def _top_implants(vectors: np.ndarray, codes: np.ndarray) -> list[list[int]]:
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    per_implant = np.full((len(vectors), codes.max() + 1), -np.inf, dtype=np.float32)
    for implant in range(codes.max() + 1):
        per_implant[:, implant] = sims[:, codes == implant].max(axis=1)
    return [list(np.argsort(-row, kind="stable")[:TOP_K]) for row in per_implant]


def parity(
    reference: np.ndarray,
    quantised: np.ndarray,
    labels: Sequence[str],
    *,
    source: str,
    judge_agreement: bool,
) -> Parity:
    """The gate's figures for unit vectors of the same images from both models."""
    cosines = np.sum(reference * quantised, axis=1)
    return Parity(
        images=len(labels),
        source=source,
        mean_cosine=float(cosines.mean()),
        min_cosine=float(cosines.min()),
        agreement=top_k_agreement(reference, quantised, labels),
        agreement_judged=judge_agreement,
    )


def quantise(src: Path, dst: Path, calibration: np.ndarray) -> dict[str, Any]:
    """Write the int8 graph of the fp32 graph `src` (weights inline) to `dst`,
    calibrated on `calibration` (N, 3, S, S) float32; returns what was done."""
    started = time.perf_counter()
    excluded = activation_products(src) if METHOD["weights_only"] else []
    with _quiet_quantiser():
        _run_quantiser(src, dst, calibration, excluded)
    return {
        **METHOD,
        "calibration_images": len(calibration),
        "kept_fp32_products": len(excluded),
        "seconds": time.perf_counter() - started,
    }


class _FromQuantiser(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname


@contextlib.contextmanager
def _quiet_quantiser() -> Iterator[None]:
    """ONNX Runtime's quantiser logs advice for its own developers on the root logger
    (pre-processing, links): not the operator's to act on."""
    quiet = _FromQuantiser()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _run_quantiser(src: Path, dst: Path, calibration: np.ndarray, excluded: list[str]) -> None:
    # start-up time: ONNX Runtime's quantisation tools import onnx and sympy
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if METHOD["mode"] == "dynamic":
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=METHOD["ops"],
            per_channel=METHOD["per_channel"],
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
        )
    else:

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter(
                    {"pixels": calibration[i : i + 8]} for i in range(0, len(calibration), 8)
                )

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.batches, None)

        quantize_static(
            str(src),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ if METHOD["format"] == "QDQ" else QuantFormat.QOperator,
            op_types_to_quantize=METHOD["ops"],
            per_channel=METHOD["per_channel"],
            nodes_to_exclude=excluded,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )


def activation_products(path: Path) -> list[str]:
    """The matrix products of the graph with no weight among their inputs (attention's
    Q.K and A.V): int8 would round both operands and save no weight reads."""
    import onnx  # start-up time: only a quantisation needs the onnx package

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {tensor.name for tensor in graph.initializer}
    return [
        node.name
        for node in graph.node
        if node.op_type in QUANTISED_OPS and not any(name in weights for name in node.input)
    ]
