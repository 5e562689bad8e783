"""`raiox eval --plot`: the reliability diagram and the prediction-set sizes, as a PNG
(matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_trust_plot(trust: dict[str, Any], out: Path, *, title: str) -> Path:
    """Left: per probability bin, accuracy against mean probability (the diagonal is
    perfect calibration), with how many answers each bin holds. Right: how many
    implants the prediction sets held."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    bins = [b for b in trust.get("reliability", []) if b["n"]]
    width = 1.0 / max(len(trust.get("reliability", [])), 1)
    left.bar(
        [b["low"] for b in bins],
        [b["accuracy"] for b in bins],
        width=width,
        align="edge",
        edgecolor="black",
        color="#7aa6c2",
        label="accuracy of the top answer",
    )
    left.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    left.plot(
        [b["probability"] for b in bins],
        [b["accuracy"] for b in bins],
        marker="o",
        color="#1f4e79",
        label="mean probability",
    )
    for b in bins:
        left.annotate(str(b["n"]), (b["low"] + width / 2, 0.02), ha="center", fontsize=7)
    ece = trust.get("ece")
    left.set_title(f"reliability (ECE {ece:.3f})" if ece is not None else "reliability")
    left.set_xlabel("calibrated probability that the top answer is right")
    left.set_ylabel("share right")
    left.set_xlim(0, 1)
    left.set_ylim(0, 1)
    left.legend(loc="upper left", fontsize=8)
    sizes = trust.get("set_sizes") or []
    right.bar(range(len(sizes)), sizes, color="#c27a7a", edgecolor="black")
    coverage = trust.get("coverage")
    right.set_title(
        f"prediction set sizes (coverage {coverage:.1%})" if coverage is not None else "set sizes"
    )
    right.set_xlabel("implants in the set")
    right.set_ylabel("answers")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
