"""Patch tokens and the CLIP image embedding from one forward pass.

A forward hook on transformer block ``layer`` captures its output while ``encode_image`` runs,
so the tokens (LLaVA's penultimate layer by default) and the projected embedding cost a single
pass. The hook lives only for that call: the model is left as it was given, for any other user
of it. The CLS token is dropped and the patch grid average-pooled to ``side`` x ``side``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from vlmdata.encode.models import LoadedClip
from vlmdata.errors import UserError


def pool_patch_grid(patches: torch.Tensor, grid: int, side: int) -> torch.Tensor:
    """``[B, grid*grid, C]`` patch tokens -> ``[B, side*side, C]`` by adaptive average pooling."""
    batch, count, channels = patches.shape
    assert count == grid * grid, f"expected {grid * grid} patch tokens, got {count}"
    if side == grid:
        return patches
    image = patches.transpose(1, 2).reshape(batch, channels, grid, grid)
    return F.adaptive_avg_pool2d(image, side).flatten(2).transpose(1, 2)


def token_grid_side(tokens: str, clip: LoadedClip) -> int:
    """The pooled grid side for ``--tokens`` (a square number up to the patch grid, or all)."""
    grid = clip.grid
    if tokens == "all":
        return grid
    hint = f"the patch grid of {clip.name} is {grid}x{grid} ({grid * grid} tokens)"
    try:
        count = int(tokens)
    except ValueError:
        raise UserError(f"--tokens must be a square number or 'all', got {tokens!r}") from None
    side = math.isqrt(count) if count > 0 else 0
    if side * side != count or side == 0:
        raise UserError(f"--tokens {count} is not a square number (4, 16, 64, ...); {hint}")
    if side > grid:
        raise UserError(f"--tokens {count} needs a {side}x{side} grid but {hint}")
    return side


class PatchFeatures:
    """Callable: images ``[B, 3, H, W]`` -> (pooled tokens ``[B, T, C]``, embeds ``[B, E]``)."""

    def __init__(self, clip: LoadedClip, layer: int, side: int) -> None:
        if not -clip.layers <= layer < clip.layers:
            raise UserError(
                f"--layer {layer} is out of range: {clip.name} has {clip.layers} blocks "
                f"(use 0..{clip.layers - 1} or -1..-{clip.layers})"
            )
        self.clip, self.side = clip, side
        self.layer = layer % clip.layers
        self._batch_first = getattr(clip.model.visual.transformer, "batch_first", True)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.clip.model.visual.transformer.resblocks[self.layer]
        autocast = self.clip.autocast
        with (
            _captured_output(block) as outputs,
            torch.autocast(self.clip.device, dtype=autocast, enabled=autocast is not None),
        ):
            embeds = self.clip.model.encode_image(images, normalize=True)
        hidden = outputs[0] if self._batch_first else outputs[0].transpose(0, 1)
        grid = self.clip.grid
        patches = hidden[:, -grid * grid :]  # the CLS token comes first: drop it
        return pool_patch_grid(patches.float(), grid, self.side), embeds.float()


@contextmanager
def _captured_output(module: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect what ``module`` outputs inside the ``with`` block, through a forward hook that is
    removed on the way out, also when the forward fails."""
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _module, _inputs, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()
