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
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from vlmdata.errors import UserError

TINY_RANDOM_CLIP = "tiny-random-clip"
DEFAULT_TAG = "openai"  # --pretrained's default
RANDOM = ("none", "random", "")  # --pretrained values that mean random weights
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_CONFIGS = Path(__file__).parent / "model_configs"
_HUB_PROBE_TIMEOUT_S = 3.0
_EXAMPLE_VIT = "ViT-L-14-336"
# Keys of an OpenAI TorchScript archive that are not parameters of the model (open_clip drops
# them the same way).
_TORCHSCRIPT_EXTRAS = ("input_resolution", "context_length", "vocab_size")


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
    dtype: object  # torch.dtype of the weights, and of the input images
    autocast: object | None = None  # torch.dtype of the mixed-precision forward on a GPU


def load_clip(name: str, pretrained: str | None, device: str, precision: str) -> LoadedClip:
    """Build ``name`` with ``pretrained`` weights (a tag, a file, or none) on ``device``, for
    ``precision`` (fp32, fp16 or bf16: :func:`resolve_precision` resolves auto).

    On a GPU, fp16 and bf16 run as autocast: the weights stay fp32 and the ops autocast keeps
    in fp32 (layer norms, softmax) stay there. On CPU the weights themselves are cast.
    """
    import torch

    if not known_model(name):
        raise UserError(
            f"unknown --model {name!r}; use an open_clip model name (e.g. ViT-L-14-336, ViT-B-32) "
            f"or {TINY_RANDOM_CLIP}"
        )
    _require_vit_tower(name)  # before fetching or building anything
    pretrained = (pretrained or "").strip()
    if name == TINY_RANDOM_CLIP and pretrained not in RANDOM and not Path(pretrained).is_file():
        if pretrained != DEFAULT_TAG:  # a path that is not there, or a tag it cannot have
            raise UserError(
                f"--pretrained {pretrained!r} is not a weights file; {TINY_RANDOM_CLIP} has no "
                "published weights: pass a file saved from it, or none"
            )
        pretrained = "random"  # the default tag cannot apply: random weights
    digest, weights_file, tag = None, None, None
    options: dict = {}
    if pretrained.lower() in RANDOM:
        warnings.warn(
            f"{name} has random weights: its features are for tests only, and every image looks "
            "alike to it (to encode with it, use --no-placeholder-filter or a placeholder "
            "threshold near 1)",
            stacklevel=2,
        )
        pretrained = "random"
    elif Path(pretrained).is_file():
        # Recorded absolute: a relative path would be looked up from wherever it is read.
        weights_file = Path(os.path.abspath(pretrained))
        pretrained, digest = str(weights_file), file_sha256(weights_file)
        options = _options_for_weights_file(name, digest)
    else:
        options = _options_for_tag(name, pretrained)
        tag = pretrained
    with _seeded_rng(device):  # the same random model in every run: caches stay comparable
        model = _create_model(name, tag, device, options)
    if weights_file is not None:
        _load_weights_file(model, weights_file, name)
    wanted = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    autocast = wanted if device == "cuda" and wanted != torch.float32 else None
    dtype = torch.float32 if autocast is not None else wanted
    model = model.to(dtype=dtype).eval()
    visual = model.visual
    grid = visual.grid_size[0]
    return LoadedClip(
        model=model, name=name, pretrained=pretrained, weights_sha256=digest,
        image_size=visual.image_size[0], patch_size=visual.patch_size[0], grid=grid,
        layers=len(visual.transformer.resblocks), width=visual.transformer.width,
        embed_dim=visual.output_dim, mean=tuple(visual.image_mean), std=tuple(visual.image_std),
        device=device, dtype=dtype, autocast=autocast,
    )  # fmt: skip


def known_model(name: str) -> bool:
    """Whether open_clip (with vlmdata's built-in configs) knows the model ``name``."""
    import open_clip

    _register_builtin_configs()
    return name in open_clip.list_models()


