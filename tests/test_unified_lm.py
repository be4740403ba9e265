"""The unified LM: vocabulary and embeddings, depth transformer, presets, and learning on synthetic data."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from orchestration.data.scenes import render_clip, render_scene
from vilau_model.config import get_lm_config, get_tower_config
from vilau_model.depth_transformer import DepthTransformer
from vilau_model.sequence import (
    CaptionSample,
    GenerationSample,
    SequenceBuilder,
    VideoSample,
    collate_rows,
    pack_sequences,
)
from vilau_model.tokenizer import MARKERS, SpecialIds, load_tokenizer, train_bpe_tokenizer
from vilau_model.unified_lm import UnifiedLM

LLAMA2_7B_PARAMETERS = 6_738_415_616  # LLaMA-2-7B as published (vocabulary 32000)


pytestmark = pytest.mark.usefixtures("one_thread")


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> float [N, 3, S, S] in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def synthetic(tiny_tower, tmp_path_factory):
    """Scenes and clips at the tower's size, their codes from the (random-init) tower, and a tokenizer."""
    rng = np.random.default_rng(0)
    size = tiny_tower.config.image_size
    scenes = [render_scene(rng, size=size) for _ in range(96)]
    clips = [render_clip(rng, num_frames=8, size=size) for _ in range(8)]
    image_codes = tiny_tower.encode_codes(to_pixels(np.stack([s[0] for s in scenes]))).numpy()
    clip_codes = tiny_tower.encode_codes(to_pixels(np.concatenate([c[0] for c in clips]))).numpy()
    clip_codes = clip_codes.reshape(len(clips), 8, *clip_codes.shape[1:])
    captions = [s[1] for s in scenes] + [c[1] for c in clips]
    tok = train_bpe_tokenizer(captions, tmp_path_factory.mktemp("tok"), vocab_size=400)
    return {"scenes": scenes, "clips": clips, "image_codes": image_codes, "clip_codes": clip_codes, "tokenizer": tok}


def test_vocabulary_markers_and_visual_embedding(tiny_tower, synthetic):
    tok = synthetic["tokenizer"]
    ids = SpecialIds.from_tokenizer(tok)
    model = UnifiedLM(get_lm_config("tiny"), tiny_tower, ids)
    # the embedding table covers the text vocabulary plus the four markers
    assert model.llm.get_input_embeddings().weight.shape == (len(tok), 64)
    assert model.llm.get_output_embeddings().weight.shape[0] == len(tok)
    assert all(tok.convert_tokens_to_ids(m) < len(tok) for m in MARKERS)
    # a visual position's input = projector(sum of the D code vectors of the tower)
    codes = torch.from_numpy(synthetic["image_codes"][:2])  # [2, 8, 8, 4]
    expected = model.projector(tiny_tower.quantizer.lookup(codes).sum(dim=-2))
    torch.testing.assert_close(model.visual_embeddings(codes), expected, rtol=1e-5, atol=1e-6)
    # the tower is frozen and stays in eval mode
    model.train()
    assert not tiny_tower.training and not any(p.requires_grad for p in tiny_tower.parameters())
    trainable = {id(p) for p in model.trainable_parameters()}
    assert all(id(p) in trainable for p in model.projector.parameters())
    assert all(id(p) in trainable for p in model.depth.parameters())


def test_depth_transformer_is_causal_over_depth():
    torch.manual_seed(0)
    depth = DepthTransformer(llm_hidden_size=16, code_width=8, code_depth=4, codebook_size=32,
                             hidden_size=32, layers=2, heads=4).eval()
    h = torch.randn(5, 16)
    vectors = torch.randn(5, 3, 8)  # depths 0..2 known
    logits = depth(h, vectors)
    assert logits.shape == (5, 4, 32)
    # changing the code of depth 1 changes the predictions of depths 2 and 3 only
    changed = vectors.clone()
    changed[:, 1] += 1.0
    other = depth(h, changed)
    torch.testing.assert_close(logits[:, :2], other[:, :2])
    assert (logits[:, 2:] - other[:, 2:]).abs().max() > 1e-3
    # a shorter prefix gives the same logits for the depths it covers (what generation relies on)
    torch.testing.assert_close(depth(h, vectors[:, :1]), logits[:, :2], rtol=1e-5, atol=1e-6)


