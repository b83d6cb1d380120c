"""The text side of zero-shot labels: every description of the taxonomy through the CLIP text
tower of the model the features came from, averaged over prompt templates (CLIP's zero-shot
recipe), and cached in the output directory so a rerun never encodes them again.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlmdata.encode.models import LoadedClip, load_clip
from vlmdata.errors import UserError
from vlmdata.labels.features import FeatureModel
from vlmdata.pipeline.shards import atomic_write_bytes

CACHE_FILE = "text_embeddings.npz"
_PROMPTS_PER_BATCH = 256


@dataclass(frozen=True)
class LabelEmbeddings:
    """One unit text embedding per description ``[D, E]`` and the model's logit scale."""

    embeddings: torch.Tensor  # float32, rows in the taxonomy's description order
    logit_scale: float


def check_model_flag(model: FeatureModel, flag: str | None) -> None:
    """Refuse a ``--model`` that is not the one the features were made with."""
    if flag is not None and flag != model.name:
        raise UserError(
            f"--model {flag} contradicts the features, made with {model.name}; drop --model or "
            f"pass {model.name}"
        )


def resolve_weights(model: FeatureModel, pretrained: str | None) -> str:
    """The ``--pretrained`` value that loads the weights the features were made with.

    A weights file is taken from ``pretrained`` (moved since) or its recorded path, and must
    have the recorded sha256; a tag or random weights are used as recorded.
    """
    if model.weights_sha256 is None:
        if pretrained not in (None, model.pretrained):
            raise UserError(
                f"the features were made with --pretrained {model.pretrained}, not a weights "
                f"file; drop --pretrained or pass {model.pretrained}"
            )
        return model.pretrained
    path = Path(pretrained or model.pretrained)
    if not path.is_file():
        where = f"--pretrained {path} is not a file" if pretrained else (
            f"the weights file the features were made with is no longer at {path}"
        )  # fmt: skip
        raise UserError(
            f"{where}; pass --pretrained PATH to that file (sha256 {model.weights_sha256[:16]}...)"
        )
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != model.weights_sha256:
        raise UserError(
            f"{path} is not the weights file the features were made with (sha256 {digest[:16]}..., "
            f"expected {model.weights_sha256[:16]}...); pass --pretrained with that file"
        )
    return str(path)


def text_embeddings(
    clip: LoadedClip, descriptions: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """Unit embeddings ``[len(descriptions), E]`` (float32): each description in every
    template, encoded and normalised, averaged over the templates and normalised again."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(clip.name)
    per_batch = max(1, _PROMPTS_PER_BATCH // len(templates))  # whole descriptions per batch
    rows = []
    for start in range(0, len(descriptions), per_batch):
        chunk = descriptions[start : start + per_batch]
        prompts = [template.replace("{}", text) for text in chunk for template in templates]
        with torch.inference_mode():
            encoded = clip.model.encode_text(tokenizer(prompts).to(clip.device)).float()
        encoded = F.normalize(encoded, dim=-1).view(len(chunk), len(templates), -1).mean(dim=1)
        rows.append(F.normalize(encoded, dim=-1))
    return torch.cat(rows).cpu()


def label_embeddings(
    clip: LoadedClip, descriptions: Sequence[str], templates: Sequence[str]
) -> LabelEmbeddings:
    """The descriptions' embeddings and the model's logit scale (``logit_scale.exp()``)."""
    scale = float(clip.model.logit_scale.exp().item())
    return LabelEmbeddings(text_embeddings(clip, descriptions, templates), scale)


def load_text_model(model: FeatureModel, weights: str, device: str) -> LoadedClip:
    """The features' CLIP model (whole: its text tower is what is used) on ``device``."""
    clip = load_clip(model.name, weights, device, "fp32")
    if clip.embed_dim != model.embed_dim:
        raise UserError(
            f"{model.name} embeds into {clip.embed_dim} dimensions but the features have "
            f"{model.embed_dim}; pass the --pretrained weights the features were made with"
        )
    return clip


def cache_key(model: FeatureModel, taxonomy_digest: str, templates_digest: str) -> dict:
    """What the text embeddings depend on: a cache made for another key is not used."""
    return {"model": model.name, "weights": model.weights, "taxonomy": taxonomy_digest,
            "templates": templates_digest}  # fmt: skip


def cached_label_embeddings(
    path: Path, key: dict, build: Callable[[], LabelEmbeddings]
) -> LabelEmbeddings:
    """The embeddings cached at ``path`` for ``key``; otherwise (missing, another key,
    damaged) ``build()``, written to ``path`` atomically."""
    cached = read_cache(path, key)
    if cached is not None:
        return cached
    built = build()
    buffer = io.BytesIO()
    np.savez(
        buffer,
        key=np.array(json.dumps(key, sort_keys=True)),
        embeddings=built.embeddings.numpy(),
        logit_scale=np.array(built.logit_scale, dtype=np.float64),
    )
    atomic_write_bytes(path, buffer.getvalue())
    return built


def read_cache(path: Path, key: dict) -> LabelEmbeddings | None:
    """The cache at ``path`` if it is whole and made for ``key``, else None (zip's CRCs catch
    a damaged file: it is rebuilt, never trusted)."""
    try:
        with np.load(path, allow_pickle=False) as cache:
            if str(cache["key"]) != json.dumps(key, sort_keys=True):
                return None
            embeddings = cache["embeddings"]
            scale = float(cache["logit_scale"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # FileNotFoundError included: nothing cached yet
    if embeddings.ndim != 2 or embeddings.dtype != np.float32 or not np.isfinite(scale):
        return None
    return LabelEmbeddings(torch.from_numpy(embeddings), scale)
