"""The unified multimodal LLM of VILA-U: a transformers causal LM that reads and writes visual codes.

    text position:    input = token embedding;              next text token <- lm_head(h_t)
    visual position:  input = projector(sum_d e(code_d));   next position's D codes <- depth transformer(h_t)

e(.) are the frozen vision tower's code vectors (`tower.quantizer.lookup`), so the LLM sees the same
feature the tower's decoder turns into pixels. The projector is the LLaVA "mlp2x_gelu". The hidden state
at position t predicts position t+1: a text token through the LM head, or the D residual codes of a
visual position through the depth transformer. Loss = CE_text + CE_image (1:1), each a mean over the
supervised targets of the whole batch (image: over all positions x depths), so that a packed batch and
the same samples unpacked give the same loss (`LMConfig.visual_change_weight` > 1 weighs up the cells
whose depth-0 code changes: the image term is then a weighted sum over the same count). The depth-head
CE runs in chunks of positions (`LMConfig.depth_loss_chunk_logits`), so its [positions x D x codebook]
logits are never all in memory.

Batches are packed rows (the format documented in `vilau_model.sequence`), attention confined to each
sample by a block-diagonal causal rule built from `segment_ids`: a dense [B,1,L,L] mask, a FlexAttention
block mask, or flash-attn's varlen boundaries, as `LMConfig.attention` says (`vilau_model.packed_attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from vilau_model.config import LMConfig
from vilau_model.depth_transformer import DepthTransformer
from vilau_model.packed_attention import llm_attn_implementation, segment_block_mask
from vilau_model.sequence import IGNORE_INDEX
from vilau_model.tokenizer import SpecialIds


def build_llm(config: LMConfig, vocab_size: int) -> PreTrainedModel:
    """The causal LM with `vocab_size` rows (markers included).

    With `config.pretrained_path` the weights come from a local directory (LLaMA-2-7B in the paper) and
    the embeddings are resized for the markers (new rows start at the mean of the old ones); otherwise a
    random-init LLaMA of the preset's shapes (this also works under `torch.device("meta")`).
    """
    # RoPE scaling stretches the pretrained context (LLaMA-2: 4096) to the training row length (8192).
    rope = {"rope_scaling": config.rope_scaling} if config.rope_scaling else {}
    attn_implementation = llm_attn_implementation(config.attention, config.attn_implementation)
    if config.pretrained_path and torch.empty(0).device.type == "meta":
        # Meta-device build (sharded training): the pretrained shapes only; the caller loads the weights.
        pretrained = AutoConfig.from_pretrained(config.pretrained_path, local_files_only=True)
        pretrained.vocab_size = vocab_size
        for key, value in rope.items():
            setattr(pretrained, key, value)
        # fp32 master weights whatever the checkpoint's torch_dtype (LLaMA-2 and VILA-U say float16/bfloat16):
        # from_config would otherwise build in that dtype, unlike from_pretrained below
        return AutoModelForCausalLM.from_config(pretrained, attn_implementation=attn_implementation,
                                                dtype=torch.float32)
    if config.pretrained_path:
        llm = AutoModelForCausalLM.from_pretrained(
            config.pretrained_path, local_files_only=True, attn_implementation=attn_implementation, **rope
        )
        if llm.get_input_embeddings().weight.shape[0] != vocab_size:
            llm.resize_token_embeddings(vocab_size, mean_resizing=True)
        return llm
    llama = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        attn_implementation=attn_implementation,
        **rope,
    )
    return LlamaForCausalLM(llama)


def segment_attention_mask(segment_ids: torch.Tensor, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Block-diagonal causal mask [B, 1, L, L]: query i may see key j iff j <= i and same segment.

    Boolean (True = attend) by default, as SDPA takes it; with `additive_dtype`, the additive form
    (0 = attend, dtype min = blocked) for eager attention. Padding (segment 0) attends within itself, so
    no row is fully masked (no NaN) and no sample ever sees it.
    """
    L = segment_ids.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    allowed = allowed[:, None]
    if additive_dtype is None:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=additive_dtype, device=segment_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(additive_dtype).min)


