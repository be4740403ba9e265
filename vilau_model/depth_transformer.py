"""The depth transformer: predicts the D residual codes of one visual position (RQ-Transformer style).

The LLM gives one hidden state h_t per visual position (the state *before* that position, i.e. the one
that predicts it). The D codes of the position are then predicted autoregressively over depth by this
small causal transformer, whose input sequence for a position is

    depth 0:  proj_h(h_t)
    depth d:  proj_c(e_0 + ... + e_{d-1})        (cumulative code embeddings of the shallower depths)

plus a learned depth position embedding. The cumulative sum is what the residual quantizer has
reconstructed so far, so depth d sees "the image feature up to depth d-1" and predicts the next residual.
One output head, shared by all depths, scores the codebook.

`depth_cross_entropy_sum` is the training loss over many positions. Its logits are [N, D, codebook]: at
vilau-384 one 8192-token row holds 5832 visual positions x 16 depths x 16384 codes, ~6 GB in fp32 (and
as much again for the softmax and the gradient), so it runs in chunks of positions, each recomputed in
the backward pass: memory is bounded by the chunk, whatever N, D and the codebook size.

The loss runs inside one call of the module (`depth(h, target_codes=..., code_vectors=...)`), and the
chunks call `logits`, not the module: under FSDP2 the depth transformer is one unit whose hooks wrap
module calls, so its parameters are all-gathered once for all chunks (and their recomputes), and the
gradients reduce-scattered once. One module call per chunk would all-gather per chunk, in forward and
again in the backward recompute, and reduce-scatter per chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


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

    def forward(
        self,
        h: torch.Tensor,
        prefix_vectors: torch.Tensor | None = None,
        *,
        target_codes: torch.Tensor | None = None,
        code_vectors: Callable[[torch.Tensor], torch.Tensor] | None = None,
        max_logits_per_chunk: int | None = 2**25,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for `prefix_vectors` (see `logits`), or with `target_codes` the teacher-forced
        cross-entropy sum over all positions (see `depth_cross_entropy_sum`), in this one module call."""
        if target_codes is None:
            return self.logits(h, prefix_vectors)
        return depth_cross_entropy_sum(self, h, target_codes, code_vectors, max_logits_per_chunk, weights)

    def logits(self, h: torch.Tensor, prefix_vectors: torch.Tensor) -> torch.Tensor:
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
            cumulative = prefix_vectors.float().cumsum(dim=1).to(x.dtype)  # fp32 sums, as UnifiedLM.code_sum
            x = torch.cat([x, self.proj_c(cumulative)], dim=1)
        x = x + self.pos[: d + 1].to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def depth_cross_entropy_sum(
    depth: DepthTransformer,
    h: torch.Tensor,
    target_codes: torch.Tensor,
    code_vectors: Callable[[torch.Tensor], torch.Tensor],
    max_logits_per_chunk: int | None = 2**25,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over positions and depths of the cross-entropy of the teacher-forced depth logits. Under FSDP
    call it as `depth(h, target_codes=..., code_vectors=...)`: one gather for all chunks (module doc).

    h: [N, llm_hidden] the states predicting each position; target_codes: LongTensor[N, D];
    code_vectors: codes [n, D] -> code vectors [n, D, code_width] (no gradient needed).
    max_logits_per_chunk: logits (positions x D x codebook) computed at once; chunks beyond the first are
        recomputed in the backward pass instead of kept. None = all positions at once (the unbounded
        reference). N = 0 runs the depth transformer on one dummy position weighted 0 (never on an
        empty batch), so that every FSDP rank runs the same modules whatever its data holds.
    weights: optional [N] per-position factors on the position's D cross-entropies (None = all 1).
    """
    n, d = target_codes.shape
    if n == 0:
        # No visual target: CUDA's flash attention refuses a batch of 0, yet under FSDP every rank must
        # run the same modules (their all-gathers are collectives). One dummy position, weighted 0: the
        # loss is 0 and every depth parameter (and h) stays in the graph with a zero gradient.
        dummy = _depth_ce_sum(depth, h.new_zeros(1, h.shape[-1]), target_codes.new_zeros(1, d), code_vectors)
        return dummy * 0.0 + h.sum() * 0.0
    per_chunk = n if max_logits_per_chunk is None else max(1, max_logits_per_chunk // (d * depth.codebook_size))
    if n <= per_chunk:
        return _depth_ce_sum(depth, h, target_codes, code_vectors, weights)
    total = h.new_zeros((), dtype=torch.float32)
    for start in chunk_starts(n, per_chunk):
        part = slice(start, start + per_chunk)
        chunk = (h[part], target_codes[part], code_vectors, None if weights is None else weights[part])
        if torch.is_grad_enabled():
            total = total + checkpoint(_depth_ce_sum, depth, *chunk, use_reentrant=False)
        else:
            total = total + _depth_ce_sum(depth, *chunk)
    return total


def chunk_starts(n: int, per_chunk: int) -> range:
    """First position of each chunk of the depth loss (the memory plan runs a sample of them: each
    chunk holds the same memory and frees it before the next)."""
    return range(0, n, per_chunk)


def _depth_ce_sum(
    depth: DepthTransformer, h: torch.Tensor, codes: torch.Tensor, code_vectors, weights: torch.Tensor | None = None
) -> torch.Tensor:
    with torch.no_grad():
        vectors = code_vectors(codes)  # [n, D, width]
    logits = depth.logits(h, vectors[:, :-1]).float()  # [n, D, K]; fp32 for the softmax
    if weights is None:
        return F.cross_entropy(logits.reshape(-1, depth.codebook_size), codes.reshape(-1), reduction="sum")
    ce = F.cross_entropy(logits.reshape(-1, depth.codebook_size), codes.reshape(-1), reduction="none")
    return (ce.view(codes.shape) * weights.float()[:, None]).sum()
