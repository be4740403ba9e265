"""The depth transformer: predicts the D residual codes of one visual position (RQ-Transformer style).

The LLM gives one hidden state h_t per visual position (the state *before* that position, i.e. the one
that predicts it). The D codes of the position are then predicted autoregressively over depth by this
small causal transformer, whose input sequence for a position is

    depth 0:  proj_h(h_t)
    depth d:  proj_c(e_0 + ... + e_{d-1})        (cumulative code embeddings of the shallower depths)

plus a learned depth position embedding. The cumulative sum is what the residual quantizer has
reconstructed so far, so depth d sees "the image feature up to depth d-1" and predicts the next residual.
One output head, shared by all depths, scores the codebook.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    """Pre-LN transformer block with causal self-attention over depth."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        assert dim % heads == 0, "depth hidden size must be divisible by the number of heads"
        self.heads = heads
        self.ln_1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, d, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(c, dim=-1)
        q, k, v = (t.view(n, d, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(n, d, c))
        return x + self.mlp(self.ln_2(x))


class DepthTransformer(nn.Module):
    def __init__(
        self,
        llm_hidden_size: int,
        code_width: int,
        code_depth: int,
        codebook_size: int,
        hidden_size: int,
        layers: int,
        heads: int,
    ):
        super().__init__()
        self.code_depth = code_depth
        self.codebook_size = codebook_size
        self.proj_h = nn.Linear(llm_hidden_size, hidden_size)
        self.proj_c = nn.Linear(code_width, hidden_size)
        self.pos = nn.Parameter(torch.zeros(code_depth, hidden_size))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(_Block(hidden_size, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden_size)
        self.head = nn.Linear(hidden_size, codebook_size)

    def forward(self, h: torch.Tensor, prefix_vectors: torch.Tensor) -> torch.Tensor:
        """Codebook logits for depths 0..d.

        h: [N, llm_hidden] the LLM state predicting each position.
        prefix_vectors: [N, d, code_width] the code vectors of depths 0..d-1 (0 <= d < D), teacher-forced
            in training (d = D-1: all but the last depth) or sampled so far in generation.
        returns [N, d+1, codebook_size].
        """
        d = prefix_vectors.shape[1]
        assert d < self.code_depth, f"at most {self.code_depth - 1} prefix depths, got {d}"
        x = self.proj_h(h).unsqueeze(1)
        if d > 0:
            cumulative = prefix_vectors.cumsum(dim=1).to(x.dtype)
            x = torch.cat([x, self.proj_c(cumulative)], dim=1)
        x = x + self.pos[: d + 1].to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
