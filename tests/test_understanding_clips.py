"""Held-back clips in the understanding score: the synthetic eval split holds labelled clips beside its
images, they decode to the frames training takes, and the stage-2 model answers them in the layout its
[video, text] samples are trained with (a random tiny LM here: the test checks the plumbing, the
summary's score says how well a trained one does)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestration.config import load_config
from orchestration.data.scenes import class_names
from orchestration.data.synthetic import make_synthetic_dataset
from orchestration.train.samples import eval_clips, video_understanding_answers
from vilau_model.config import get_lm_config
from vilau_model.sequence import SequenceBuilder
from vilau_model.tokenizer import train_bpe_tokenizer
from vilau_model.unified_lm import UnifiedLM

pytestmark = pytest.mark.usefixtures("one_thread")


def test_held_back_clips_are_written_decoded_and_answered(tmp_path, tiny_tower):
    manifest = make_synthetic_dataset(tmp_path / "data", samples=4, eval_samples=4, video_samples=2, eval_clips=3)
    assert manifest["eval"]["clips"] == 3 and manifest["eval"]["clips_file"] == "eval/clips.parquet"
    config = load_config(None, [f"data.root={tmp_path / 'data'}"])
    clips = eval_clips(config, frames=8)
    size = tiny_tower.config.image_size
    assert clips["frames"].shape == (3, 8, 3, size, size) and clips["frames"].dtype == np.uint8
    names = class_names()
    for label, caption in zip(clips["labels"], clips["captions"]):
        assert caption.startswith("a " + names[label] + " moving ")  # labelled by the moving shape's class
    # the clip moves: its frames differ
    assert (clips["frames"][:, 0] != clips["frames"][:, -1]).any()

    tok = train_bpe_tokenizer(["a red circle moving left", "a blue square moving right"] * 10, tmp_path / "tok", vocab_size=300)
    builder = SequenceBuilder(tok, code_depth=tiny_tower.config.code_depth)
    torch.manual_seed(0)
    model = UnifiedLM(get_lm_config("tiny"), tiny_tower, builder.ids).eval()
    answers = video_understanding_answers(model, tok, clips["frames"])
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)

    # an eval split without clips (a real one of images only): no clips, nothing fails
    (tmp_path / "data" / "eval" / "clips.parquet").unlink()
    assert eval_clips(config, frames=8) is None