def test_vilau_7b_builds_on_meta_with_llama2_shapes():
    from vilau_model.vision_tower import UnifiedVisionTower

    config = get_lm_config("vilau-7b")
    with torch.device("meta"):
        tower = UnifiedVisionTower(get_tower_config("vilau-256"))
        model = UnifiedLM(config, tower)  # LLaMA-2 ids, markers appended
    assert model.special.vocab_size == 32004 and model.special.im_start == 32000
    llm = sum(p.numel() for p in model.llm.parameters())
    assert llm == LLAMA2_7B_PARAMETERS + 2 * len(MARKERS) * 4096  # input and output rows for the markers
    projector = (1024 * 4096 + 4096) + (4096 * 4096 + 4096)
    assert sum(p.numel() for p in model.projector.parameters()) == projector
    h, w, d, k = config.depth_hidden_size, 1024, 4, 16384
    block = 2 * 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * 4 * h + 4 * h) + (4 * h * h + h)
    depth = (4096 * h + h) + (w * h + h) + d * h + config.depth_layers * block + 2 * h + (h * k + k)
    assert sum(p.numel() for p in model.depth.parameters()) == depth
    assert sum(p.numel() for p in model.trainable_parameters()) == llm + projector + depth
    assert all(p.is_meta for p in model.parameters())


