"""Causal language models for the VLM: Hugging Face hub ids, local directories, and the built-in
``tiny-random-llama``.

One entry point, :func:`load_llm`. ``tiny-random-llama`` is a two-block Llama with seeded
random weights and ByT5's byte tokenizer (it needs no vocabulary file), for tests, the demo and
CPU benchmarks. A hub id that is not in the local cache fails at once when the hub cannot be
reached, as encode's model loading does, instead of after transformers' retries.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vlmdata.errors import UserError, one_line

TINY_RANDOM_LLAMA = "tiny-random-llama"
# Small enough to train a few hundred steps a minute on two CPU cores, large enough to learn
# the demo's captions.
_TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
_SEED = 0


@dataclass
class LoadedLLM:
    """A causal LM, its tokenizer, and what a run records of it."""

    model: object  # transformers PreTrainedModel (a causal LM), on its device
    tokenizer: object  # transformers PreTrainedTokenizerBase
    name: str  # as given: a hub id, a local directory, or tiny-random-llama
    hidden_size: int


def load_llm(name: str, device: str, dtype: object, weights_dir: Path | None = None) -> LoadedLLM:
    """Load the causal LM ``name`` (its tokenizer always from ``name``; its weights from
    ``weights_dir`` when a run trained them) on ``device`` with weights in ``dtype``."""

    tokenizer = load_tokenizer(name)
    if weights_dir is not None:
        model = _from_pretrained(str(weights_dir), dtype)
    elif name == TINY_RANDOM_LLAMA:
        warnings.warn(
            f"{TINY_RANDOM_LLAMA} has random weights: it is for tests and the demo", stacklevel=2
        )
        model = _tiny_llama(tokenizer).to(dtype=dtype)
    else:
        model = _from_pretrained(_checked_source(name), dtype)
    _refuse_scaled_logits(model.config, name)
    if tokenizer.pad_token_id is None:  # Llama's tokenizers have none: any id works, as it
        tokenizer.pad_token = tokenizer.eos_token  # is masked out of attention and loss
    model = model.to(device)
    model.config.use_cache = False  # training; generate turns it on for itself
    return LoadedLLM(model=model, tokenizer=tokenizer, name=name,
                     hidden_size=int(model.get_input_embeddings().weight.shape[1]))  # fmt: skip


def _refuse_scaled_logits(config: object, name: str) -> None:
    """The VLM computes logits from the LM head alone (on answer positions only): a model whose
    forward rescales or caps them (Gemma 2/3, Cohere) would train on another loss."""
    capped = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    if capped or scale not in (None, 1, 1.0):
        raise UserError(
            f"--llm {name} scales or caps its logits in its forward, which vlmdata's loss does not "
            "reproduce; use a Llama, Qwen2 or SmolLM-style model"
        )


def load_tokenizer(name: str) -> object:
    """The tokenizer of ``name`` (ByT5's byte tokenizer for tiny-random-llama)."""
    if name == TINY_RANDOM_LLAMA:
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    from transformers import AutoTokenizer

    source = _checked_source(name)
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=_local_only(source))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of --llm {name}: {one_line(e, 200)}") from None


def _tiny_llama(tokenizer: object) -> object:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **_TINY_LLAMA,
    )
    with torch.random.fork_rng(devices=[]):  # the same model in every run, the caller's RNG kept
        torch.manual_seed(_SEED)
        return LlamaForCausalLM(config)


def _from_pretrained(source: str, dtype: object) -> object:
    from transformers import AutoModelForCausalLM

    try:
        with no_progress_bars():  # one line per load would break the training bar's line
            return AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, local_files_only=_local_only(source)
            )
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the causal LM {source}: {one_line(e, 200)}") from None


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' own progress bars (loading and saving weights) off inside the block."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def _checked_source(name: str) -> str:
    """``name`` as a local directory or a hub id whose files can be had; else one line."""
    if Path(name).is_dir():
        return name
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not org/name
        raise UserError(f"--llm {name} is not a directory; pass a model directory or a hub id")
    if _cached(name):
        return name
    from vlmdata.encode.models import hub_unreachable_reason

    if reason := hub_unreachable_reason():
        from huggingface_hub import constants

        raise UserError(
            f"--llm {name} is not in the local cache and the model hub cannot be reached "
            f"({reason}); fetch it on a connected machine (cached under "
            f"{constants.HF_HUB_CACHE}), pass a local model directory, or {TINY_RANDOM_LLAMA}"
        )
    return name


def _cached(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repo id
        raise UserError(
            f"--llm {name!r} is neither a directory nor a hub id (org/name); pass one of them, "
            f"or {TINY_RANDOM_LLAMA}"
        ) from None


def _local_only(source: str) -> bool:
    return Path(source).is_dir() or _cached(source)
