"""The torch model: open_clip's image tower alone, loaded without waste.

raiox only ever embeds images, so only `visual` is built (the text tower is 40% of
ViT-B-32's weights). With a checkpoint the tower is built on the meta device (no
random initialisation that the checkpoint would overwrite) and takes the
checkpoint's `visual.*` tensors with load_state_dict(assign=True), read with
pread (safetensors) or from a memory-mapped file (torch), so the text tower's bytes
are never read and the weights are in memory once. Random weights (smoke runs)
are built on the CPU under raiox's seed: open_clip's CLIP builds its visual tower
first, so the same seed gives the same visual weights as the whole model did.

Imported by embedding._load only (it imports torch and open_clip).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import (
    CLIP,
    CustomTextCLIP,
    _build_vision_tower,
    convert_to_custom_text_state_dict,
    resize_pos_embed,
    set_model_preprocess_cfg,
)
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from torch import nn

from raiox_cli.errors import ModelUnavailable

log = logging.getLogger(__name__)

VISUAL = "visual."
# Keys open_clip's own loader reshapes, resizes or drops rather than refuses.
TOLERATED = {"logit_scale", "logit_bias", "text.transformer.embeddings.position_ids"}
RESIZED = {"positional_embedding", "text.positional_embedding", "visual.positional_embedding"}


class ImageTower(nn.Module):
    """What raiox uses of an open_clip CLIP model: `visual`, `encode_image` (CLIP's
    computation: the tower's output, unnormalised unless asked), and state_dict()
    keyed `visual.*` like the whole model's, so a checkpoint saved from it (raiox
    adapt) loads back through RAIOX_WEIGHTS."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encode_image(image, normalize=True)


def supported(name: str, checkpoint: str | None) -> bool:
    """Whether the image tower alone can be built and loaded for this model and file;
    the rest (CoCa's tuple-returning tower, big_vision .npz files) takes open_clip's
    whole-model path."""
    cfg = open_clip.get_model_config(name)
    if cfg is None or "multimodal_cfg" in cfg:
        return False
    return checkpoint is None or Path(checkpoint).suffix not in {".npz", ".npy"}


def build(
    name: str, checkpoint: str | None, device: str, pretrained_cfg: Mapping[str, Any] | None
) -> tuple[ImageTower, Any]:
    """The image tower of model `name` with the checkpoint's weights (None: random,
    seeded by the caller), on `device`, and open_clip's eval transform for it."""
    cfg = open_clip.get_model_config(name)
    vision_cfg = dict(cfg["vision_cfg"])
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False  # weights come from the checkpoint

    def make() -> nn.Module:
        return _build_vision_tower(cfg["embed_dim"], vision_cfg, cfg.get("quick_gelu", False))

    if checkpoint is None:
        tower = ImageTower(make())
    else:
        shapes, visual = read_checkpoint(checkpoint)
        check_whole_model_keys(name, cfg, shapes, checkpoint)
        try:
            with torch.device("meta"):
                tower = ImageTower(make())
        except Exception as exc:  # a tower whose __init__ computes with tensor values
            log.info("building %s's image tower on the CPU (meta device: %s)", name, exc)
            tower = ImageTower(make())
        load_visual(tower, visual, checkpoint, name, make)
    tower.to(device)
    tower.eval()
    preprocess = merge_preprocess_dict(asdict(PreprocessCfg()), dict(pretrained_cfg or {}))
    preprocess["size"] = tower.visual.image_size
    set_model_preprocess_cfg(tower, preprocess)
    return tower, image_transform_v2(PreprocessCfg(**tower.visual.preprocess_cfg), is_train=False)


Shapes = dict[str, tuple[int, ...]]


def read_checkpoint(path: str) -> tuple[Shapes, dict[str, torch.Tensor]]:
    """Every key's shape, and the `visual.*` tensors, of a checkpoint file, unwrapped
    the way open_clip's load_state_dict does (a `state_dict` entry, DataParallel's
    `module.` prefix). Only the image tower's bytes are read, into tensors this
    process owns: weights left mapped to the file would crash a running server
    (SIGBUS) the moment someone overwrites the checkpoint in place."""
    try:
        if path.endswith(".safetensors"):
            return _read_safetensors(path)
        try:
            # Mapped, so the text tower is never read; the tower is copied out below.
            loaded: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Files in torch's legacy (pre-zip) format cannot be mapped.
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except ModelUnavailable:
        raise
    except Exception as exc:  # torch and safetensors raise many classes for bad files
        raise ModelUnavailable(f"could not read the checkpoint {path}: {exc}") from exc
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not loaded:
        raise ModelUnavailable(f"{path} holds no state dict of tensors")
    loaded = _unprefixed(loaded)
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    return shapes, {k: v.clone() for k, v in tensors.items() if k.startswith(VISUAL)}


