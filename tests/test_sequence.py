"""Sequence layout and loss masks, one hand-checked example per sample kind.

Sequences are rendered as strings to check them by eye: markers by name, each visual position as `#`,
text decoded, and every supervised run wrapped in `{...}`.
"""

from __future__ import annotations

import numpy as np
import pytest

from transformers import PreTrainedTokenizerFast

from vilau_model.sequence import (
    IGNORE_INDEX,
    CaptionSample,
    ConversationSample,
    GenerationSample,
    InterleavedSample,
    SequenceBuilder,
    Turn,
    VideoCaptionSample,
    VideoSample,
)
from vilau_model.tokenizer import MARKERS, SpecialIds, load_tokenizer, train_bpe_tokenizer

D = 2  # code depth of the hand-made codes

CORPUS = [
    "a photo of a red circle at the top left",
    "a blue square moving right",
    "the cat sat on the mat. a dog ran in the park. it was sunny.",
    "USER: what is in the image? ASSISTANT: a red circle. USER: where is it? ASSISTANT: at the top left",
] * 20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(CORPUS, tmp_path_factory.mktemp("tok"), vocab_size=300)


def grid(h: int, w: int, start: int = 0) -> np.ndarray:
    """Distinct codes [h, w, D] so that their placement can be checked."""
    return (np.arange(h * w * D).reshape(h, w, D) + start).astype(np.int64)


def render(tok, seq) -> str:
    ids = SpecialIds.from_tokenizer(tok)
    names = {ids.bos: "<s>", ids.eos: "</s>", ids.im_start: "<im_start>", ids.im_end: "<im_end>",
             ids.vi_start: "<vi_start>", ids.vi_end: "<vi_end>"}
    out, text, supervised = [], [], False

    def flush():
        if text:
            out.append(tok.decode(text))
            text.clear()

    for i in range(len(seq)):
        sup = seq.labels[i] != IGNORE_INDEX
        if sup != supervised:
            flush()
            out.append("{" if sup else "}")
            supervised = sup
        t = int(seq.input_ids[i])
        if seq.is_visual[i]:
            flush()
            out.append("#")
        elif t in names:
            flush()
            out.append(names[t])
        else:
            text.append(t)
    flush()
    if supervised:
        out.append("}")
    return "".join(out)


def check_invariants(seq, ids: SpecialIds):
    # labels = input_ids where supervised; codes only at visual positions
    sup = seq.labels != IGNORE_INDEX
    assert (seq.labels[sup] == seq.input_ids[sup]).all()
    assert (seq.codes[~seq.is_visual] == 0).all()
    assert (seq.input_ids[seq.is_visual] == ids.visual).all()
    assert seq.input_ids.dtype == np.int32 and seq.labels.dtype == np.int32
    assert seq.codes.dtype == np.int16 and seq.codes.shape == (len(seq), D)
    assert seq.input_ids[0] == ids.bos and seq.labels[0] == IGNORE_INDEX


def test_tokenizer_roundtrip_and_markers(tokenizer, tmp_path):
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    ids = SpecialIds.from_tokenizer(tokenizer)
    # markers are single, never-split tokens at the end of the vocabulary
    assert [ids.im_start, ids.im_end, ids.vi_start, ids.vi_end] == list(range(len(tokenizer) - 4, len(tokenizer)))
    text = "a red circle <im_start><im_end>"
    assert tokenizer(text, add_special_tokens=False).input_ids[-2:] == [ids.im_start, ids.im_end]
    tokenizer.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again("a red circle").input_ids == tokenizer("a red circle").input_ids
    assert SpecialIds.from_tokenizer(again) == ids
    assert all(m in again.get_vocab() for m in MARKERS)


def test_caption_pair_supervises_text_only(tokenizer):
    b = SequenceBuilder(tokenizer, code_depth=D)
    codes = grid(2, 2)
    seq = b.build(CaptionSample(codes=codes, text="a red circle"))
    assert render(tokenizer, seq) == "<s><im_start>####<im_end>{a red circle</s>}"
    check_invariants(seq, b.ids)
    # codes land row-major on the visual positions
    assert (seq.codes[seq.is_visual] == codes.reshape(-1, D)).all()
    assert list(np.flatnonzero(seq.is_visual)) == [2, 3, 4, 5]
    text = tokenizer("a red circle", add_special_tokens=False).input_ids
    expected_labels = [IGNORE_INDEX] * 7 + text + [b.ids.eos]
    assert seq.labels.tolist() == expected_labels


