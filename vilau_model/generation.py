"""Generation with the unified LM: text continuation, and images / video with classifier-free guidance.

Image generation runs the LLM over the grid positions one at a time (with a KV cache). At each position
the depth transformer samples the D residual codes one depth after the other; with guidance, the depth
logits are u + s * (c - u), c from the LLM state of the real prompt and u from the state of the empty
prompt ([BOS] only, the unconditional prompt VILA-U uses), both streams run in one left-padded batch.
The sampled codes are fed back to both streams through the projector, and the tower decodes the final
grid to pixels. A video is 8 frames' grids generated as one block after `<vi_start>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import DynamicCache

from vilau_model.sequence import BuiltSequence


@dataclass
class ImageGeneration:
    codes: torch.Tensor  # LongTensor [B, H, W, D] (images) or [B, T, H, W, D] (video)
    images: list  # one PIL image per prompt, or for video one list of T PIL frames per prompt
    depth_logits: list[torch.Tensor] | None = None  # per grid position [B, D, K], the (guided) logits sampled from


# ----------------------------------------------------------------------------------------------------
# Sampling


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: u + s * (c - u). s = 1 gives c, s = 0 gives u."""
    return uncond + scale * (cond - uncond)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (the best token always stays)."""
    logits = logits.clone()
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits[drop] = float("-inf")
    return logits


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One id per row of logits [N, V]; temperature 0 = greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    if generator is not None and generator.device != probs.device:
        # A seeded generator draws on its own device (a CUDA tensor refuses a CPU generator): a CPU
        # generator gives the same samples from the same probabilities whatever device the model is on.
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------------
# LLM streams with a KV cache


class _Streams:
    """A left-padded batch of prompts run through the LLM once, then stepped one position at a time."""

    def __init__(self, model, prompts: Sequence[BuiltSequence]):
        self.model = model
        device = next(model.parameters()).device
        M = max(len(p) for p in prompts)
        D, pad = model.code_depth, model.special.pad
        ids = torch.full((len(prompts), M), pad, dtype=torch.long)
        codes = torch.zeros((len(prompts), M, D), dtype=torch.long)
        visual = torch.zeros((len(prompts), M), dtype=torch.bool)
        mask = torch.zeros((len(prompts), M), dtype=torch.long)
        for i, p in enumerate(prompts):
            n = len(p)
            ids[i, M - n :] = torch.from_numpy(p.input_ids.astype(np.int64))
            codes[i, M - n :] = torch.from_numpy(p.codes.astype(np.int64))
            visual[i, M - n :] = torch.from_numpy(p.is_visual)
            mask[i, M - n :] = 1
        self.mask = mask.to(device)
        self.positions = (self.mask.cumsum(dim=1) - 1).clamp(min=0)
        self.cache = DynamicCache()
        embeds = model.embed(ids.to(device), codes.to(device), visual.to(device))
        self.hidden = self._run(embeds, self.positions)

    def _run(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model.llm.get_decoder()(
            inputs_embeds=embeds,
            attention_mask=self.mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        return out.last_hidden_state[:, -1]

    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        """Append one position per stream (embeds [B, hidden]); returns the new last hidden states."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.mask), 1)], dim=1)
        next_position = self.positions[:, -1:] + 1
        self.positions = torch.cat([self.positions, next_position], dim=1)
        self.hidden = self._run(embeds[:, None].to(self.hidden.dtype), next_position)
        return self.hidden


def _as_prompt(model, prompt) -> BuiltSequence:
    if isinstance(prompt, BuiltSequence):
        return prompt
    ids = np.asarray(list(prompt), dtype=np.int32)
    return BuiltSequence(ids, ids.copy(), np.zeros((len(ids), model.code_depth), np.int16), np.zeros(len(ids), bool))


# ----------------------------------------------------------------------------------------------------
# Text