def _read_safetensors(path: str) -> tuple[Shapes, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        # pread(2) straight into tensors this process owns: one copy, nothing mapped.
        handle = safe_open(path, framework="pt", device="cpu", backend="pread")
        owned = True
    except TypeError:  # safetensors < 0.8: mapped, copied out below
        handle = safe_open(path, framework="pt", device="cpu")
        owned = False
    with handle as fh:
        keys = list(fh.keys())
        if not keys:
            raise ModelUnavailable(f"{path} holds no tensors")
        names = _unprefixed(dict.fromkeys(keys))
        original = dict(zip(names, keys, strict=True))
        shapes = {k: tuple(fh.get_slice(original[k]).get_shape()) for k in names}
        visual = {}
        for name in names:
            if name.startswith(VISUAL):
                tensor = fh.get_tensor(original[name])
                visual[name] = tensor if owned else tensor.clone()
    return shapes, visual


def _unprefixed(state: dict[str, Any]) -> dict[str, Any]:
    if next(iter(state)).startswith("module"):
        return {k[7:]: v for k, v in state.items()}
    return state


def check_whole_model_keys(name: str, cfg: Mapping[str, Any], shapes: Shapes, path: str) -> None:
    """Refuse a checkpoint that does not fit the whole model, as open_clip's strict
    load would, naming the keys: the model is laid out on the meta device (no memory,
    no initialisation), so the text tower is checked without being built. A
    checkpoint holding only `visual.*` (what raiox adapt writes) is checked as the
    image tower alone."""
    if not any(k.startswith(VISUAL) for k in shapes):
        raise ModelUnavailable(
            f"{path} is not an open_clip checkpoint of {name} (no visual.* weights); "
            "check RAIOX_WEIGHTS and RAIOX_MODEL"
        )
    if "hf_model_name" in cfg.get("text_cfg", {}):
        return  # a Hugging Face text tower is built from its own hub config: not checked
    custom = bool(cfg.get("custom_text", False))
    try:
        with torch.device("meta"):
            whole = (CustomTextCLIP if custom else CLIP)(
                **{k: v for k, v in cfg.items() if k != "custom_text"}
            )
    except Exception as exc:  # see build(): then only the image tower is checked
        log.info("%s cannot be laid out on the meta device (%s)", name, exc)
        return
    expected = {k: tuple(v.shape) for k, v in whole.state_dict().items()}
    if custom:
        shapes = convert_to_custom_text_state_dict(shapes)  # renames an old layout's keys
    if all(k.startswith(VISUAL) for k in shapes):  # the image tower alone: check only it
        expected = {k: v for k, v in expected.items() if k.startswith(VISUAL)}

    def same(key: str) -> bool:
        # open_clip resizes position embeddings along their first axis
        cut = 1 if key in RESIZED else 0
        return shapes[key][cut:] == expected[key][cut:]

    unexpected = sorted(set(shapes) - set(expected) - TOLERATED)
    missing = sorted(set(expected) - set(shapes) - TOLERATED)
    wrong = sorted(k for k in (set(shapes) & set(expected)) - TOLERATED if not same(k))
    if unexpected or missing or wrong:
        raise ModelUnavailable(_misfit(path, name, missing, unexpected, wrong))


def load_visual(
    tower: ImageTower,
    state: dict[str, torch.Tensor],
    path: str,
    name: str,
    make: Callable[[], nn.Module],
) -> None:
    """Give the meta-built tower the checkpoint's visual tensors (assign: no copy),
    strictly: another architecture's checkpoint fails here with the keys named."""
    resize_pos_embed(state, tower)  # a checkpoint for another image size, as open_clip does
    params = tower.visual.state_dict()
    visual = {}
    for key, tensor in state.items():
        inner = key[len(VISUAL) :]
        want = params.get(inner)
        # assign=True keeps the file's dtype: cast fp16/bf16 files as copying would
        if want is not None and tensor.dtype != want.dtype and tensor.is_floating_point():
            tensor = tensor.to(want.dtype)
        visual[inner] = tensor
    missing = sorted(set(params) - set(visual))
    unexpected = sorted(set(visual) - set(params))
    wrong = sorted(k for k in set(params) & set(visual) if params[k].shape != visual[k].shape)
    if missing or unexpected or wrong:
        raise ModelUnavailable(
            _misfit(
                path,
                name,
                [VISUAL + k for k in missing],
                [VISUAL + k for k in unexpected],
                [VISUAL + k for k in wrong],
            )
        )
    tower.visual.load_state_dict(visual, strict=True, assign=True)
    left = [n for n, t in [*tower.named_parameters(), *tower.named_buffers()] if t.is_meta]
    if left:
        # A tower with tensors outside its state dict (non-persistent buffers) cannot
        # be laid out on meta: build it for real and copy the weights in.
        log.info("building %s's image tower on the CPU (%s is not in checkpoints)", name, left[0])
        tower.visual = make()
        tower.visual.load_state_dict(visual, strict=True)


def _misfit(
    path: str, name: str, missing: list[str], unexpected: list[str], wrong: list[str]
) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            parts.append(f"{label}: {', '.join(keys[:3])}{more}")
    return (
        f"{path} is not a checkpoint of {name} ({'; '.join(parts)}); "
        "set RAIOX_MODEL to the checkpoint's architecture or use its own checkpoint"
    )