def test_generation_pair_supervises_image_block_and_eos(tokenizer):
    b = SequenceBuilder(tokenizer, code_depth=D)
    seq = b.build(GenerationSample(text="a red circle", codes=grid(2, 2)))
    assert render(tokenizer, seq) == "<s>a red circle{<im_start>####<im_end></s>}"
    check_invariants(seq, b.ids)
    n_text = len(tokenizer("a red circle", add_special_tokens=False).input_ids)
    i = b.ids
    assert seq.labels.tolist() == [IGNORE_INDEX] * (1 + n_text) + [i.im_start] + [i.visual] * 4 + [i.im_end, i.eos]


def test_video_is_one_block_of_eight_frames(tokenizer):
    b = SequenceBuilder(tokenizer, code_depth=D)
    frames = np.stack([grid(1, 2, start=10 * t) for t in range(8)])  # [8, 1, 2, D]
    seq = b.build(VideoSample(text="a blue square moving right", codes=frames))
    assert render(tokenizer, seq) == "<s>a blue square moving right{<vi_start>" + "#" * 16 + "<vi_end></s>}"
    check_invariants(seq, b.ids)
    assert (seq.codes[seq.is_visual] == frames.reshape(-1, D)).all()  # frame after frame
    with pytest.raises(ValueError, match="8 frames"):
        b.build(VideoSample(text="x", codes=frames[:4]))


def test_video_understanding_supervises_the_caption_only(tokenizer):
    b = SequenceBuilder(tokenizer, code_depth=D)
    frames = np.stack([grid(1, 2, start=10 * t) for t in range(8)])
    seq = b.build(VideoCaptionSample(codes=frames, text="a blue square moving right"))
    assert render(tokenizer, seq) == "<s><vi_start>" + "#" * 16 + "<vi_end>{a blue square moving right</s>}"
    check_invariants(seq, b.ids)
    assert (seq.codes[seq.is_visual] == frames.reshape(-1, D)).all()
    # the captioning prompt of a clip is the same layout cut before the caption
    prompt = b.understanding_prompt(frames)
    assert prompt.input_ids.tolist() == seq.input_ids[: len(prompt)].tolist()
    with pytest.raises(ValueError, match="8 frames"):
        b.build(VideoCaptionSample(codes=frames[:4], text="x"))


def test_question_prompt_is_the_trained_conversation_cut_before_the_answer(tokenizer):
    b = SequenceBuilder(tokenizer, code_depth=D, system_prompt="SYS")
    codes = grid(2, 2)
    prompt = b.question_prompt(codes, "what is in the image?")
    assert render(tokenizer, prompt) == "<s>SYS USER: <im_start>####<im_end>\nwhat is in the image? ASSISTANT:"
    trained = b.build(ConversationSample([Turn("human", "<image>\nwhat is in the image?"), Turn("gpt", "a red circle.")], codes))
    n = len(prompt)
    # same ids, codes and visual mask as the trained sample up to the answer, whose first token is supervised next
    assert prompt.input_ids.tolist() == trained.input_ids[:n].tolist()
    assert (prompt.codes == trained.codes[:n]).all() and (prompt.is_visual == trained.is_visual[:n]).all()
    assert (trained.labels[:n] == IGNORE_INDEX).all() and trained.labels[n] != IGNORE_INDEX


def test_interleaved_doc_places_images_before_their_sentence_at_most_six(tokenizer):
    b = SequenceBuilder(tokenizer, code_depth=D)
    sentences = ["the cat sat on the mat.", "a dog ran in the park.", "it was sunny."]
    # 8 one-cell images; image k is matched to sentence image_sentence[k]
    images = [grid(1, 1, start=100 * k) for k in range(8)]
    image_sentence = [1, 0, 2, 1, 0, 2, 2, 1]
    seq = b.build(InterleavedSample(sentences, images, image_sentence))
    img = "<im_start>#<im_end>"
    # sentence 0 gets images 1, 4; sentence 1 gets 0, 3, 7; sentence 2 gets 2, 5, 6 -> only the first 6 in
    # document order are kept: 1, 4, 0, 3, 7, 2 (5 and 6 left out)
    assert render(tokenizer, seq) == (
        "<s>" + img * 2 + "{the cat sat on the mat.}" + img * 3 + "{ a dog ran in the park.}" + img
        + "{ it was sunny.</s>}"
    )
    check_invariants(seq, b.ids)
    kept = [1, 4, 0, 3, 7, 2]
    assert (seq.codes[seq.is_visual] == np.stack([images[k][0, 0] for k in kept])).all()
    assert b.stats["images_left_out"] == 2


