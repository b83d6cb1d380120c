"""Loading CLIP image encoders through open_clip: hub tags, local weights files, random weights.

One entry point, :func:`load_clip`. Architectures are open_clip configs (data); vlmdata adds
``tiny-random-clip``, a three-block ViT for tests, the demo and CPU benchmarks. A local weights
file carries neither its activation nor its preprocessing, so they are recovered from the
file's sha256 when it is an official release (OpenAI's URLs name their digest): OpenAI weights
need QuickGELU, and getting that wrong silently degrades every feature.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from vlmdata.errors import UserError

TINY_RANDOM_CLIP = "tiny-random-clip"
RANDOM = ("none", "random", "")  # --pretrained values that mean random weights
_CONFIGS = Path(__file__).parent / "model_configs"
_HUB_HOST = ("huggingface.co", 443)


@dataclass
class LoadedClip:
    """An open_clip model ready for image features, with what the cache must record of it."""

    model: object  # open_clip CLIP, in eval mode on its device
    name: str
    pretrained: str  # the tag, the weights file path, or "random"
    weights_sha256: str | None  # for a weights file
    image_size: int
    patch_size: int
    grid: int  # patches per side
    layers: int
    width: int  # token channels
    embed_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: str
    dtype: object  # torch.dtype


def load_clip(name: str, pretrained: str | None, device: str, precision: str) -> LoadedClip:
    """Build ``name`` with ``pretrained`` weights (a tag, a file, or none) on ``device``."""
    import open_clip
    import torch

    _register_builtin_configs()
    if name not in open_clip.list_models():
        raise UserError(
            f"unknown --model {name!r}; use an open_clip model name (e.g. ViT-L-14-336, ViT-B-32) "
            f"or {TINY_RANDOM_CLIP}"
        )
    pretrained = (pretrained or "").strip()
    if name == TINY_RANDOM_CLIP and pretrained not in RANDOM and not Path(pretrained).is_file():
        pretrained = "random"  # it has no published weights: the default tag cannot apply
    digest = None
    options: dict = {}
    if pretrained.lower() in RANDOM:
        warnings.warn(
            f"{name} has random weights: its features are for tests only, and every image looks "
            "alike to it (use --no-placeholder-filter or a placeholder threshold near 1)",
            stacklevel=2,
        )
        torch.manual_seed(0)  # the same random model in every run, so caches stay comparable
        weights, pretrained = None, "random"
    elif Path(pretrained).is_file():
        weights, digest = pretrained, _sha256(Path(pretrained))
        options = _options_for_weights_file(name, digest)
    else:
        options = _options_for_tag(name, pretrained)
        weights = pretrained
    try:
        with _quiet_open_clip():
            model = open_clip.create_model(name, pretrained=weights, device=device, **options)
    except (RuntimeError, OSError) as e:
        raise UserError(
            f"cannot load weights {pretrained!r} for {name}: {str(e).splitlines()[0][:200]}"
        ) from None
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    model = model.to(dtype=dtype).eval()
    visual = model.visual
    grid = visual.grid_size[0]
    return LoadedClip(
        model=model, name=name, pretrained=pretrained, weights_sha256=digest,
        image_size=visual.image_size[0], patch_size=visual.patch_size[0], grid=grid,
        layers=len(visual.transformer.resblocks), width=visual.transformer.width,
        embed_dim=visual.output_dim, mean=tuple(visual.image_mean), std=tuple(visual.image_std),
        device=device, dtype=dtype,
    )  # fmt: skip


def resolve_device(device: str, precision: str) -> str:
    """``auto`` -> cuda when there is one; refuse combinations that cannot run."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible; use --device cpu or auto")
    if precision not in ("fp32", "fp16", "bf16"):
        raise UserError(f"--precision must be fp32, fp16 or bf16, got {precision!r}")
    if device == "cpu" and precision == "fp16":
        raise UserError("fp16 is not supported on CPU; use --precision bf16 or fp32")
    return device


@cache
def _register_builtin_configs() -> None:
    import open_clip

    open_clip.add_model_config(_CONFIGS)


def _options_for_tag(name: str, tag: str) -> dict:
    """open_clip options for a published tag; fail fast when its weights cannot be had."""
    import open_clip

    config = open_clip.get_pretrained_cfg(name, tag)
    if not config:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise UserError(
            f"{tag!r} is neither a weights file nor a pretrained tag of {name} (tags: {tags}); "
            "pass --pretrained TAG, a local weights file, or none for random weights"
        )
    if not _cached(config) and not _hub_reachable():
        raise UserError(
            f"weights {name}/{tag} are not in the local cache and the model hub cannot be "
            "reached; fetch them on a connected machine (they are cached under "
            "~/.cache/huggingface) or pass --pretrained /path/to/weights"
        )
    return {"force_quick_gelu": bool(config.get("quick_gelu"))}


def _options_for_weights_file(name: str, digest: str) -> dict:
    """Activation and preprocessing for a weights file, from the release it matches if any."""
    known = _released_weights().get(digest)
    if known is None:
        if "quickgelu" not in name.lower():
            warnings.warn(
                f"unrecognised weights file: using {name}'s own activation; if these are "
                f"OpenAI-trained weights use {name}-quickgelu",
                stacklevel=3,
            )
        return {}
    _, config = known
    return {
        "force_quick_gelu": bool(config.get("quick_gelu")),
        "image_mean": config.get("mean"),
        "image_std": config.get("std"),
    }


@cache
def _released_weights() -> dict[str, tuple[str, dict]]:
    """sha256 -> (model, pretrained config) for releases whose URL names their digest."""
    import open_clip

    found = {}
    for model, tag in open_clip.list_pretrained():
        config = open_clip.get_pretrained_cfg(model, tag)
        match = re.search(r"/([0-9a-f]{64})/", config.get("url", ""))
        if match:
            found[match.group(1)] = (model, config)
    return found


def _cached(config: dict) -> bool:
    """Whether a tag's weights are already in the Hugging Face cache."""
    hub = config.get("hf_hub", "")
    if not hub:
        return False
    from huggingface_hub import try_to_load_from_cache

    parts = hub.strip("/").split("/")  # "org/repo/" or "org/repo/filename"
    repo = "/".join(parts[:2])
    names = parts[2:] or ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo, name), str) for name in names)


def _hub_reachable() -> bool:
    """A 3-second check, so an offline machine fails at once instead of after retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(_HUB_HOST, timeout=3).close()
    except OSError:
        return False
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


class _quiet_open_clip:
    """open_clip logs a warning for random weights that we already issue ourselves."""

    def __enter__(self) -> None:
        self._level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().setLevel(self._level)
