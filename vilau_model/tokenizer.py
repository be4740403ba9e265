"""Text tokenizers for the unified LM, and the visual markers.

The paper model uses LLaMA-2's tokenizer, loaded from a local path. Tests and the embedded tiny default
train a small byte-level BPE offline on the texts they have (no hub), save it, and reload it as a
transformers `PreTrainedTokenizerFast`, so the rest of the code only ever sees a transformers tokenizer.

In both cases the four markers `<im_start> <im_end> <vi_start> <vi_end>` are added as special tokens
(they must never be split or produced by the BPE on plain text), and `SpecialIds` collects the ids the
sequence builder and the model need.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

IM_START, IM_END, VI_START, VI_END = "<im_start>", "<im_end>", "<vi_start>", "<vi_end>"
MARKERS: tuple[str, ...] = (IM_START, IM_END, VI_START, VI_END)

# LLaMA's order: <unk>=0, <s>=1, </s>=2. Keeping it makes the tiny BPE a drop-in stand-in.
UNK, BOS, EOS = "<unk>", "<s>", "</s>"


def train_bpe_tokenizer(
    texts: Iterable[str], save_dir: str | os.PathLike, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`, save it under `save_dir` and return it reloaded, markers added.

    The vocabulary can come out smaller than `vocab_size` when the texts are few; use `len(tokenizer)`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token=UNK))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk> in practice
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=UNK
    )
    add_markers(tokenizer)
    os.makedirs(save_dir, exist_ok=True)
    tokenizer.save_pretrained(str(save_dir))
    # Reload from disk so callers get exactly what a later `load_tokenizer(save_dir)` gives.
    return load_tokenizer(save_dir)


def add_markers(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add the visual markers as special tokens (idempotent); returns how many were new."""
    missing = [m for m in MARKERS if m not in tokenizer.get_vocab()]
    if not missing:
        return 0
    return tokenizer.add_special_tokens({"additional_special_tokens": list(MARKERS)}, replace_additional_special_tokens=False)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory (LLaMA-2's or one saved by `train_bpe_tokenizer`), markers added."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token is None:
        # LLaMA ships no pad token; LLaVA-style code pads with <unk>. Padding is never attended or supervised.
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    add_markers(tokenizer)
    return tokenizer


def load_tokenizer_from_files(files: dict[str, bytes]) -> PreTrainedTokenizerBase:
    """`load_tokenizer` on a directory's files shipped as bytes (to actors on other machines). The files
    are read at load time, so their directory is removed again: a long run starts many actors."""
    with tempfile.TemporaryDirectory(prefix="vilau-tokenizer-") as directory:
        for name, data in files.items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
        return load_tokenizer(directory)


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the sequence builder and the model agree on.

    `visual` is the placeholder id stored in `input_ids` at visual positions; the model never embeds it
    (those positions take the projected code embedding instead), so any valid id works. `vocab_size` is
    the full vocabulary, markers included: the size of the LLM's embedding table.
    """

    bos: int
    eos: int
    pad: int
    visual: int
    im_start: int
    im_end: int
    vi_start: int
    vi_end: int
    vocab_size: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> SpecialIds:
        ids = tokenizer.convert_tokens_to_ids(list(MARKERS))
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise ValueError("tokenizer lacks the visual markers; call add_markers(tokenizer) first")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
        placeholder = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else pad
        return cls(
            bos=tokenizer.bos_token_id,
            eos=tokenizer.eos_token_id,
            pad=pad,
            visual=placeholder,
            im_start=ids[0],
            im_end=ids[1],
            vi_start=ids[2],
            vi_end=ids[3],
            vocab_size=len(tokenizer),
        )

    @classmethod
    def llama(cls, base_vocab_size: int = 32000) -> SpecialIds:
        """LLaMA-2's ids with the markers appended after the base vocabulary (what `load_tokenizer` gives)."""
        v = base_vocab_size
        return cls(bos=1, eos=2, pad=0, visual=0, im_start=v, im_end=v + 1, vi_start=v + 2, vi_end=v + 3,
                   vocab_size=v + len(MARKERS))