def test_conversation_supervises_assistant_turns_only(tokenizer, sharegpt_two_turns):
    b = SequenceBuilder(tokenizer, code_depth=D, system_prompt="SYS")
    sample = ConversationSample.from_sharegpt(sharegpt_two_turns, codes=grid(2, 2))
    seq = b.build(sample)
    assert render(tokenizer, seq) == (
        "<s>SYS USER: <im_start>####<im_end>\nwhat is in the image? ASSISTANT:{ a red circle.</s>}"
        "USER: where is it? ASSISTANT:{ at the top left</s>}"
    )
    check_invariants(seq, b.ids)
    # no placeholder: the image goes first in the first user turn (LLaVA convention)
    seq2 = b.build(ConversationSample([sample.turns[0].__class__("human", "what is in the image?"),
                                       sample.turns[1]], codes=grid(2, 2)))
    assert render(tokenizer, seq2).startswith("<s>SYS USER: <im_start>####<im_end>\nwhat is")


def test_overlong_samples_cut_only_in_text(tokenizer):
    # caption: the text is cut, the image block stays whole; no EOS after a cut
    b = SequenceBuilder(tokenizer, code_depth=D, max_len=12)
    seq = b.build(CaptionSample(codes=grid(2, 2), text="a photo of a red circle at the top left"))
    assert len(seq) == 12
    assert render(tokenizer, seq).startswith("<s><im_start>####<im_end>{")
    assert b.ids.eos not in seq.input_ids.tolist()
    assert b.stats["truncated"] == 1

    # generation: the image block does not fit -> dropped and counted, never cut inside
    b = SequenceBuilder(tokenizer, code_depth=D, max_len=8)
    assert b.build(GenerationSample(text="a red circle", codes=grid(2, 2))) is None
    assert b.stats["dropped_too_long"] == 1

    # interleaved: the cut falls inside the second image block -> that block and what follows are left
    # out, the first sentence stays
    n0 = len(tokenizer("the cat sat on the mat.", add_special_tokens=False).input_ids)
    b = SequenceBuilder(tokenizer, code_depth=D, max_len=1 + 3 + n0 + 2)  # BOS, image, sentence, 2 of 3
    seq = b.build(InterleavedSample(["the cat sat on the mat.", "it was sunny."], [grid(1, 1), grid(1, 1)], [0, 1]))
    assert render(tokenizer, seq) == "<s><im_start>#<im_end>{the cat sat on the mat.}"
    assert (seq.input_ids == b.ids.im_start).sum() == (seq.input_ids == b.ids.im_end).sum() == 1


def test_caption_dropout_empties_the_prompt(tokenizer):
    always = SequenceBuilder(tokenizer, code_depth=D, caption_dropout=1.0, seed=0)
    seq = always.build(GenerationSample(text="a red circle", codes=grid(2, 2)))
    assert render(tokenizer, seq) == "<s>{<im_start>####<im_end></s>}"
    assert always.stats["captions_dropped"] == 1

    half = SequenceBuilder(tokenizer, code_depth=D, caption_dropout=0.5, seed=0)
    lengths = [len(half.build(GenerationSample(text="a red circle", codes=grid(2, 2)))) for _ in range(200)]
    dropped = sum(n == 8 for n in lengths)
    assert 60 < dropped < 140 and dropped == half.stats["captions_dropped"]

    never = SequenceBuilder(tokenizer, code_depth=D)
    assert render(tokenizer, never.build(GenerationSample(text="a red circle", codes=grid(2, 2)))).startswith("<s>a red")


def test_prompts_for_generation_and_understanding(tokenizer):
    b = SequenceBuilder(tokenizer, code_depth=D)
    assert b.generation_prompt("a red circle") == [b.ids.bos] + tokenizer("a red circle", add_special_tokens=False).input_ids
    assert b.generation_prompt("") == [b.ids.bos]  # the unconditional prompt
    p = b.understanding_prompt(grid(2, 2), "what is in the image?")
    assert render(tokenizer, p) == "<s><im_start>####<im_end>what is in the image?"


def test_default_caption_dropout_trains_the_unconditional_prompt_of_cfg(tokenizer):
    from vilau_model.config import get_lm_config

    rate = get_lm_config("tiny").caption_dropout
    assert rate == 0.1  # the training default (lm_train.caption_dropout follows it)
    b = SequenceBuilder(tokenizer, code_depth=D, caption_dropout=rate, seed=1)
    seqs = [b.build(GenerationSample(text="a red circle", codes=grid(2, 2))) for _ in range(400)]
    unconditional = [s for s in seqs if s.input_ids[1] == b.ids.im_start]
    assert len(unconditional) == b.stats["captions_dropped"] and 20 <= len(unconditional) <= 65
    # what the model learns without a caption is exactly the unconditional stream that generation runs
    # under classifier-free guidance: [BOS, <im_start>] then the codes
    for s in unconditional:
        assert s.input_ids[:2].tolist() == b.generation_prompt("") + [b.ids.im_start]
        assert render(tokenizer, s) == "<s>{<im_start>####<im_end></s>}"
