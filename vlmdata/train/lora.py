"""LoRA on the LLM through peft (the ``lora`` extra): adapters on every linear layer of the
transformer blocks, the output head left alone. Every use of peft goes through here."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vlmdata.errors import UserError

LORA_DIR = "lora"  # in a checkpoint
_WEIGHTS = "adapter_model.safetensors"


def add_lora(llm: object, rank: int, resume_from: Path | None) -> object:
    """``llm`` wrapped with fresh LoRA adapters of ``rank`` (alpha = 2 x rank), or with the
    adapters of checkpoint ``resume_from``."""
    peft = _peft()
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05,
                             target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    with _quiet():
        model = peft.get_peft_model(llm, config)
    if resume_from is not None:
        from safetensors.torch import load_file

        weights = load_file(resume_from / LORA_DIR / _WEIGHTS)
        peft.set_peft_model_state_dict(model, weights)
    return model


def save_lora(model: object, checkpoint: Path) -> None:
    """The adapters of ``model`` (a peft model) into ``checkpoint``."""
    with _quiet():
        # The embeddings are not adapted: peft need not check the vocabulary (on the hub).
        model.save_pretrained(checkpoint / LORA_DIR, save_embedding_layers=False)


def merged_lora(llm: object, checkpoint: Path) -> object:
    """``llm`` with the adapters of ``checkpoint`` merged into its weights: a plain model."""
    with _quiet():
        merged = _peft().PeftModel.from_pretrained(llm, checkpoint / LORA_DIR).merge_and_unload()
    if hasattr(merged, "peft_config"):  # left behind by merging
        del merged.peft_config
    return merged


def _peft() -> object:
    try:
        import peft
    except ImportError:
        raise UserError('--train-llm lora needs peft: pip install "vlmdata[lora]"') from None
    return peft


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in 5.x
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        yield