@torch.no_grad()
def generate_text(
    model,
    prompts: Sequence[BuiltSequence | Sequence[int]],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue each prompt (token ids, or a `BuiltSequence` with images, e.g. from
    `SequenceBuilder.understanding_prompt`). Returns the new ids per prompt, up to and excluding EOS.
    temperature 0 = greedy."""
    streams = _Streams(model, [_as_prompt(model, p) for p in prompts])
    head = model.llm.get_output_embeddings()
    embed_tokens = model.llm.get_input_embeddings()
    out = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    hidden = streams.hidden
    for _ in range(max_new_tokens):
        next_ids = sample(head(hidden).float(), temperature, top_k, top_p, generator).cpu()
        for i, t in enumerate(next_ids.tolist()):
            if not done[i]:
                if t == model.special.eos:
                    done[i] = True
                else:
                    out[i].append(t)
        if done.all():
            break
        hidden = streams.step(embed_tokens(next_ids.to(hidden.device)))
    return out


# ----------------------------------------------------------------------------------------------------
# Images and video


@torch.no_grad()
def generate_images(
    model,
    prompts: Sequence[Sequence[int]],
    cfg_scale: float | None = None,
    use_cfg: bool = True,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    num_frames: int = 1,
    decode: bool = True,
    return_logits: bool = False,
    unconditional: Sequence[int] | None = None,
) -> ImageGeneration:
    """Generate one image (num_frames = 1) or video (num_frames = T) per prompt.

    prompts: token ids per prompt, BOS first, no start marker (`SequenceBuilder.generation_prompt(text)`).
    cfg_scale, temperature, top_k, top_p: default to the model config's (3.0, 1.0, 900, 0.96).
        use_cfg=False samples from the conditional logits alone (no unconditional stream). temperature 0 = greedy.
    unconditional: the unconditional prompt's ids (BOS first, no start marker); default [BOS]. The released
        VILA-U's is its conversation template with an empty user turn (`released_format.template_prompt_ids`).
    """
    cfg = model.config
    scale = cfg.cfg_scale if cfg_scale is None else cfg_scale
    temperature = cfg.temperature if temperature is None else temperature
    top_k = cfg.top_k if top_k is None else top_k
    top_p = cfg.top_p if top_p is None else top_p
    special = model.special
    video = num_frames > 1
    start = special.vi_start if video else special.im_start
    B, D, G = len(prompts), model.code_depth, model.grid_size

    cond = [_as_prompt(model, list(p) + [start]) for p in prompts]
    uncond_ids = [special.bos] if unconditional is None else list(unconditional)
    uncond = [_as_prompt(model, uncond_ids + [start])] * B if use_cfg else []
    streams = _Streams(model, cond + uncond)

    positions = num_frames * G * G
    codes = torch.zeros(B, positions, D, dtype=torch.long, device=streams.hidden.device)
    all_logits = []
    for t in range(positions):
        h = streams.hidden
        step_logits = []
        for d in range(D):
            # Vectors of the depths sampled so far (lookup needs all D; only the first d are used).
            prefix = model.code_vectors(codes[:, t])[:, :d]
            if use_cfg:
                logits = model.depth(h, torch.cat([prefix, prefix]))[:, d].float()
                c, u = logits.chunk(2)
                logits = cfg_logits(c, u, scale)
            else:
                logits = model.depth(h, prefix)[:, d].float()
            codes[:, t, d] = sample(logits, temperature, top_k, top_p, generator)
            step_logits.append(logits)
        if return_logits:
            all_logits.append(torch.stack(step_logits, dim=1))
        if t + 1 < positions:
            embeds = model.visual_embeddings(codes[:, t])
            streams.step(torch.cat([embeds, embeds]) if use_cfg else embeds)

    grid = codes.view(B, num_frames, G, G, D)
    images: list = []
    if decode:
        pixels = model.tower.decode_codes(grid.reshape(B * num_frames, G, G, D))
        frames = _to_pil(pixels)
        images = [frames[i * num_frames : (i + 1) * num_frames] for i in range(B)] if video else frames
    return ImageGeneration(grid if video else grid[:, 0], images, all_logits if return_logits else None)


@torch.no_grad()
def generate_video(model, prompts: Sequence[Sequence[int]], num_frames: int | None = None, **kwargs) -> ImageGeneration:
    """`generate_images` with the config's frames per video (8): codes [B, T, H, W, D], T PIL frames each."""
    return generate_images(model, prompts, num_frames=num_frames or model.config.frames_per_video, **kwargs)


def _to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[N, 3, S, S] in [0, 1] -> N RGB images."""
    array = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]
