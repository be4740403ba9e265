"""Sequences under a LLaMA-style SentencePiece tokenizer: the text ids are the tokenization of the joined
text (no spurious `▁` at the start of answers and sentences), the loss masks as before.

The tokenizers are built offline with the `tokenizers` library in the two layouts LLaMA checkpoints ship:
LLaMA-2's own (normalizer: prepend `▁`, spaces -> `▁`; BPE with byte fallback) and the Metaspace
pre-tokenizer of newer conversions; both are saved and reloaded as transformers `LlamaTokenizerFast`.
"""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaTokenizerFast

from vilau_model.sequence import IGNORE_INDEX, ConversationSample, InterleavedSample, SequenceBuilder
from vilau_model.tokenizer import SpecialIds, load_tokenizer, load_tokenizer_from_files

D = 2
CORPUS = [
    "A chat between a user and an assistant.",
    "USER: what is in the image?\nASSISTANT: a red circle. USER: where is it? ASSISTANT: at the top left",
    "the cat sat on the mat. a dog ran in the park. it was sunny.",
] * 20


def llama_style_tokenizer(layout: str, directory) -> LlamaTokenizerFast:
    spm = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # Training splits at spaces as SentencePiece does; LLaMA-2's layout then encodes without pre-tokenizer.
    spm.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    spm.train_from_iterator(CORPUS, trainer=trainer)
    if layout == "llama2":
        spm.pre_tokenizer = None
        spm.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        spm.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:
        spm.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok = LlamaTokenizerFast(tokenizer_object=spm, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                             legacy=(layout == "llama2"), add_bos_token=True, add_eos_token=False)
    tok.save_pretrained(str(directory))
    return load_tokenizer(directory)


@pytest.fixture(scope="module", params=["llama2", "metaspace"])
def tokenizer(request, tmp_path_factory):
    tok = llama_style_tokenizer(request.param, tmp_path_factory.mktemp(request.param))
    assert type(tok).__name__ == "LlamaTokenizerFast"
    return tok


def text_ids(seq, ids: SpecialIds) -> list[int]:
    """The sequence's token ids without BOS and without the visual blocks (markers included)."""
    markers = {ids.im_start, ids.im_end, ids.vi_start, ids.vi_end}
    keep = ~seq.is_visual & ~np.isin(seq.input_ids, list(markers))
    keep[0] = False  # BOS
    return seq.input_ids[keep].tolist()


def supervised_runs(tok, seq) -> list[str]:
    """Each run of supervised positions as its tokens' text (`▁` shown as a space), visual as `#`."""
    runs, current = [], None
    for i, label in enumerate(seq.labels.tolist()):
        if label == IGNORE_INDEX:
            current = None
            continue
        piece = "#" if seq.is_visual[i] else tok.convert_ids_to_tokens(int(seq.input_ids[i])).replace("▁", " ")
        if current is None:
            runs.append("")
            current = len(runs) - 1
        runs[current] += piece
    return runs


def grid(h, w, start=0):
    return (np.arange(h * w * D).reshape(h, w, D) + start).astype(np.int64)


def test_llama2_layout_has_the_spurious_prefix_when_pieces_are_tokenized_alone(tmp_path):
    tok = llama_style_tokenizer("llama2", tmp_path)
    # The bug the builder avoids: a piece tokenized alone with its leading space starts with a bare `▁`.
    assert tok.convert_ids_to_tokens(tok(" a red circle.", add_special_tokens=False).input_ids)[0] == "▁"
    assert "▁" not in tok.convert_ids_to_tokens(tok("ASSISTANT: a red circle.", add_special_tokens=False).input_ids)


def test_sharegpt4v_ids_are_the_tokenization_of_the_joined_text(tokenizer, sharegpt_two_turns):
    b = SequenceBuilder(tokenizer, code_depth=D, system_prompt="A chat.")
    sample = ConversationSample.from_sharegpt(sharegpt_two_turns, codes=grid(2, 2))
    seq = b.build(sample)
    joined = ("A chat. USER: \nwhat is in the image? ASSISTANT: a red circle.</s>"
              "USER: where is it? ASSISTANT: at the top left</s>")
    assert text_ids(seq, b.ids) == tokenizer(joined, add_special_tokens=False).input_ids
    assert tokenizer(joined).input_ids[0] == seq.input_ids[0] == b.ids.bos
    # masks (hand-checked): exactly the two answers with their EOS are supervised
    assert supervised_runs(tokenizer, seq) == [" a red circle.</s>", " at the top left</s>"]
    # the image block sits where the placeholder was: right after "USER: "
    start = int(np.flatnonzero(seq.input_ids == b.ids.im_start)[0])
    before = tokenizer.convert_ids_to_tokens(seq.input_ids[1:start].tolist())
    assert "".join(before).replace("▁", " ").strip() == "A chat. USER:"
    assert seq.is_visual[start + 1 : start + 5].all() and seq.input_ids[start + 5] == b.ids.im_end


def test_mmc4_ids_are_the_tokenization_of_the_joined_text(tokenizer):
    b = SequenceBuilder(tokenizer, code_depth=D)
    sentences = ["the cat sat on the mat.", "a dog ran in the park.", "it was sunny."]
    images = [grid(1, 1, start=10), grid(1, 1, start=20)]
    seq = b.build(InterleavedSample(sentences, images, image_sentence=[1, 2]))
    joined = " ".join(sentences) + "</s>"
    assert text_ids(seq, b.ids) == tokenizer(joined, add_special_tokens=False).input_ids
    # masks: all text supervised, the image blocks not; each image right before its sentence
    assert supervised_runs(tokenizer, seq) == [" the cat sat on the mat.", " a dog ran in the park.", " it was sunny.</s>"]
    assert not (seq.labels[seq.is_visual] != IGNORE_INDEX).any()
    for k, start in enumerate(np.flatnonzero(seq.input_ids == b.ids.im_start)):
        after = tokenizer.convert_ids_to_tokens(int(seq.input_ids[start + 3]))
        assert after == "▁" + sentences[k + 1].split()[0] or after.startswith("▁" + sentences[k + 1][0])


def test_a_tokenizer_shipped_as_bytes_loads_the_same_and_leaves_no_directory(tokenizer, tmp_path, monkeypatch):
    # What the tokenization actors and training workers receive: the files, not a path on the driver.
    tokenizer.save_pretrained(str(tmp_path / "saved"))
    files = {p.name: p.read_bytes() for p in (tmp_path / "saved").iterdir()}
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the loader's temporary directory goes

    loaded = load_tokenizer_from_files(files)
    text = "USER: where is the red circle? ASSISTANT: at the top left <im_start>"
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert SpecialIds.from_tokenizer(loaded) == SpecialIds.from_tokenizer(tokenizer)
    assert list(scratch.iterdir()) == []  # an actor started per epoch must not leave its copy behind
