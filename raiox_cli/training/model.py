"""Stage 2, model: the image tower embedding.py loads, and which of its modules train
(--train last | all | lora)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raiox_cli import embedding
from raiox_cli.errors import UsageError
from raiox_cli.training.options import AdaptOptions

if TYPE_CHECKING:
    import torch


@dataclass
class Tower:
    """The model being trained: the loaded open_clip model (through embedding.py),
    which of its modules train, and their parameters."""

    embedder: embedding.Embedder
    mode: str
    trainable: list[Any]  # modules put in train mode
    params: list[Any]
    lora: bool = False

    @property
    def visual(self) -> Any:
        return self.embedder.model.visual

    @property
    def image_size(self) -> int:
        size = self.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def train_mode(self) -> None:
        self.visual.eval()  # frozen parts keep their normalisation statistics
        for module in self.trainable:
            module.train()

    def eval_mode(self) -> None:
        self.embedder.model.eval()


def blocks_of(visual: Any) -> list[Any]:
    """The image tower's blocks in order, input to output, for --train last."""
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
        tail = [m for m in (getattr(visual, "ln_post", None),) if m is not None]
        return [*visual.transformer.resblocks, *tail]
    if hasattr(visual, "layer4"):  # open_clip's ModifiedResNet
        return [visual.layer1, visual.layer2, visual.layer3, visual.layer4, visual.attnpool]
    raise UsageError(
        f"--train last does not know the blocks of {type(visual).__name__}; use --train all"
    )


class LoRA:
    """A low-rank update W + B A (alpha / r) registered as a parametrization, so code
    that reads `.weight` directly (nn.MultiheadAttention does) sees it too. Merged
    into the plain weight before saving."""

    @staticmethod
    def add(module: Any, name: str, rank: int) -> list[Any]:
        import torch
        from torch import nn
        from torch.nn.utils import parametrize

        weight = getattr(module, name)
        out_features, in_features = weight.shape

        class Update(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.a = nn.Parameter(torch.randn(rank, in_features) / math.sqrt(in_features))
                self.b = nn.Parameter(torch.zeros(out_features, rank))

            def forward(self, w: torch.Tensor) -> torch.Tensor:
                return w + (self.b @ self.a).to(w.dtype)

        update = Update().to(weight.device)
        parametrize.register_parametrization(module, name, update)
        return [update.a, update.b]

    @staticmethod
    def merge(model: Any) -> None:
        from torch.nn.utils import parametrize

        for module in list(model.modules()):
            if parametrize.is_parametrized(module):
                for name in list(module.parametrizations):
                    parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def build_tower(spec: embedding.ModelSpec, options: AdaptOptions, seed: int) -> Tower:
    """Stage 2: load the model to train and choose what trains."""
    import torch
    from torch import nn

    embedder = embedding.load_trainable(spec)
    model = embedder.model
    mode = options.train or ("all" if spec.random else "last")
    for p in model.parameters():
        p.requires_grad_(False)
    visual = model.visual
    if mode == "all":
        trainable: list[Any] = [visual]
    elif mode == "last":
        blocks = blocks_of(visual)
        trainable = blocks[-max(1, options.blocks) :]
    else:
        torch.manual_seed(seed)
        trainable, params = [], []
        for module in visual.modules():
            if isinstance(module, nn.Linear):
                params += LoRA.add(module, "weight", options.lora_rank)
            elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
                params += LoRA.add(module, "in_proj_weight", options.lora_rank)
        if not params:
            raise UsageError(f"{spec.name} has no linear layers for LoRA; use --train all")
        return Tower(embedder, mode, [], params, lora=True)
    params = []
    for module in trainable:
        for p in module.parameters():
            p.requires_grad_(True)
            params.append(p)
    proj = getattr(visual, "proj", None)
    if isinstance(proj, nn.Parameter):  # a ViT's output projection follows ln_post
        proj.requires_grad_(True)
        if all(p is not proj for p in params):
            params.append(proj)
    return Tower(embedder, mode, trainable, params)


def embedder_image_size(embedder: embedding.Embedder) -> int:
    size = embedder.model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)
