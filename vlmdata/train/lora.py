"""LoRA on the LLM through peft (the ``lora`` extra): adapters on every linear layer of the
transformer blocks, the output head left alone."""

from __future__ import annotations

import warnings
from pathlib import Path

from vlmdata.errors import UserError


def add_lora(llm: object, rank: int, resume_from: Path | None) -> object:
    """``llm`` wrapped with fresh LoRA adapters of ``rank`` (alpha = 2 x rank), or with the
    adapters of checkpoint ``resume_from``."""
    try:
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    except ImportError:
        raise UserError('--train-llm lora needs peft: pip install "vlmdata[lora]"') from None
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05,
                        target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in 5.x
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        model = get_peft_model(llm, config)
    if resume_from is not None:
        from safetensors.torch import load_file

        set_peft_model_state_dict(
            model, load_file(resume_from / "lora" / "adapter_model.safetensors")
        )
    return model
