"""Projectors: cached CLIP patch tokens ``[B, T, C]`` -> LLM input embeddings ``[B, Q, D]``.

Architectures are data (:class:`ProjectorConfig`), built by one factory, :func:`build_projector`:

- ``linear``: one matrix (LLaVA-1.0).
- ``mlp2x_gelu``: Linear, GELU, Linear (LLaVA-1.5).
- ``swiglu``: a gated MLP, SiLU(x W1) * (x W3) W2, as in Llama's feed-forward blocks.
- ``resampler``: Q learnable queries cross-attend to the patch tokens, both carrying 2D sin-cos
  positions of their grids (Qwen-VL's adapter): the LLM sees Q tokens whatever the cache holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vlmdata.errors import UserError

PROJECTORS = ("linear", "mlp2x_gelu", "swiglu", "resampler")


@dataclass(frozen=True)
class ProjectorConfig:
    kind: str
    in_dim: int  # the cached token width (the ViT's)
    out_dim: int  # the LLM's hidden size
    tokens: int  # cached tokens per image (a square grid)
    queries: int = 64  # resampler: learnable queries, a square number

    def __post_init__(self) -> None:
        if self.kind not in PROJECTORS:
            raise UserError(
                f"unknown --projector {self.kind!r}; use one of {', '.join(PROJECTORS)}"
            )
        if self.kind == "resampler" and not _is_square(self.queries):
            raise UserError(
                f"--queries {self.queries} is not a square number (16, 64, 144, 256): the "
                "resampler's queries carry 2D grid positions"
            )

    @property
    def output_tokens(self) -> int:
        """Image tokens the LLM sees per image."""
        return self.queries if self.kind == "resampler" else self.tokens


def build_projector(config: ProjectorConfig) -> nn.Module:
    """The projector ``config`` describes, freshly initialised (from the caller's RNG)."""
    c, d = config.in_dim, config.out_dim
    if config.kind == "linear":
        return nn.Linear(c, d)
    if config.kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(c, d), nn.GELU(), nn.Linear(d, d))
    if config.kind == "swiglu":
        return SwiGLU(c, d)
    return Resampler(c, d, config.tokens, config.queries)


class SwiGLU(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(in_dim, out_dim)
        self.up = nn.Linear(in_dim, out_dim)
        self.down = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class Resampler(nn.Module):
    """One cross-attention layer from ``queries`` learnable queries to the patch tokens.

    As in Qwen-VL: keys are the tokens projected to the LLM width and layer-normed; queries and
    keys both get the 2D sin-cos position of their cell (the queries on their own grid), so
    the queries can attend by place; the result is layer-normed and projected.
    """

    def __init__(self, in_dim: int, out_dim: int, tokens: int, queries: int) -> None:
        super().__init__()
        self.kv = nn.Linear(in_dim, out_dim, bias=False)
        self.query = nn.Parameter(torch.randn(queries, out_dim) * 0.02)
        self.norm_query = nn.LayerNorm(out_dim)
        self.norm_kv = nn.LayerNorm(out_dim)
        self.attention = nn.MultiheadAttention(out_dim, _heads(out_dim), batch_first=True)
        self.norm_out = nn.LayerNorm(out_dim)
        self.out = nn.Linear(out_dim, out_dim)
        # Fixed functions of the shapes: not saved, rebuilt on load.
        self.register_buffer("query_position", sincos_2d(out_dim, queries), persistent=False)
        self.register_buffer("key_position", sincos_2d(out_dim, tokens), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(self.kv(tokens))
        query = self.norm_query(self.query) + self.query_position
        query = query.unsqueeze(0).expand(len(tokens), -1, -1)
        mixed, _ = self.attention(query, kv + self.key_position, kv, need_weights=False)
        return self.out(self.norm_out(mixed))


def sincos_2d(dim: int, count: int) -> torch.Tensor:
    """Fixed 2D sin-cos positions ``[count, dim]`` of a ``sqrt(count)`` square grid (MAE's):
    half the channels encode the row, half the column."""
    side = math.isqrt(count)
    if side * side != count or dim % 4:
        raise UserError(
            f"2D positions need a square grid and a width divisible by 4 ({count}, {dim})"
        )
    frequencies = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.flatten().double()[:, None] * frequencies[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def _heads(width: int) -> int:
    """Attention heads for ``width``: heads of at least 64 channels (or one head), at most 16."""
    return next(h for h in (16, 8, 4, 2, 1) if width % h == 0 and width // h >= min(64, width))


def _is_square(count: int) -> bool:
    return count > 0 and math.isqrt(count) ** 2 == count