class UnifiedLM(nn.Module):
    """LLM + projector + depth transformer over a frozen vision tower.

    tower: the stage-1 `UnifiedVisionTower` (frozen here; its codebook embeds the codes, its decoder
        renders generated codes). It is a submodule so that `.to(device)` and checkpoints carry it.
    special: token ids (see `SpecialIds.from_tokenizer`); by default LLaMA-2's with the markers appended
        after `config.vocab_size`.
    """

    def __init__(self, config: LMConfig, tower: nn.Module, special: SpecialIds | None = None):
        super().__init__()
        self.config = config
        self.special = special or SpecialIds.llama(config.vocab_size)
        self.tower = tower
        self.tower.requires_grad_(False)
        self.tower.eval()
        tcfg = tower.config
        self.code_depth = tcfg.code_depth
        self.codebook_size = tcfg.codebook_size
        self.grid_size = tcfg.grid_size

        self.llm = build_llm(config, self.special.vocab_size)
        hidden = self.llm.config.hidden_size
        self.projector = nn.Sequential(nn.Linear(tcfg.width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.depth = DepthTransformer(
            llm_hidden_size=hidden,
            code_width=tcfg.width,
            code_depth=tcfg.code_depth,
            codebook_size=tcfg.codebook_size,
            hidden_size=config.depth_hidden_size,
            layers=config.depth_layers,
            heads=config.depth_heads,
        )

    def train(self, mode: bool = True) -> UnifiedLM:
        super().train(mode)
        self.tower.eval()  # frozen in stage 2: never in training mode (no EMA updates, no dropout)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- embeddings -------------------------------------------------------------------------------------

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """The tower's per-depth code vectors: LongTensor[..., D] -> [..., D, width] (no gradient)."""
        with torch.no_grad():
            return self.tower.quantizer.lookup(codes.long())

    def code_sum(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum of the D code vectors in fp32, whatever the codebook's dtype: in bf16 the deepest residuals
        vanish in the rounding. Summed as the quantizer sums them (cumsum over depth), so with an fp32
        codebook training, export and generation see bitwise the same input. [..., D] -> [..., width]."""
        with torch.no_grad():
            return self.code_vectors(codes).float().cumsum(dim=-2)[..., -1, :]

    def visual_embeddings(self, codes: torch.Tensor) -> torch.Tensor:
        """LLM input embedding of visual positions: projector(sum of the D code vectors). [..., D] -> [..., hidden]."""
        return self.projector(self.code_sum(codes).to(self.projector[0].weight.dtype))

    def embed(self, input_ids: torch.Tensor, codes: torch.Tensor, is_visual: torch.Tensor) -> torch.Tensor:
        embeds = self.llm.get_input_embeddings()(input_ids.long())
        # The projector runs even on no visual position (an empty batch): under FSDP2 every rank must go
        # through the same modules, or one rank joins a collective the others skip.
        visual = self.visual_embeddings(codes[is_visual]).to(embeds.dtype)
        return embeds.index_put((is_visual,), visual)

    def boundaries_from_positions(self) -> bool:
        """True when the attention backend takes sample boundaries from the restarting position_ids
        instead of a dense mask: flash attention's varlen kernel (cu_seqlens), no L x L mask in memory."""
        impl = self.llm.config._attn_implementation or ""
        return impl.startswith("flash_attention")

    def attention_mask(self, segment_ids: torch.Tensor, dtype: torch.dtype):
        """The block-diagonal causal mask for the backend: a FlexAttention BlockMask (model.attention=flex,
        no [L, L] tensor), else dense: boolean for SDPA, additive for eager."""
        if self.config.attention == "flex":
            return segment_block_mask(segment_ids)
        if self.llm.config._attn_implementation == "eager":
            return segment_attention_mask(segment_ids, dtype)
        return segment_attention_mask(segment_ids)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        codes: torch.Tensor,
        is_visual: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last LLM hidden states [B, L, hidden] of packed rows, attention confined to each segment."""
        B, L = input_ids.shape
        if segment_ids is None:
            segment_ids = torch.ones(B, L, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = torch.arange(L, device=input_ids.device).expand(B, L)
        embeds = self.embed(input_ids, codes, is_visual.bool())
        decoder = self.llm.get_decoder()
        if self.boundaries_from_positions():
            # transformers only runs the varlen path for a batch of one: lay the rows end to end. Every
            # row starts a sample (or padding) at position 0, so no sample spans two rows.
            return decoder(
                inputs_embeds=embeds.reshape(1, B * L, -1),
                attention_mask=None,
                position_ids=position_ids.long().reshape(1, B * L),
                use_cache=False,
            ).last_hidden_state.reshape(B, L, -1)
        return decoder(
            inputs_embeds=embeds,
            attention_mask=self.attention_mask(segment_ids, embeds.dtype),
            position_ids=position_ids.long(),
            use_cache=False,
        ).last_hidden_state

    # -- training ---------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        codes: torch.Tensor,
        is_visual: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss on a batch of packed rows [B, L] (columns as in `vilau_model.sequence.ROW_SCHEMA`).

        Returns loss = loss_text + loss_image, both parts, and for exact cross-worker averaging the sums
        and counts: sum_text / num_text (next-token targets), sum_image / num_image (visual positions; the
        image mean divides by num_image * D).
        """
        B, L = input_ids.shape
        if segment_ids is None:  # one sample per row, no padding
            segment_ids = torch.ones(B, L, dtype=torch.long, device=input_ids.device)
        is_visual = is_visual.bool()
        labels = labels.long()
        hidden = self.hidden_states(input_ids, codes, is_visual, position_ids, segment_ids)

        # h_t predicts position t+1; never across a sample boundary.
        h = hidden[:, :-1]
        target = labels[:, 1:]
        valid = (target != IGNORE_INDEX) & (segment_ids[:, 1:] == segment_ids[:, :-1])
        text_sel = valid & ~is_visual[:, 1:]
        image_sel = valid & is_visual[:, 1:]

        text_logits = self.llm.get_output_embeddings()(h[text_sel]).float()
        sum_text = F.cross_entropy(text_logits, target[text_sel], reduction="sum")

        # Depth-head CE in chunks of positions (never all [N, D, K] logits at once); it runs, like the LM
        # head, also when N = 0, so every rank goes through the same FSDP modules.
        target_codes = codes[:, 1:][image_sel].long()  # [N, D]
        # One call of the depth module for all chunks: under FSDP its parameters are gathered once.
        sum_image = self.depth(
            h[image_sel], target_codes=target_codes, code_vectors=self.code_vectors,
            max_logits_per_chunk=self.config.depth_loss_chunk_logits,
            weights=self.visual_position_weights(codes, is_visual, image_sel),
        )

        num_text = text_sel.sum()
        num_image = image_sel.sum()
        loss_text = sum_text / num_text.clamp(min=1)
        loss_image = sum_image / (num_image * self.code_depth).clamp(min=1)
        return {
            "loss": loss_text + loss_image,
            "loss_text": loss_text,
            "loss_image": loss_image,
            "sum_text": sum_text,
            "sum_image": sum_image,
            "num_text": num_text,
            "num_image": num_image,
        }

    def visual_position_weights(self, codes: torch.Tensor, is_visual: torch.Tensor, image_sel: torch.Tensor):
        """Per supervised visual position (the order of `codes[:, 1:][image_sel]`): `visual_change_weight`
        where the depth-0 code differs from the previous position's (a block's first cell, whose
        predecessor is the start marker, counts as a change), 1 elsewhere; None when the weight is 1."""
        w = self.config.visual_change_weight
        if w == 1.0:
            return None
        change = (codes[:, 1:, 0] != codes[:, :-1, 0]) | ~is_visual[:, :-1]
        return torch.where(change[image_sel], w, 1.0).to(torch.float32)

    # -- generation (vilau_model.generation) -----------------------------------------------------------

    def generate_text(self, *args, **kwargs):
        from vilau_model.generation import generate_text

        return generate_text(self, *args, **kwargs)

    def generate_images(self, *args, **kwargs):
        from vilau_model.generation import generate_images

        return generate_images(self, *args, **kwargs)

    def generate_video(self, *args, **kwargs):
        from vilau_model.generation import generate_video

        return generate_video(self, *args, **kwargs)