def test_pretrained_llm_and_tokenizer_load_from_a_local_path(tiny_tower, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    # A stand-in for the LLaMA-2 directory: a small causal LM and a tokenizer without markers, saved.
    tok = train_bpe_tokenizer(["a red circle", "a blue square"] * 10, tmp_path / "tok", vocab_size=300)
    plain = len(tok) - len(MARKERS)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=plain, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")

    config = dataclasses.replace(get_lm_config("tiny"), pretrained_path=str(tmp_path / "llm"))
    loaded_tok = load_tokenizer(config.pretrained_path)
    model = UnifiedLM(config, tiny_tower, SpecialIds.from_tokenizer(loaded_tok))
    weight = model.llm.get_input_embeddings().weight
    assert weight.shape[0] == len(loaded_tok)
    torch.testing.assert_close(weight[:plain], llm.get_input_embeddings().weight)  # loaded, not re-initialised


def test_model_package_imports_no_orchestration_ray_or_mlflow():
    code = (
        "import sys, vilau_model.unified_lm, vilau_model.sequence, vilau_model.generation, vilau_model.tokenizer; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'orchestration')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tiny_lm_learns_text_and_images_on_synthetic_data(tiny_tower, synthetic):
    """~200 CPU steps on caption, generation and video samples: both losses fall clearly."""
    tok = synthetic["tokenizer"]
    builder = SequenceBuilder(tok, code_depth=tiny_tower.config.code_depth, max_len=1024)
    seqs = []
    for (_, caption, _), codes in zip(synthetic["scenes"], synthetic["image_codes"]):
        seqs.append(builder.build(CaptionSample(codes, caption)))
        seqs.append(builder.build(GenerationSample(caption, codes)))
    videos = [builder.build(VideoSample(c[1], codes)) for c, codes in zip(synthetic["clips"], synthetic["clip_codes"])]

    torch.manual_seed(0)
    model = UnifiedLM(get_lm_config("tiny"), tiny_tower, builder.ids)
    optim = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(0)
    history, start = [], time.perf_counter()
    for step in range(200):
        batch = [seqs[i] for i in rng.choice(len(seqs), size=6, replace=False)]
        if step % 5 == 0:
            batch.append(videos[step // 5 % len(videos)])
        rows = pack_sequences(batch, seq_len=1024, code_depth=4, pad_id=builder.ids.pad)
        out = model(**collate_rows(rows))
        optim.zero_grad()
        out["loss"].backward()
        optim.step()
        history.append((out["loss_text"].item(), out["loss_image"].item()))
    elapsed = time.perf_counter() - start

    text, image = np.array(history).T
    first_text, last_text = text[:10].mean(), text[-20:].mean()
    first_image, last_image = image[:10].mean(), image[-20:].mean()
    print(f"200 steps in {elapsed:.1f}s: text {first_text:.3f} -> {last_text:.3f}, image {first_image:.3f} -> {last_image:.3f}")
    assert last_text < 0.4 * first_text
    assert last_image < 0.75 * first_image


def test_visual_change_weight_weighs_cells_whose_depth0_code_changes(tiny_tower, synthetic):
    """visual_change_weight w: the image loss sums w x CE at cells whose depth-0 code differs from the
    previous cell's (each block's first cell included) and 1 x CE elsewhere, over the same count."""

    import torch.nn.functional as F

    tok = synthetic["tokenizer"]
    builder = SequenceBuilder(tok, code_depth=tiny_tower.config.code_depth, max_len=1024)
    seqs = [builder.build(GenerationSample(s[1], c)) for s, c in zip(synthetic["scenes"][:3], synthetic["image_codes"][:3])]
    batch = collate_rows(pack_sequences(seqs, seq_len=1024, code_depth=4, pad_id=builder.ids.pad))
    torch.manual_seed(0)
    model = UnifiedLM(get_lm_config("tiny", visual_change_weight=1.0), tiny_tower, builder.ids).eval()
    with torch.no_grad():
        plain = model(**batch)
        model.config = dataclasses.replace(model.config, visual_change_weight=5.0)
        weighted = model(**batch)
        # reference: per-cell CE from the hidden states, change cells found one by one
        hidden = model.hidden_states(batch["input_ids"], batch["codes"], batch["is_visual"],
                                     batch["position_ids"], batch["segment_ids"])
    codes, visual = batch["codes"][0].numpy(), batch["is_visual"][0].numpy()
    cells = [t for t in range(1, len(visual)) if visual[t]]
    change = [not visual[t - 1] or codes[t, 0] != codes[t - 1, 0] for t in cells]
    assert 3 < sum(change) < len(cells)  # first cells and some more, not all
    target = batch["codes"][0, cells].long()
    logits = model.depth(hidden[0, [t - 1 for t in cells]], model.code_vectors(target)[:, :-1]).float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none").view(len(cells), -1).sum(1)
    factor = torch.tensor([5.0 if c else 1.0 for c in change])
    torch.testing.assert_close(plain["sum_image"], ce.sum(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(weighted["sum_image"], (ce * factor).sum(), rtol=1e-5, atol=1e-4)
    assert weighted["num_image"] == plain["num_image"] == len(cells)
    # off by default at paper scale
    assert get_lm_config("vilau-7b").visual_change_weight == 1.0


def test_visual_inputs_sum_the_code_vectors_in_fp32_whatever_the_codebook_dtype():
    """Stage 2 sums a position's D code vectors in fp32, as export and generation do: a small residual
    survives next to a large first code (in bf16, 1 + 0.001 rounds back to 1)."""
    from orchestration.train.lm import TowerCodebook
    from vilau_model.config import get_lm_config, get_tower_config

    tower = TowerCodebook(get_tower_config("tiny"))
    embed = tower.quantizer.embed
    with torch.no_grad():
        embed.zero_()
        embed[..., 1, :] = 1.0  # code 1: the coarse vector
        embed[..., 2, :] = 1e-3  # code 2: a fine residual
    model = UnifiedLM(get_lm_config("tiny"), tower)
    D = model.code_depth
    codes = torch.tensor([[1] + [2] * (D - 1)])
    exact = 1.0 + (D - 1) * 1e-3
    assert torch.allclose(model.code_sum(codes), torch.full((1, embed.shape[-1]), exact), rtol=1e-6)
    tower.to(torch.bfloat16)  # a bf16 codebook: each vector rounds, the sum still keeps the residuals
    assert model.code_sum(codes).dtype == torch.float32
    assert float(model.code_sum(codes)[0, 0]) == pytest.approx(exact, rel=1e-3)
    assert float(tower.code_embeddings(codes)[0, 0]) == 1.0  # what the bf16 sum gave stage 2 before
    # the depth transformer's prefix sums too
    prefix = model.code_vectors(codes)[:, :-1]
    assert prefix.dtype == torch.bfloat16
    model.depth(torch.zeros(1, model.llm.config.hidden_size), prefix)  # runs: fp32 cumsum, then the layer dtype
