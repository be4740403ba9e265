"""Multimodal sequence layout, loss masks and packing: the contract between the data plane and the LM.

Samples in (one dataclass per kind, visual content already turned into tower codes):

    CaptionSample       [image, text]      image understanding; only the text (+ EOS) is supervised
    VideoCaptionSample  [video, text]      video understanding; only the text (+ EOS) is supervised
    GenerationSample    [text, image]      text-to-image; only the image block (markers included) + EOS
    VideoSample         [text, video]      text-to-video; only the video block (markers included) + EOS
    InterleavedSample   MMC4 document      images before the sentence they match, at most 6; only text
    ConversationSample  ShareGPT4V chat    LLaVA `<image>` placeholder; only the assistant turns (+ EOS)

Codes are integer arrays [H, W, D] for an image and [T, H, W, D] for a video (T = 8 frames).

A visual block is `<im_start>` (or `<vi_start>`), one position per grid cell in row-major order (a
video's frames one after another), then `<im_end>` (`<vi_end>`). Every sequence starts with BOS.

Text is tokenized once per sample, as one string: all text pieces joined (EOS written as the tokenizer's
EOS token), the visual blocks left out and put back between the tokens at their character positions,
and each token supervised or not by the piece its last character belongs to. So the text ids are exactly
the tokenization of the joined text: with LLaMA's SentencePiece tokenizer, tokenizing each piece alone
would add a spurious `▁` at the start of every answer and sentence (transformers#26273).

`SequenceBuilder.build(sample) -> BuiltSequence | None` lays one sample out. Over-long samples are cut
only in text, never inside a visual block: the builder keeps the longest prefix that fits, where a text
piece may be cut and a visual block is kept whole or not at all; a sample with no supervised token
left is dropped (None) and counted in `builder.stats`.

THE PACKED-ROW FORMAT (what the data plane stores, e.g. as parquet / Ray Data columns, and what
`UnifiedLM.forward` consumes after stacking rows into a batch). Every column has a fixed shape, L is
the row length (e.g. 8192), D the code depth:

    input_ids     int32[L]     token ids; at visual positions the placeholder id (`SpecialIds.visual`),
                               at padding the pad id
    labels        int32[L]     = input_ids where the position is supervised, -100 elsewhere. Labels are
                               aligned with input_ids (not shifted): position t is predicted from t-1.
                               Whether a supervised position counts in the text or the image loss is
                               decided by is_visual.
    codes         int16[L, D]  the D residual codes of the visual position, zeros elsewhere
    is_visual     bool[L]      position carries visual codes (its input is the projected code embedding)
    position_ids  int32[L]     0, 1, 2, ... restarting at every sample (padding counts as one more run)
    segment_ids   int32[L]     1, 2, ... one per sample in the row, 0 for padding; attention is confined
                               to equal segment ids (block-diagonal causal mask)

In Arrow / parquet the [L] columns travel as fixed-size lists and `codes` as a fixed-shape tensor
(Arrow's tensor type rejects bool, so `is_visual` is a fixed-size list of bool); tests/test_packing.py
round-trips rows that way.

Packing places several built sequences into one row (`pack_sequences`, or `StreamingPacker` for a
stream, or `pack_call` for a bounded batch known in full: best fit decreasing, the fullest rows);
`pad_to_row` puts one sequence alone in a row (the unpacked layout). All give this format.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import bisect

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from vilau_model.tokenizer import SpecialIds

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"  # LLaVA / ShareGPT4V convention in conversation text
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# name -> (numpy dtype, shape with "L" = row length and "D" = code depth)
ROW_SCHEMA: dict[str, tuple[np.dtype, tuple[str, ...]]] = {
    "input_ids": (np.dtype(np.int32), ("L",)),
    "labels": (np.dtype(np.int32), ("L",)),
    "codes": (np.dtype(np.int16), ("L", "D")),
    "is_visual": (np.dtype(np.bool_), ("L",)),
    "position_ids": (np.dtype(np.int32), ("L",)),
    "segment_ids": (np.dtype(np.int32), ("L",)),
}
ROW_COLUMNS: tuple[str, ...] = tuple(ROW_SCHEMA)


# ----------------------------------------------------------------------------------------------------
# Samples


@dataclass
class CaptionSample:
    """[image, text]: the model reads the image and learns to write the caption."""

    codes: np.ndarray  # [H, W, D]
    text: str


@dataclass
class VideoCaptionSample:
    """[video, text]: the model reads the frames (one block) and learns to write the caption."""

    codes: np.ndarray  # [T, H, W, D]
    text: str


@dataclass
class GenerationSample:
    """[text, image]: the model reads the prompt and learns to generate the image."""

    text: str
    codes: np.ndarray  # [H, W, D]


@dataclass
class VideoSample:
    """[text, video]: the model reads the prompt and learns to generate the frames (one block)."""

    text: str
    codes: np.ndarray  # [T, H, W, D]


@dataclass
class InterleavedSample:
    """An MMC4 document: sentences and images, each image matched to one sentence.

    Each image goes right before the sentence it matches (MMC4's `matched_text_index`); images beyond
    the first `max_images_per_doc` (in document order) are left out.
    """

    sentences: list[str]
    images: list[np.ndarray] = field(default_factory=list)  # each [H, W, D]
    image_sentence: list[int] = field(default_factory=list)  # sentence index of each image


@dataclass
class Turn:
    role: str  # "user" or "assistant" (ShareGPT's "human" / "gpt" accepted)
    text: str


@dataclass
class ConversationSample:
    """A ShareGPT4V / LLaVA conversation; `<image>` in a user turn marks where the image goes."""

    turns: list[Turn]
    codes: np.ndarray | None = None  # [H, W, D]

    @classmethod
    def from_sharegpt(cls, conversations: Sequence[dict], codes: np.ndarray | None = None) -> ConversationSample:
        """From ShareGPT records: [{"from": "human"|"gpt", "value": str}, ...]."""
        return cls([Turn(c["from"], c["value"]) for c in conversations], codes)


Sample = CaptionSample | VideoCaptionSample | GenerationSample | VideoSample | InterleavedSample | ConversationSample

_USER_ROLES = ("user", "human")
_ASSISTANT_ROLES = ("assistant", "gpt")


@dataclass
class BuiltSequence:
    """One laid-out sample, N tokens: the row columns without position/segment ids."""

    input_ids: np.ndarray  # int32[N]
    labels: np.ndarray  # int32[N], -100 = not supervised
    codes: np.ndarray  # int16[N, D]
    is_visual: np.ndarray  # bool[N]

    def __len__(self) -> int:
        return len(self.input_ids)


# ----------------------------------------------------------------------------------------------------
# Building one sample


@dataclass
class _Text:
    ids: list[int]
    supervised: bool


@dataclass
class _Str:
    """Text not tokenized yet: a sample's `_Str` pieces are joined and tokenized together."""

    text: str
    supervised: bool


@dataclass
class _Visual:
    codes: np.ndarray  # [N, D]
    start: int
    end: int
    supervised: bool

    def __len__(self) -> int:
        return len(self.codes) + 2


class SequenceBuilder:
    """Lays out samples as token ids, codes and labels (see the module docstring for the rules).

    caption_dropout: probability that the prompt of a generation / video sample is emptied, so the
        model also learns the unconditional distribution used by classifier-free guidance.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        code_depth: int,
        max_len: int = 8192,
        frames_per_video: int = 8,
        max_images_per_doc: int = 6,
        caption_dropout: float = 0.0,
        system_prompt: str = VICUNA_SYSTEM,
        seed: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.ids = SpecialIds.from_tokenizer(tokenizer)
        self.code_depth = code_depth
        self.max_len = max_len
        self.frames_per_video = frames_per_video
        self.max_images_per_doc = max_images_per_doc
        self.caption_dropout = caption_dropout
        self.system_prompt = system_prompt
        self.rng = np.random.default_rng(seed)
        self.stats = {"built": 0, "truncated": 0, "dropped_too_long": 0, "images_left_out": 0, "captions_dropped": 0}

    # -- public ---------------------------------------------------------------------------------------

    def build(self, sample: Sample) -> BuiltSequence | None:
        if isinstance(sample, CaptionSample):
            pieces = self._caption(self._image_block(sample.codes, supervised=False), sample.text)
        elif isinstance(sample, VideoCaptionSample):
            pieces = self._caption(self._video_block(sample.codes, supervised=False), sample.text)
        elif isinstance(sample, GenerationSample):
            pieces = self._generation(sample.text, sample.codes, video=False)
        elif isinstance(sample, VideoSample):
            pieces = self._generation(sample.text, sample.codes, video=True)
        elif isinstance(sample, InterleavedSample):
            pieces = self._interleaved(sample)
        elif isinstance(sample, ConversationSample):
            pieces = self._conversation(sample)
        else:
            raise TypeError(f"unknown sample type {type(sample).__name__}")
        return self._assemble(self._tokenize(pieces))

    def build_many(self, samples: Iterable[Sample]) -> Iterator[BuiltSequence]:
        for sample in samples:
            seq = self.build(sample)
            if seq is not None:
                yield seq

    def generation_prompt(self, text: str) -> list[int]:
        """BOS + prompt ids: the conditional prompt for image/video generation (the start marker is added
        by the generator). The unconditional prompt is `[bos]`."""
        return [self.ids.bos] + self._tok(text)

    def understanding_prompt(self, codes: np.ndarray, text: str = "") -> BuiltSequence:
        """[BOS, image or video block, text]: the caption layout of `CaptionSample` /
        `VideoCaptionSample` cut before the caption, to continue ``text`` (no EOS). Codes [H, W, D] are
        an image, [T, H, W, D] a video."""
        pieces = [_Text([self.ids.bos], False), self._visual_block(codes, False), _Str(text, False)]
        return _concat(self._tokenize(pieces), self.code_depth, self.ids.visual)

    def question_prompt(self, codes: np.ndarray, question: str) -> BuiltSequence:
        """A question about an image in the conversation template ShareGPT4V samples are trained with:
        `[BOS] SYSTEM USER: <image>\nquestion ASSISTANT:`, laid out exactly as a `ConversationSample`
        up to the answer (the model's greedy continuation is its answer)."""
        turns = [Turn("user", IMAGE_PLACEHOLDER + "\n" + question)]
        return _concat(self._tokenize(self._conversation(ConversationSample(turns, codes))), self.code_depth, self.ids.visual)

    # -- layouts ----------------------------------------------------------------------------------------

    def _caption(self, block: _Visual, text: str) -> list:
        return [_Text([self.ids.bos], False), block, _Str(text, True), self._eos(True)]

    def _generation(self, text: str, codes: np.ndarray, video: bool) -> list:
        if self.caption_dropout > 0 and self.rng.random() < self.caption_dropout:
            text = ""
            self.stats["captions_dropped"] += 1
        block = self._video_block(codes, True) if video else self._image_block(codes, True)
        return [_Text([self.ids.bos], False), _Str(text, False), block, self._eos(True)]

    def _interleaved(self, s: InterleavedSample) -> list:
        if len(s.images) != len(s.image_sentence):
            raise ValueError("InterleavedSample needs one sentence index per image")
        last = max(len(s.sentences) - 1, 0)
        # Document order: by matched sentence, then by position in the list (stable sort).
        order = sorted(range(len(s.images)), key=lambda i: min(max(s.image_sentence[i], 0), last))
        kept = order[: self.max_images_per_doc]
        self.stats["images_left_out"] += len(order) - len(kept)
        before: dict[int, list[int]] = {}
        for i in kept:
            before.setdefault(min(max(s.image_sentence[i], 0), last), []).append(i)

        pieces: list = [_Text([self.ids.bos], False)]
        for j, sentence in enumerate(s.sentences):
            for i in before.get(j, []):
                pieces.append(self._image_block(s.images[i], supervised=False))
            # Sentences are joined by a space; the first one starts the document.
            pieces.append(_Str(sentence if j == 0 else " " + sentence, True))
        if not s.sentences:  # images only: nothing to supervise, dropped by _assemble
            pieces += [self._image_block(s.images[i], False) for i in before.get(0, [])]
        pieces.append(self._eos(True))
        return pieces

    def _conversation(self, s: ConversationSample) -> list:
        """Vicuna-v1 template: `SYSTEM USER: q ASSISTANT: a</s>USER: ...`; only ` a</s>` is supervised."""
        turns = list(s.turns)
        has_placeholder = any(IMAGE_PLACEHOLDER in t.text for t in turns if t.role in _USER_ROLES)
        if s.codes is not None and not has_placeholder:
            # LLaVA convention: an image without a placeholder goes first in the first user turn.
            first = next(i for i, t in enumerate(turns) if t.role in _USER_ROLES)
            turns[first] = Turn(turns[first].role, IMAGE_PLACEHOLDER + "\n" + turns[first].text)
        if s.codes is None and has_placeholder:
            raise ValueError("conversation has an <image> placeholder but no image codes")

        pieces: list = [_Text([self.ids.bos], False)]
        prefix = self.system_prompt + " " if self.system_prompt else ""
        for t in turns:
            if t.role in _USER_ROLES:
                parts = t.text.split(IMAGE_PLACEHOLDER)
                text = prefix + "USER: " + parts[0]
                for part in parts[1:]:
                    pieces.append(_Str(text, False))
                    pieces.append(self._image_block(s.codes, supervised=False))
                    text = part
                pieces.append(_Str(text + " ASSISTANT:", False))
                prefix = ""
            elif t.role in _ASSISTANT_ROLES:
                pieces.append(_Str(" " + t.text, True))
                pieces.append(self._eos(True))
            else:
                raise ValueError(f"unknown conversation role {t.role!r}")
        return pieces

    # -- helpers ------------------------------------------------------------------------------------------

    def _tok(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def _eos(self, supervised: bool) -> _Str:
        # Written as text so that what follows it is tokenized as in the joined text (as LLaVA's Vicuna
        # template does: `... answer</s>USER: ...` is one string).
        return _Str(self.tokenizer.eos_token, supervised)

    def _tokenize(self, pieces: list) -> list:
        """`_Str` pieces -> `_Text` runs: the joined text tokenized once (see the module docstring).

        Visual blocks and id pieces (BOS) go back before the first token that starts at or after their
        character position; a token that straddles it (never at a word boundary) keeps the block after it.
        """
        parts, ends, supervised, inserts = [], [], [], []
        position = 0
        for p in pieces:
            if isinstance(p, _Str):
                if p.text:
                    parts.append(p.text)
                    position += len(p.text)
                    ends.append(position)
                    supervised.append(p.supervised)
            else:
                inserts.append((position, p))
        text = "".join(parts)
        if text:
            encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            tokens = zip(encoding.input_ids, encoding.offset_mapping)
        else:
            tokens = iter(())
        out: list = []
        run: _Text | None = None
        k = 0
        for token, (start, end) in tokens:
            while k < len(inserts) and inserts[k][0] <= start:
                out.append(inserts[k][1])
                run = None
                k += 1
            char = end - 1 if end > start else start
            sup = supervised[min(bisect.bisect_right(ends, char), len(ends) - 1)]
            if run is None or run.supervised != sup:
                run = _Text([], sup)
                out.append(run)
            run.ids.append(token)
        out += [p for _, p in inserts[k:]]
        return out

    def _image_block(self, codes: np.ndarray, supervised: bool) -> _Visual:
        codes = np.asarray(codes)
        if codes.ndim != 3 or codes.shape[-1] != self.code_depth:
            raise ValueError(f"image codes must be [H, W, {self.code_depth}], got {codes.shape}")
        return _Visual(codes.reshape(-1, self.code_depth), self.ids.im_start, self.ids.im_end, supervised)

    def _visual_block(self, codes: np.ndarray, supervised: bool) -> _Visual:
        return self._video_block(codes, supervised) if np.ndim(codes) == 4 else self._image_block(codes, supervised)

    def _video_block(self, codes: np.ndarray, supervised: bool) -> _Visual:
        codes = np.asarray(codes)
        if codes.ndim != 4 or codes.shape[-1] != self.code_depth:
            raise ValueError(f"video codes must be [T, H, W, {self.code_depth}], got {codes.shape}")
        if self.frames_per_video and codes.shape[0] != self.frames_per_video:
            raise ValueError(f"videos have {self.frames_per_video} frames, got {codes.shape[0]}")
        return _Visual(codes.reshape(-1, self.code_depth), self.ids.vi_start, self.ids.vi_end, supervised)

    def _assemble(self, pieces: list) -> BuiltSequence | None:
        total = sum(len(p.ids) if isinstance(p, _Text) else len(p) for p in pieces)
        if total > self.max_len:
            # Keep the longest prefix that fits: text may be cut, a visual block only kept whole.
            kept, budget = [], self.max_len
            for p in pieces:
                n = len(p.ids) if isinstance(p, _Text) else len(p)
                if n <= budget:
                    kept.append(p)
                    budget -= n
                    continue
                if isinstance(p, _Text) and budget > 0:
                    kept.append(_Text(p.ids[:budget], p.supervised))
                break
            pieces = kept
            self.stats["truncated"] += 1
        seq = _concat(pieces, self.code_depth, self.ids.visual)
        if not (seq.labels != IGNORE_INDEX).any():
            self.stats["dropped_too_long"] += 1
            return None
        self.stats["built"] += 1
        return seq


def _concat(pieces: list, code_depth: int, placeholder: int) -> BuiltSequence:
    ids, labels, codes, visual = [], [], [], []
    for p in pieces:
        if isinstance(p, _Text):
            n = len(p.ids)
            ids.append(np.asarray(p.ids, dtype=np.int32))
            codes.append(np.zeros((n, code_depth), dtype=np.int16))
            visual.append(np.zeros(n, dtype=bool))
            labels.append(ids[-1] if p.supervised else np.full(n, IGNORE_INDEX, dtype=np.int32))
        else:
            n = len(p.codes)
            if p.codes.size and (p.codes.min() < 0 or p.codes.max() > np.iinfo(np.int16).max):
                raise ValueError("visual codes must lie in [0, 32767] to fit the int16 row column")
            # The markers are ordinary tokens; the grid cells carry the placeholder id and their codes.
            block_ids = np.concatenate([[p.start], np.full(n, placeholder, dtype=np.int32), [p.end]])
            ids.append(block_ids.astype(np.int32))
            codes.append(np.concatenate([np.zeros((1, code_depth)), p.codes, np.zeros((1, code_depth))]).astype(np.int16))
            visual.append(np.concatenate([[False], np.ones(n, dtype=bool), [False]]))
            labels.append(ids[-1] if p.supervised else np.full(n + 2, IGNORE_INDEX, dtype=np.int32))
    if not ids:
        return BuiltSequence(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros((0, code_depth), np.int16),
                             np.zeros(0, bool))
    return BuiltSequence(
        np.concatenate(ids).astype(np.int32),
        np.concatenate(labels).astype(np.int32),
        np.concatenate(codes).astype(np.int16),
        np.concatenate(visual),
    )


# ----------------------------------------------------------------------------------------------------
# Packing into fixed-length rows


def empty_row(seq_len: int, code_depth: int, pad_id: int) -> dict[str, np.ndarray]:
    """An all-padding row: one padding run with positions 0..L-1 and segment id 0."""
    return {
        "input_ids": np.full(seq_len, pad_id, dtype=np.int32),
        "labels": np.full(seq_len, IGNORE_INDEX, dtype=np.int32),
        "codes": np.zeros((seq_len, code_depth), dtype=np.int16),
        "is_visual": np.zeros(seq_len, dtype=bool),
        "position_ids": np.arange(seq_len, dtype=np.int32),
        "segment_ids": np.zeros(seq_len, dtype=np.int32),
    }


def fill_row(seqs: Sequence[BuiltSequence], seq_len: int, code_depth: int, pad_id: int) -> dict[str, np.ndarray]:
    """Place `seqs` one after another in one row (segments 1, 2, ...), padding the rest."""
    row = empty_row(seq_len, code_depth, pad_id)
    offset = 0
    for segment, s in enumerate(seqs, start=1):
        n = len(s)
        if offset + n > seq_len:
            raise ValueError(f"sequences of {offset + n} tokens do not fit a row of {seq_len}")
        span = slice(offset, offset + n)
        row["input_ids"][span] = s.input_ids
        row["labels"][span] = s.labels
        row["codes"][span] = s.codes
        row["is_visual"][span] = s.is_visual
        row["position_ids"][span] = np.arange(n)
        row["segment_ids"][span] = segment
        offset += n
    row["position_ids"][offset:] = np.arange(seq_len - offset)  # padding: one more run, never attended
    return row


def pad_to_row(seq: BuiltSequence, seq_len: int, code_depth: int, pad_id: int) -> dict[str, np.ndarray]:
    """One sequence alone in a row: the unpacked layout, same format."""
    return fill_row([seq], seq_len, code_depth, pad_id)


class StreamingPacker:
    """Best-fit packing of a stream of sequences into rows of `seq_len` tokens.

    Keeps up to `max_open_rows` partly filled rows; each new sequence goes to the open row it fills
    most tightly (or a new row). A row leaves when it is exactly full, or, when too many are open, the
    fullest one leaves. More open rows = fuller rows, at the cost of holding more sequences in memory.
    """

    def __init__(self, seq_len: int, code_depth: int, pad_id: int, max_open_rows: int = 16):
        self.seq_len, self.code_depth, self.pad_id = seq_len, code_depth, pad_id
        self.max_open_rows = max_open_rows
        self._open: list[tuple[int, list[BuiltSequence]]] = []  # (used tokens, sequences)
        self.stats = {"rows": 0, "sequences": 0, "tokens": 0, "pad_tokens": 0}

    def add(self, seq: BuiltSequence) -> list[dict[str, np.ndarray]]:
        n = len(seq)
        if n > self.seq_len:
            raise ValueError(f"a sequence of {n} tokens exceeds the row length {self.seq_len}; build with max_len <= row length")
        best, best_free = -1, self.seq_len + 1
        for i, (used, _) in enumerate(self._open):
            free = self.seq_len - used
            if n <= free < best_free:
                best, best_free = i, free
        if best < 0:
            self._open.append((0, []))
            best = len(self._open) - 1
        used, seqs = self._open[best]
        seqs.append(seq)
        self._open[best] = (used + n, seqs)
        self.stats["sequences"] += 1

        out = []
        if used + n == self.seq_len:
            out.append(self._emit(best))
        while len(self._open) > self.max_open_rows:
            fullest = max(range(len(self._open)), key=lambda i: self._open[i][0])
            out.append(self._emit(fullest))
        return out

    def flush(self) -> list[dict[str, np.ndarray]]:
        out = []
        while self._open:
            out.append(self._emit(0))
        return out

    def _emit(self, i: int) -> dict[str, np.ndarray]:
        used, seqs = self._open.pop(i)
        self.stats["rows"] += 1
        self.stats["tokens"] += used
        self.stats["pad_tokens"] += self.seq_len - used
        return fill_row(seqs, self.seq_len, self.code_depth, self.pad_id)


# ----------------------------------------------------------------------------------------------------
# Caption dropout on packed rows


def generation_prompts(row: dict[str, np.ndarray], start_ids: Iterable[int]) -> dict[int, slice]:
    """{segment id: the span of its prompt text} for each generation sample of a packed row that has a
    prompt. A generation sample ([text, image] / [text, video]) is the one layout whose first supervised
    position is a visual start marker (``start_ids``: `<im_start>`, `<vi_start>`); its prompt is what lies
    between its BOS and that marker."""
    segments, labels, ids = row["segment_ids"], row["labels"], row["input_ids"]
    starts = np.asarray(sorted(set(start_ids)))
    spans = {}
    boundaries = np.flatnonzero(np.diff(segments, prepend=-1))  # first position of each run
    ends = np.append(boundaries[1:], len(segments))
    for first, end in zip(boundaries, ends):
        segment = int(segments[first])
        if segment == 0:
            continue  # padding
        supervised = np.flatnonzero(labels[first:end] != IGNORE_INDEX)
        if len(supervised) == 0:
            continue
        marker = first + int(supervised[0])
        if np.isin(ids[marker], starts) and marker > first + 1:
            spans[segment] = slice(first + 1, marker)
    return spans


def drop_spans(row: dict[str, np.ndarray], spans: Iterable[slice], pad_id: int) -> dict[str, np.ndarray]:
    """The row without the positions in ``spans`` (the rest moved up, padding after), positions renumbered
    from 0 in every segment: the same row as if those tokens had never been laid out."""
    length = len(row["input_ids"])
    keep = np.ones(length, dtype=bool)
    for span in spans:
        keep[span] = False
    kept = int(keep.sum())
    out = empty_row(length, row["codes"].shape[-1], pad_id)
    for name in ("input_ids", "labels", "codes", "is_visual", "segment_ids"):
        out[name][:kept] = row[name][keep]
    segments = out["segment_ids"]
    run_starts = np.flatnonzero(np.diff(segments, prepend=-1))
    run_of = np.repeat(run_starts, np.diff(np.append(run_starts, length)))
    out["position_ids"] = (np.arange(length) - run_of).astype(row["position_ids"].dtype)
    for name, value in out.items():
        out[name] = value.astype(row[name].dtype, copy=False)
    return out


def pack_sequences(
    seqs: Iterable[BuiltSequence], seq_len: int, code_depth: int, pad_id: int, max_open_rows: int = 16
) -> list[dict[str, np.ndarray]]:
    packer = StreamingPacker(seq_len, code_depth, pad_id, max_open_rows)
    rows = []
    for s in seqs:
        rows += packer.add(s)
    return rows + packer.flush()


def best_fit_decreasing(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Rows for a bounded batch of sequences known in full (one call of the tokenization pool): the
    indices of the sequences of each row, longest first, each into the row it fills most tightly.

    A stream packer must place each sequence as it comes, and a batch of long samples (8-frame clips,
    documents with several images) then leaves gaps that the short ones arriving later cannot reach;
    seeing the whole batch, the short ones fill what the long ones leave. Ties keep arrival order, so
    the rows depend only on the batch."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted: the best fit is the first with enough room
    for i in order:
        n = lengths[i]
        if n > seq_len:
            raise ValueError(f"a sequence of {n} tokens exceeds the row length {seq_len}; build with max_len <= row length")
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([])
            room, row = seq_len, len(rows) - 1
        else:
            room, row = free.pop(at)
        rows[row].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    return rows


def pack_call(seqs: Sequence[BuiltSequence], seq_len: int, code_depth: int, pad_id: int) -> tuple[list[dict[str, np.ndarray]], list[list[int]]]:
    """A bounded batch of sequences packed by `best_fit_decreasing`: (rows, indices of each row's sequences)."""
    groups = best_fit_decreasing([len(s) for s in seqs], seq_len)
    return [fill_row([seqs[i] for i in g], seq_len, code_depth, pad_id) for g in groups], groups


def collate_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack rows into a torch batch for `UnifiedLM.forward` (integer columns widened to int64)."""
    batch = {}
    for name in ROW_COLUMNS:
        array = np.stack([r[name] for r in rows])
        batch[name] = torch.from_numpy(array if name == "is_visual" else array.astype(np.int64))
    return batch
