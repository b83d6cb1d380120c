"""The vision-language model: a projector, learned image-begin/end embeddings, a causal LM.

The projected image tokens are written into the LLM's input embeddings at each row's image
slots (``Batch.image_at``), between the two learned embeddings. Logits are computed only where
there is a loss: a 128k-token vocabulary times every position would be most of the memory.
The loss comes back as a sum with its token count, so gradient accumulation and data parallel
ranks can weight every token of an optimizer step equally.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmdata.train.data import Batch
from vlmdata.train.projectors import ProjectorConfig, build_projector
from vlmdata.train.sequence import IGNORE


class VisionLanguageModel(nn.Module):
    def __init__(self, llm: nn.Module, projector: ProjectorConfig) -> None:
        super().__init__()
        self.llm = llm
        self.projector = build_projector(projector)
        embeddings = llm.get_input_embeddings().weight
        scale = embeddings.detach().float().std().item()  # as large as a word's embedding
        self.image_begin = nn.Parameter(torch.randn(projector.out_dim) * scale)
        self.image_end = nn.Parameter(torch.randn(projector.out_dim) * scale)
        self.image_slots = projector.output_tokens + 2

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """What every run trains and saves: the projector and the image-begin/end embeddings."""
        state = {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        return {**state, "image_begin": self.image_begin.data, "image_end": self.image_end.data}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        projector = {k.removeprefix("projector."): v for k, v in state.items()
                     if k.startswith("projector.")}  # fmt: skip
        self.projector.load_state_dict(projector)
        with torch.no_grad():
            self.image_begin.copy_(state["image_begin"])
            self.image_end.copy_(state["image_end"])

    def input_embeddings(self, batch: Batch) -> torch.Tensor:
        """The text embeddings with each row's image slots replaced by
        ``[begin, projected tokens..., end]``."""
        text = self.llm.get_input_embeddings()(batch.input_ids)
        image = self.projector(batch.tokens.to(self.image_begin.dtype))
        count, _, width = image.shape
        image = torch.cat(
            [
                self.image_begin.expand(count, 1, width),
                image,
                self.image_end.expand(count, 1, width),
            ],
            dim=1,
        ).to(text.dtype)
        slots = batch.image_at[:, None] + torch.arange(self.image_slots, device=text.device)
        return text.scatter(1, slots[..., None].expand(-1, -1, width), image)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, int]:
        """(summed cross-entropy over the answer tokens, their count)."""
        hidden = _decoder(self.llm)(
            inputs_embeds=self.input_embeddings(batch),
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).last_hidden_state
        targets = batch.labels[:, 1:]
        where = targets != IGNORE
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][where])
        loss = F.cross_entropy(logits.float(), targets[where], reduction="sum")
        return loss, int(where.sum())

    @torch.no_grad()
    def generate(
        self,
        batch: Batch,
        stop_ids: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        num: int = 1,
    ) -> torch.Tensor:
        """New token ids ``[B * num, <= max_new_tokens]`` after each (left-padded) prompt."""
        sampling = temperature > 0
        return self.llm.generate(
            inputs_embeds=self.input_embeddings(batch),
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=top_p if sampling else None,
            top_k=None,
            num_return_sequences=num,
            eos_token_id=stop_ids,
            pad_token_id=stop_ids[0],
            use_cache=True,
        )


def _decoder(llm: nn.Module) -> nn.Module:
    """The transformer under the LM head (LlamaModel in LlamaForCausalLM), through a peft
    wrapper; its LoRA layers, injected in place, stay in it."""
    causal = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    return getattr(causal, causal.base_model_prefix)
