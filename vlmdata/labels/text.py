"""The text side of zero-shot labels: every description of the taxonomy through the CLIP text
tower of the model the features came from, averaged over prompt templates (CLIP's zero-shot
recipe), and cached in the output directory so a rerun never encodes them again.
"""

from __future__ import annotations

import io
import json
import textwrap
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlmdata.encode.models import LoadedClip, file_sha256, known_model, load_clip
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
            # Older encodes recorded the path as typed: relative to where encode ran.
            + ("" if path.is_absolute() else " (a path relative to where the encode ran)")
        )  # fmt: skip
        raise UserError(
            f"{where}; pass --pretrained PATH to that file (sha256 {model.weights_sha256[:16]}...)"
        )
    digest = file_sha256(path)
    if digest != model.weights_sha256:
        raise UserError(
            f"{path} is not the weights file the features were made with (sha256 {digest[:16]}..., "
            f"expected {model.weights_sha256[:16]}...); pass --pretrained with that file"
        )
    return str(path)


def check_text_model(
    model: FeatureModel, descriptions: Sequence[str], templates: Sequence[str]
) -> None:
    """Refuse what would stop the text encoding, before a run writes anything: a model this
    open_clip does not know, and a prompt longer than the model's context (its tokenizer would
    cut it). Loads no weights: only the tokenizer."""
    import open_clip

    if not known_model(model.name):  # an edited attribute, or another open_clip's model
        raise UserError(
            f"the features were made with model {model.name!r} (their .h5 attribute model), "
            "which this open_clip does not know; install the open_clip that made them, or "
            "rerun the encode"
        )
    tokenizer = open_clip.get_tokenizer(model.name)
    _refuse_cut_prompts(tokenizer, model.name, descriptions, templates)


def text_embeddings(
    clip: LoadedClip, descriptions: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """Unit embeddings ``[len(descriptions), E]`` (float32): each description in every
    template, encoded and normalised, averaged over the templates and normalised again. The
    prompts are those :func:`check_text_model` let through (a longer one would be cut)."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(clip.name)
    rows = []
    for chunk, prompts in _prompt_batches(descriptions, templates):
        with torch.inference_mode():
            encoded = clip.model.encode_text(tokenizer(prompts).to(clip.device)).float()
        encoded = F.normalize(encoded, dim=-1).view(len(chunk), len(templates), -1).mean(dim=1)
        rows.append(F.normalize(encoded, dim=-1))
    return torch.cat(rows).cpu()


def _prompt_batches(
    descriptions: Sequence[str], templates: Sequence[str]
) -> Iterator[tuple[Sequence[str], list[str]]]:
    """Whole descriptions at a time, each with its prompts: every template around it."""
    per_batch = max(1, _PROMPTS_PER_BATCH // len(templates))
    for start in range(0, len(descriptions), per_batch):
        chunk = descriptions[start : start + per_batch]
        yield chunk, [template.replace("{}", text) for text in chunk for template in templates]


def _refuse_cut_prompts(
    tokenizer: Callable, model: str, descriptions: Sequence[str], templates: Sequence[str]
) -> None:
    """Refuse prompts longer than the model's context: its tokenizer would cut them without a
    word, and descriptions that differ only past the cut would get one embedding. Counted by
    the model's own tokenizer: with room for one more token, the last is padding when it fits.
    """
    context = tokenizer.context_length
    pad = tokenizer([""], context_length=context + 1)[0, -1]

    def too_long(prompts: list[str]) -> torch.Tensor:
        return tokenizer(prompts, context_length=context + 1)[:, -1] != pad

    def tokens(prompt: str) -> int:  # room for every byte, each at most one token
        wide = tokenizer([prompt], context_length=context + len(prompt.encode("utf-8")))
        return int((wide[0] != pad).sum())

    bare = too_long([template.replace("{}", "") for template in templates])
    if bare.any():  # too long without a description: the template is what to shorten
        template = templates[int(bare.nonzero()[0])]
        raise UserError(
            f"{int(bare.sum())} of {len(templates)} templates are longer than the {context} "
            f"tokens {model} reads (its context; it would cut them): the first, "
            f"{_shown(template)!r}, is {tokens(template.replace('{}', ''))} tokens; shorten them"
        )
    count, first = 0, None
    for chunk, prompts in _prompt_batches(descriptions, templates):
        cut = too_long(prompts).view(len(chunk), len(templates))
        count += int(cut.any(dim=1).sum())
        if first is None and cut.any():
            row, column = (int(i) for i in cut.nonzero()[0])
            first = (chunk[row], templates[column])
    if first is not None:
        description, template = first
        raise UserError(
            f"{count} of {len(descriptions)} descriptions are longer than the {context} tokens "
            f"{model} reads (its context; it would cut them): the first, {_shown(description)!r}, "
            f"is {tokens(template.replace('{}', description))} tokens in template "
            f"{_shown(template)!r}; shorten them (or the templates)"
        )


def _shown(text: str) -> str:
    """``text`` cut to a length a one-line message can hold."""
    return textwrap.shorten(text, 80, placeholder="...")


def label_embeddings(
    clip: LoadedClip, descriptions: Sequence[str], templates: Sequence[str]
) -> LabelEmbeddings:
    """The descriptions' embeddings and the model's logit scale (``logit_scale.exp()``)."""
    scale = float(clip.model.logit_scale.exp().item())
    return LabelEmbeddings(text_embeddings(clip, descriptions, templates), scale)


def load_text_model(model: FeatureModel, weights: str, device: str) -> LoadedClip:
    """The features' CLIP model (whole: its text tower is what is used) on ``device``; its
    name is one :func:`check_text_model` knows."""
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
    path: Path,
    key: dict,
    build: Callable[[], LabelEmbeddings],
    shape: tuple[int, int] | None = None,
) -> LabelEmbeddings:
    """The embeddings cached at ``path`` for ``key`` (of ``shape`` ``[D, E]`` when given);
    otherwise (missing, another key, damaged) ``build()``, written to ``path`` atomically."""
    cached = read_cache(path, key, shape)
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


def read_cache(
    path: Path, key: dict, shape: tuple[int, int] | None = None
) -> LabelEmbeddings | None:
    """The cache at ``path`` if it is whole, made for ``key`` and (when given) of ``shape``,
    else None (zip's CRCs catch a damaged file, the shape an edited one: it is rebuilt, never
    trusted)."""
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
    if shape is not None and embeddings.shape != tuple(shape):
        return None
    return LabelEmbeddings(torch.from_numpy(embeddings), scale)