def resolve_device(device: str, precision: str, ray_gpus: float | None = None) -> str:
    """``auto`` -> cuda when there is one; refuse combinations that cannot run. With
    ``ray_gpus`` (--gpus-per-worker) the device is that of Ray's workers, not this machine's:
    a GPU when each worker reserves one."""
    import torch

    here = ray_gpus is None
    if device == "auto":
        device = "cuda" if (torch.cuda.is_available() if here else ray_gpus > 0) else "cpu"
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and here and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible; use --device cpu or auto")
    if device == "cuda" and not here and ray_gpus <= 0:
        raise UserError("--device cuda on Ray needs --gpus-per-worker (e.g. 1, or 0.5 to share a "
                        "GPU between two workers)")  # fmt: skip
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be {', '.join(PRECISIONS)}, got {precision!r}")
    if device == "cpu" and precision == "fp16":
        raise UserError("fp16 is not supported on CPU; use --precision bf16 or fp32")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> fp32 on CPU; on a GPU bf16 where it has bf16 units, else fp16 (both as
    autocast, see :func:`load_clip`). Other values are kept."""
    if precision != "auto":
        return precision
    if device == "cpu":
        return "fp32"
    import torch

    # Ampere and later: older GPUs emulate bf16, slower than their fp16.
    native_bf16 = torch.cuda.is_bf16_supported() and torch.cuda.get_device_capability()[0] >= 8
    return "bf16" if native_bf16 else "fp16"


@contextmanager
def _seeded_rng(device: str) -> Iterator[None]:
    """torch's random generators seeded with 0 inside, as the caller had them afterwards: the
    CPU one (open_clip builds on CPU, then moves), and the current GPU's when ``device`` is
    cuda (in case the weights are drawn there)."""
    import torch

    cuda = device == "cuda"
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
        torch.random.default_generator.manual_seed(0)
        if cuda:
            torch.cuda.manual_seed(0)  # the current device only: the others are not restored
        yield


@cache
def _register_builtin_configs() -> None:
    import open_clip

    open_clip.add_model_config(_CONFIGS)


def _require_vit_tower(name: str) -> None:
    """Refuse a model whose vision tower has no patch grid, from its config alone.

    Patch tokens are read from the blocks of open_clip's own ``VisionTransformer`` (its config
    gives ``layers`` as a number). ModifiedResNet towers (``layers`` is a list, RN50...) have no
    tokens, and timm towers (``timm_model_name``: ConvNeXt, SigLIP, EVA...) have neither the
    grid nor the blocks this reads.
    """
    import open_clip

    vision = (open_clip.get_model_config(name) or {}).get("vision_cfg", {})
    if "timm_model_name" in vision:
        kind = f"a timm vision tower ({vision['timm_model_name']})"
    elif isinstance(vision.get("layers"), list | tuple):
        kind = "a ResNet vision tower"
    elif isinstance(vision.get("layers"), int):
        return
    else:
        kind = "no ViT vision tower"
    raise UserError(
        f"--model {name} has {kind}; vlmdata takes patch tokens only from open_clip's own ViT "
        f"towers: use a ViT model such as {_EXAMPLE_VIT}"
    )


def _create_model(name: str, tag: str | None, device: str, options: dict) -> object:
    """The open_clip model with a tag's weights, or random ones (a weights file comes later).

    ``pretrained_hf=False``: without a tag, a Hugging Face text tower stays random too instead
    of fetching its base weights (the image features never use it).
    """
    import open_clip

    if tag is None:
        with _quiet_open_clip():
            return open_clip.create_model(name, device=device, pretrained_hf=False, **options)
    try:
        with _quiet_open_clip():
            return open_clip.create_model(name, pretrained=tag, device=device, **options)
    except (RuntimeError, OSError) as e:  # a download that failed, a damaged cached file
        raise UserError(f"cannot load weights {tag!r} for {name}: {_first_line(e)}") from None


# What reading and applying a weights file raises when the file is not a checkpoint of the
# model: torch.load (UnpicklingError, EOFError, RuntimeError from its zip reader), zipfile,
# safetensors, and open_clip's conversions, which index and assert on whatever the file holds.
# MemoryError is left out on purpose: a machine out of memory is not a bad file.
_CHECKPOINT_ERRORS = (
    pickle.UnpicklingError, EOFError, RuntimeError, OSError, zipfile.BadZipFile, KeyError,
    IndexError, ValueError, TypeError, AttributeError, AssertionError, StopIteration,
)  # fmt: skip


def _checkpoint_errors() -> tuple[type[Exception], ...]:
    from safetensors import SafetensorError  # imported late, like every model dependency

    return (*_CHECKPOINT_ERRORS, SafetensorError)


def _load_weights_file(model: object, path: Path, name: str) -> None:
    """Load a local weights file into ``model``; one line when it is not ``name``'s checkpoint.

    Pickled files go through open_clip's loader (``weights_only``: a file cannot run Python);
    TorchScript archives (OpenAI's ``ViT-L-14-336px.pt``) are refused by that loader, so their
    state dict is taken with ``torch.jit.load``, as open_clip does for OpenAI's releases.
    """
    import open_clip

    try:
        if _is_torchscript(path):
            transient = _non_persistent_buffers(model)
            state = {k: v for k, v in _torchscript_state_dict(path).items() if k not in transient}
            model.load_state_dict(state, strict=True)
        else:
            open_clip.load_checkpoint(model, str(path))
    except _checkpoint_errors() as e:
        raise UserError(_why_not_loaded(path, name, e)) from None


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip holding ``<archive>/constants.pkl``."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("/constants.pkl") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _torchscript_state_dict(path: Path) -> dict:
    import torch

    state = torch.jit.load(str(path), map_location="cpu").state_dict()
    return {k: v for k, v in state.items() if k not in _TORCHSCRIPT_EXTRAS}


def _non_persistent_buffers(model: object) -> set[str]:
    """Buffers open_clip keeps out of its state dict (the text attention mask): a scripted
    model saves them all the same."""
    return {name for name, _ in model.named_buffers()} - set(model.state_dict())


def _why_not_loaded(path: Path, name: str, error: Exception) -> str:
    """Tell a file that is no checkpoint from a checkpoint of another model (read again: this
    runs only once loading has failed)."""
    import open_clip.factory
    import torch

    try:
        if _is_torchscript(path):
            state = _torchscript_state_dict(path)
        else:
            state = open_clip.factory.load_state_dict(str(path))
    except _checkpoint_errors() as e:
        state, error = None, e
    readable = isinstance(state, Mapping) and len(state) > 0
    if not readable or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return (
            f"--pretrained {path} is not a weights file ({_first_line(error)}); pass a "
            f"checkpoint saved from {name} (.pt, .bin or .safetensors), a tag, or none"
        )
    return (
        f"--pretrained {path} does not hold {name} weights ({_first_line(error)}); pass the "
        "--model the file was saved from, or weights saved from this model"
    )


def _first_line(error: BaseException, limit: int = 160) -> str:
    """The first informative line of an error: open_clip and torch put a header line first."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Error(s) in loading")] or lines
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    if not _cached(config) and (reason := hub_unreachable_reason()):
        from huggingface_hub import constants

        raise UserError(
            f"weights {name}/{tag} are not in the local cache and the model hub cannot be "
            f"reached ({reason}); fetch them on a connected machine (they are cached under "
            f"{constants.HF_HUB_CACHE}) or pass --pretrained /path/to/weights"
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


def hub_unreachable_reason() -> str | None:
    """Why the hub cannot serve a download right now, or None when it answers.

    huggingface_hub is asked, not the network, so the answer holds for the download that
    follows: its offline mode (HF_HUB_OFFLINE), its endpoint (HF_ENDPOINT, a mirror) and its
    HTTP session (proxies, certificates). One HEAD with a short timeout makes an offline
    machine fail at once instead of after the download's retries.
    """
    from huggingface_hub import constants, get_session

    if _hub_offline_mode():
        return "HF_HUB_OFFLINE is set"
    endpoint = constants.ENDPOINT
    try:
        response = get_session().head(endpoint, timeout=_HUB_PROBE_TIMEOUT_S)
    except Exception as e:  # the session is requests or httpx depending on the version
        return f"no answer from {endpoint}: {_first_line(e, 100)}"
    if response.status_code >= 500:  # a proxy or the hub itself failing: no download either
        return f"{endpoint} answered HTTP {response.status_code}"
    return None


def _hub_offline_mode() -> bool:
    """huggingface_hub's own offline switch (a function in recent versions, a constant before)."""
    from huggingface_hub import constants

    is_offline = getattr(constants, "is_offline_mode", None)
    return bool(is_offline() if callable(is_offline) else constants.HF_HUB_OFFLINE)


def file_sha256(path: Path) -> str:
    """The sha256 (hex) of the file at ``path``, read in 16 MiB chunks."""
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
