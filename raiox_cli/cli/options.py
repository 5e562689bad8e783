"""Options shared by several commands, declared once (as sqlite-utils' output_options).

Two kinds:
- plain ones (`JsonOut`, `Wait`, `Since`, ...): annotate a parameter with them;
- the settings ones (--database-url, --model, --weights, ...): name them in
  `@settings(...)` and the command receives one resolved `config.Settings` in its
  `settings` parameter instead. The options appear in `--help` in the order named,
  where `settings` stands in the signature. A command's own option named like a
  Settings field (search's --tta, eval's --min-score) joins the same resolution and
  still reaches the command.

A command that loads the model from the database's catalogue follows the weights
file the catalogue recorded (raiox adapt --apply) when none of --model, --pretrained,
--weights and their variables is set.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from raiox_cli import config

F = TypeVar("F", bound=Callable[..., Any])

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="PostgreSQL URL [env RAIOX_DATABASE_URL; default: the embedded server]",
        show_default=False,
    ),
]
Model = Annotated[
    str | None,
    typer.Option(
        help="open_clip model name [env RAIOX_MODEL; default ViT-B-32]", show_default=False
    ),
]
Pretrained = Annotated[
    str | None,
    typer.Option(
        help="pretrained tag, or 'none' for random weights (speed tests only) "
        "[env RAIOX_PRETRAINED; default laion2b_s34b_b79k]",
        show_default=False,
    ),
]
Weights = Annotated[
    Path | None,
    typer.Option(
        help="local checkpoint file (offline machines) [env RAIOX_WEIGHTS]", show_default=False
    ),
]
Device = Annotated[
    str | None,
    typer.Option(help="auto, cpu or cuda [env RAIOX_DEVICE; default auto]", show_default=False),
]
Backend = Annotated[
    str | None,
    typer.Option(
        help="who runs the model: onnx (ONNX Runtime, CPU), torch, or auto (onnx on a CPU, "
        "torch on a CUDA GPU) [env RAIOX_BACKEND; default auto]",
        show_default=False,
    ),
]
Precision = Annotated[
    str | None,
    typer.Option(
        help="the model's numbers: fp32, int8 (ONNX Runtime on a CPU, behind a parity gate), "
        "fp16 or bf16 (CUDA), or auto [env RAIOX_PRECISION; default fp32]",
        show_default=False,
    ),
]
BatchSize = Annotated[
    int | None,
    typer.Option(
        help="images per model batch [env RAIOX_BATCH_SIZE; default 32]", show_default=False
    ),
]
Workers = Annotated[
    int | None,
    typer.Option(
        help="decode workers [env RAIOX_WORKERS; default 0 = CPU count]", show_default=False
    ),
]
Engine = Annotated[
    str | None,
    typer.Option(
        "--engine",
        help="who runs decode -> embed -> write: local (threads) or ray (Ray Data, model "
        "actors per GPU; pip install 'raiox[ray]') [env RAIOX_ENGINE; default local]",
        show_default=False,
    ),
]
RayAddress = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="with --engine ray: join this cluster (its head, HEAD:6379) "
        "[env RAY_ADDRESS; default: start a local Ray]",
        show_default=False,
    ),
]

# The settings options by the Settings field they set.
SETTINGS_OPTIONS: dict[str, Any] = {
    "database_url": DatabaseUrl,
    "model": Model,
    "pretrained": Pretrained,
    "weights": Weights,
    "device": Device,
    "backend": Backend,
    "batch_size": BatchSize,
    "workers": Workers,
    "engine": Engine,
    "ray_address": RayAddress,
}
# The usual run of them: where the model runs and which catalogue it reads.
MODEL = ("database_url", "model", "pretrained", "weights", "device", "backend")

JsonOut = Annotated[bool, typer.Option("--json", help="machine-readable JSON on stdout")]
Wait = Annotated[
    bool, typer.Option("--wait", help="wait for a running ingest/reindex instead of exit 75")
]
ShowProgress = Annotated[
    bool, typer.Option("--progress", help="progress bar on stderr even when it is not a terminal")
]
NoStore = Annotated[
    bool, typer.Option("--no-store", help="do not copy the original images into the image store")
]
Since = Annotated[
    datetime | None,
    typer.Option(
        formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"],
        help="only analyses submitted on or after this date (UTC), e.g. 2026-01-31",
        show_default=False,
    ),
]
ClientFilter = Annotated[
    str | None,
    typer.Option(
        "--client", help="only analyses of this clinic (its name) or client id", show_default=False
    ),
]

_FIELDS = frozenset(f.name for f in dataclasses.fields(config.Settings))


_MODEL_CHOICE = {
    f.name: f.metadata["env"]
    for f in dataclasses.fields(config.Settings)
    if f.name in {"model", "pretrained", "weights"}
}


def _model_configured(given: dict[str, Any]) -> bool:
    """Whether an option or a variable chose the model (else the catalogue's is followed)."""
    return any(
        given.get(name) is not None or os.environ.get(env) for name, env in _MODEL_CHOICE.items()
    )


def settings(*names: str) -> Callable[[F], F]:
    """Give the command the settings options `names` and one resolved Settings.

    Example:
        @command(group, "serve")
        @settings(*MODEL)
        def serve(port: int = 8000, settings: config.Settings = ...) -> None: ...
    """
    unknown = set(names) - SETTINGS_OPTIONS.keys()
    if unknown:
        raise TypeError(f"no shared settings option {sorted(unknown)}")

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn, eval_str=True)
        own = [name for name in signature.parameters if name in _FIELDS]
        shared = [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=SETTINGS_OPTIONS[name],
            )
            for name in names
        ]
        parameters: list[inspect.Parameter] = []
        for parameter in signature.parameters.values():
            if parameter.name == "settings":
                parameters += shared
            else:
                parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))
        if "settings" not in signature.parameters:
            raise TypeError(f"{fn.__name__} takes no `settings` parameter")

        follows = "database_url" in names and "model" in {*names, *own}

        @functools.wraps(fn)
        def run(**kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in names}
            given.update({name: kwargs[name] for name in own})
            resolved = config.resolve(**given)
            if follows and not _model_configured(given):
                # start-up time: the database and hashing modules, only when run
                from raiox_cli.catalogue import active

                resolved = active.follow_recorded_weights(resolved)
            return fn(settings=resolved, **kwargs)

        run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        return run  # type: ignore[return-value]

    return decorate
