"""Generation: images and video within the codebook and at the tower's size, CFG, sampling filters, and
the KV-cached loops checked against plain full-sequence forwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vilau_model.config import get_lm_config
from vilau_model.generation import cfg_logits, filter_logits
from vilau_model.sequence import BuiltSequence, SequenceBuilder
from vilau_model.tokenizer import train_bpe_tokenizer
from vilau_model.unified_lm import UnifiedLM


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tiny_tower, tmp_path_factory):
    tok = train_bpe_tokenizer(["a photo of a red circle at the top left", "a blue square moving right"] * 10,
                              tmp_path_factory.mktemp("tok"), vocab_size=300)
    builder = SequenceBuilder(tok, code_depth=tiny_tower.config.code_depth)
    model = UnifiedLM(get_lm_config("tiny"), tiny_tower, builder.ids).eval()
    return model, builder


def test_generated_images_are_in_the_codebook_and_at_the_tower_size(setup):
    model, builder = setup
    cfg = model.tower.config
    prompts = [builder.generation_prompt("a photo of a red circle"), builder.generation_prompt("a blue square")]
    out = model.generate_images(prompts, generator=torch.Generator().manual_seed(0))  # s=3, top-k 900, top-p 0.96
    g = cfg.grid_size
    assert out.codes.shape == (2, g, g, cfg.code_depth) and out.codes.dtype == torch.long
    assert 0 <= out.codes.min() and out.codes.max() < cfg.codebook_size
    assert len(out.images) == 2
    for image in out.images:
        assert isinstance(image, Image.Image) and image.size == (cfg.image_size, cfg.image_size) and image.mode == "RGB"
    # the pixels are the tower's decoding of the codes (up to one grey level: batch-size rounding)
    expected = model.tower.decode_codes(out.codes[:1])[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(np.asarray(out.images[0]).astype(np.float32) - expected).max() <= 1.0


def test_generated_video_has_eight_frames(setup):
    model, builder = setup
    cfg = model.tower.config
    out = model.generate_video([builder.generation_prompt("a blue square moving right")],
                               generator=torch.Generator().manual_seed(0))
    g = cfg.grid_size
    assert out.codes.shape == (1, 8, g, g, cfg.code_depth)
    assert 0 <= out.codes.min() and out.codes.max() < cfg.codebook_size
    assert len(out.images) == 1 and len(out.images[0]) == 8
    assert all(f.size == (cfg.image_size, cfg.image_size) for f in out.images[0])


def test_cfg_with_scale_one_equals_the_conditional_logits(setup):
    model, builder = setup
    # prompts of different lengths, so the batched cond + uncond streams are left-padded
    prompts = [builder.generation_prompt("a photo of a red circle at the top left"), builder.generation_prompt("a")]
    kw = dict(temperature=0.0, decode=False, return_logits=True)
    guided = model.generate_images(prompts, cfg_scale=1.0, **kw)
    plain = model.generate_images(prompts, use_cfg=False, **kw)
    torch.testing.assert_close(torch.stack(guided.depth_logits), torch.stack(plain.depth_logits), rtol=1e-4, atol=1e-5)
    assert torch.equal(guided.codes, plain.codes)
    # a larger scale does move the logits
    strong = model.generate_images(prompts, cfg_scale=3.0, **kw)
    assert (strong.depth_logits[0] - plain.depth_logits[0]).abs().max() > 1e-4


def test_image_generation_matches_a_full_forward_over_the_generated_sequence(setup):
    """The KV-cached loop (positions, code embeddings fed back, depth sampling) equals teacher forcing."""
    model, builder = setup
    ids = builder.ids
    prompt = builder.generation_prompt("a blue square")
    out = model.generate_images([prompt], use_cfg=False, temperature=0.0, decode=False, return_logits=True)
    codes = out.codes[0].reshape(-1, model.code_depth)  # [H*W, D]
    n, p = len(codes), len(prompt) + 1
    input_ids = torch.tensor([prompt + [ids.im_start] + [ids.visual] * n])
    all_codes = torch.cat([torch.zeros(p, model.code_depth, dtype=torch.long), codes])[None]
    is_visual = torch.tensor([[False] * p + [True] * n])
    with torch.no_grad():
        h = model.hidden_states(input_ids, all_codes, is_visual)[0]
        # position p-1+t predicts visual position t
        logits = model.depth(h[p - 1 : p - 1 + n], model.code_vectors(codes)[:, :-1])
    torch.testing.assert_close(torch.stack(out.depth_logits)[:, 0], logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits.argmax(-1), codes)


def test_text_generation_matches_greedy_full_forwards(setup):
    model, builder = setup
    codes = np.random.default_rng(0).integers(0, 256, size=(8, 8, 4))
    prompt = builder.understanding_prompt(codes, "a photo of")
    new = model.generate_text([prompt, builder.generation_prompt("a red")], max_new_tokens=6)[0]
    # the same greedy continuation by recomputing the whole sequence each step
    seq, expected = prompt, []
    head = model.llm.get_output_embeddings()
    for _ in range(6):
        with torch.no_grad():
            h = model.hidden_states(torch.from_numpy(seq.input_ids)[None], torch.from_numpy(seq.codes)[None],
                                    torch.from_numpy(seq.is_visual)[None])[0, -1]
        t = int(head(h).argmax())
        if t == builder.ids.eos:
            break
        expected.append(t)
        seq = BuiltSequence(np.append(seq.input_ids, t).astype(np.int32), np.append(seq.labels, t).astype(np.int32),
                            np.concatenate([seq.codes, np.zeros((1, 4), np.int16)]), np.append(seq.is_visual, False))
    assert new == expected and all(0 <= t < len(builder.tokenizer) for t in new)


def test_cfg_and_sampling_filters():
    c, u = torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([[1.0, 1.0, 1.0]])
    assert torch.equal(cfg_logits(c, u, 1.0), c)
    assert torch.equal(cfg_logits(c, u, 0.0), u)
    assert torch.equal(cfg_logits(c, u, 3.0), torch.tensor([[4.0, -2.0, 1.0]]))

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.17, 0.03]]))
    keep = lambda x: torch.isfinite(x)[0].tolist()
    assert keep(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert keep(filter_logits(logits, top_p=0.75)) == [True, True, False, False]  # 0.5 + 0.3 covers 0.75
    assert keep(filter_logits(logits, top_p=0.85)) == [True, True, True, False]
    assert keep(filter_logits(logits, top_p=0.1)) == [True, False, False, False]  # the best always stays
    assert keep(filter_logits(logits, top_k=900, top_p=0.96)) == [True, True, True, False]  # the paper's


def test_sampling_temperature_defaults_to_the_model_config(setup):
    import dataclasses

    model, builder = setup
    prompts = [builder.generation_prompt("a photo of a red circle")]
    explicit = model.generate_images(prompts, temperature=0.0, decode=False, generator=torch.Generator().manual_seed(0))
    config = model.config
    try:
        model.config = dataclasses.replace(config, temperature=0.0)  # greedy from the config alone
        greedy = [model.generate_images(prompts, decode=False, generator=torch.Generator().manual_seed(s)).codes
                  for s in (1, 2)]
    finally:
        model.config = config
    assert torch.equal(greedy[0], explicit.codes) and torch.equal(greedy[1], explicit.codes)


def test_understanding_score_decodes_greedy_answers_to_the_trained_question_layout(setup):
    from orchestration.train.samples import ANSWER_TOKENS, UNDERSTANDING_QUESTION, understanding_score
    from vilau_model.evaluation import answer_accuracy

    model, builder = setup
    size = model.tower.config.image_size
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 3, size, size), dtype=np.uint8)
    names = ["red circle", "blue circle", "red square", "blue square"]
    result = understanding_score(model, builder.tokenizer, pixels, [0, 1, 3], names, batch_size=2)
    # one image at a time, by hand: the tower's codes in the ShareGPT4V template, greedy, decoded
    codes = model.tower.encode_codes(torch.from_numpy(pixels).float() / 255).numpy()
    for i in range(3):
        ids = model.generate_text([builder.question_prompt(codes[i], UNDERSTANDING_QUESTION)], max_new_tokens=ANSWER_TOKENS)[0]
        assert result["answers"][i] == builder.tokenizer.decode(ids, skip_special_tokens=True)
    expected = answer_accuracy(result["answers"], [0, 1, 3], names)
    assert {k: result[k] for k in expected} == expected and result["class_chance"] == 0.25
