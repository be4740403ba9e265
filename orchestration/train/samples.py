"""Stage 2's end-of-run samples, generation score and understanding score, run as a Ray task of their own.

The *generation score* is a GenEval-style check of text-to-image generation: one prompt per class of
the labelled eval split (``zero_shot_prompt(class)``, the same prompts as the tower's zero-shot
evaluation; at real scale the class list is the user's ``classes.json``), ``per_class`` images each,
every image classified by the trained tower's zero-shot head (image embedding vs the class prompts'
text embeddings). The score is the share of images classified as the class they were prompted with;
chance is 1 / number of classes. Both go to the stage-2 MLflow run as ``eval/generation_score`` and
``eval/generation_chance``, with the grid of samples (one column per class) beside them.

The *understanding score* checks the other direction on the same held-back images: the model answers
``UNDERSTANDING_QUESTION`` about each image, asked in the conversation template that ShareGPT4V samples
are trained with (``SequenceBuilder.question_prompt``; the question is the one those samples ask, since
a tiny stage 2 does not generalize to new questions), by greedy decoding of a few tokens; the score is
the share of answers that name the image's class (its colour and its shape, ``answer_accuracy``), chance
1 / number of classes. Colour and shape are also scored alone (chance 1 / number of each). Held-back
clips (the eval split's ``clips.parquet``, OpenVid-style mp4 with a class label, when it has one) are
answered along with the images: the model continues ``[BOS, video]``, the layout its OpenVid
[video, text] samples are trained with (no conversation holds a video), and its caption is scored the
same way. ``eval/understanding_score`` is over images and clips together; ``eval/understanding_image_score``
and ``eval/understanding_video_score`` (with ``eval/understanding_clips``, their number) split it. MLflow
also keeps every answer as a table.

Both run after the worker group has finished, from the Ray-free stage-2 export, with its own resources
(a GPU when the cluster trains on GPUs), so no training rank ever waits for it.
"""

from __future__ import annotations

import json
import logging

import torch

from orchestration.config import Config
from orchestration.storage import join

log = logging.getLogger(__name__)


def class_names(config: Config) -> list[str]:
    """The eval split's class names (index = label)."""
    from orchestration.data.records import read_bytes
    from orchestration.data.sources import s3_settings

    return json.loads(read_bytes(join(config.resolve_path(config.data.eval_path), "classes.json"), s3_settings(config)))


@torch.no_grad()
def generation_score(model, tokenizer, names: list[str], per_class: int, seed: int = 0) -> dict:
    """Generate ``per_class`` images per class prompt and classify them with ``model.tower``.

    Returns {"score", "chance", "images" [per_class*C, 3, S, S] (class-major), "labels", "predicted"}.
    """
    from orchestration.data.scenes import zero_shot_prompt
    from orchestration.train.generation import generate

    prompts = [zero_shot_prompt(name) for name in names]
    labels = torch.arange(len(names)).repeat_interleave(per_class)
    images = generate(model, tokenizer, [prompts[i] for i in labels.tolist()], seed=seed)
    import numpy as np

    pixels = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)
    pixels = pixels.float().div_(255.0)
    tower = model.tower.eval()
    device = next(tower.parameters()).device  # the images come back as PIL images, the prompts as CPU ids
    class_emb = tower.encode_text(tower.tokenize(prompts).to(device)).float()
    predicted = (tower.encode_image(pixels.to(device)).float() @ class_emb.T).argmax(dim=1).cpu()
    return {
        "score": float((predicted == labels).float().mean()),
        "chance": 1.0 / len(names),
        "images": pixels,
        "labels": labels,
        "predicted": predicted,
    }


# The question the (synthetic) ShareGPT4V conversations are trained with; its answers name the colour
# and the shape ("The image shows a red circle at the top left, ..."). A question stage 2 never saw gets
# no answer at the tiny scale: asked "What colour and shape is the object in the image?", the 60-step
# model answers "The image shows a plain light background." (score 0.02 where this question gets 0.30).
UNDERSTANDING_QUESTION = "Describe this image in detail."
ANSWER_TOKENS = 16  # "The image shows a red circle" is 6-10 tokens of the tiny BPE


@torch.no_grad()
def understanding_score(model, tokenizer, pixels, labels, names: list[str], question: str = UNDERSTANDING_QUESTION,
                        batch_size: int = 64) -> dict:
    """Answer ``question`` about each image (uint8 [N, 3, S, S]) greedily and score the answers against
    the labels (``vilau_model.evaluation.answer_accuracy``); adds the decoded "answers"."""
    from vilau_model.evaluation import answer_accuracy
    from vilau_model.sequence import SequenceBuilder

    builder = SequenceBuilder(tokenizer, code_depth=model.code_depth)
    tower = model.tower.eval()
    device = next(tower.parameters()).device
    answers = []
    for start in range(0, len(pixels), batch_size):
        x = torch.as_tensor(pixels[start : start + batch_size]).to(device).float().div_(255.0)
        codes = tower.encode_codes(x).cpu().numpy()
        prompts = [builder.question_prompt(c, question) for c in codes]
        ids = model.generate_text(prompts, max_new_tokens=ANSWER_TOKENS, temperature=0.0)
        answers += tokenizer.batch_decode(ids, skip_special_tokens=True)
    result = answer_accuracy(answers, [int(l) for l in labels], names)
    return {**result, "answers": answers}


@torch.no_grad()
def video_understanding_answers(model, tokenizer, frames, batch_size: int = 16) -> list[str]:
    """The model's greedy caption of each clip (uint8 [N, T, 3, S, S]), prompted as its [video, text]
    samples are laid out: ``[BOS, <vi_start> frames <vi_end>]``."""
    from vilau_model.sequence import SequenceBuilder

    builder = SequenceBuilder(tokenizer, code_depth=model.code_depth)
    tower = model.tower.eval()
    device = next(tower.parameters()).device
    answers = []
    for start in range(0, len(frames), batch_size):
        clips = torch.as_tensor(frames[start : start + batch_size])
        n, t = clips.shape[:2]
        x = clips.flatten(0, 1).to(device).float().div_(255.0)
        codes = tower.encode_codes(x).cpu().numpy()
        codes = codes.reshape(n, t, *codes.shape[1:])  # [N, T, H, W, D]
        prompts = [builder.understanding_prompt(c) for c in codes]
        ids = model.generate_text(prompts, max_new_tokens=ANSWER_TOKENS, temperature=0.0)
        answers += tokenizer.batch_decode(ids, skip_special_tokens=True)
    return answers


def eval_clips(config: Config, frames: int) -> dict | None:
    """The eval split's held-back clips (``clips.parquet``: mp4 bytes, label), decoded to ``frames`` frames
    at the tower's size: {"frames" uint8 [N, T, 3, S, S], "labels", "captions"}; None without the file."""
    import numpy as np
    import pyarrow.parquet as pq

    from orchestration.data.decode import decode_video
    from orchestration.data.records import fs_and_path
    from orchestration.data.sources import s3_settings
    from orchestration.data.tower_data import tower_config

    fs, path = fs_and_path(join(config.resolve_path(config.data.eval_path), "clips.parquet"), s3_settings(config))
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=["mp4", "label", "caption"]).to_pylist()
    size = tower_config(config).image_size
    return {"frames": np.stack([decode_video(row["mp4"], size, frames) for row in table]),
            "labels": np.asarray([row["label"] for row in table], dtype=np.int64),
            "captions": [row["caption"] for row in table]}


def understanding_metrics(result: dict) -> dict[str, float]:
    metrics = {"eval/understanding_score": result["class_acc"], "eval/understanding_chance": result["class_chance"]}
    # The scenes' classes are "<colour> <shape>": name the two slots; other class lists get numbers.
    slot_names = ("color", "shape") if len(result["slot_acc"]) == 2 else tuple(f"word{i}" for i in range(len(result["slot_acc"])))
    for name, acc, chance in zip(slot_names, result["slot_acc"], result["slot_chance"]):
        metrics[f"eval/understanding_{name}_acc"] = acc
        metrics[f"eval/understanding_{name}_chance"] = chance
    return metrics


def run_generation_eval(config: Config, export_uri: str, tracking_uri: str, run_id: str | None, step: int) -> dict:
    """Load the stage-2 export, compute the generation score, log it and the sample grid to MLflow."""
    from orchestration.data.scenes import zero_shot_prompt
    from orchestration.data.sources import s3_settings
    from orchestration.train.artifacts import image_grid
    from orchestration.train.outputs import load_lm_export, local_export
    from orchestration.train.tracking import RunLogger

    per_class = config.lm_train.generate_samples
    if per_class == 0:
        return {}
    try:
        names = class_names(config)
    except Exception as exc:  # no labelled eval split: a finished run is not failed over its samples
        log.warning("no generation score: the eval split's classes.json could not be read (%s)", exc)
        return {}
    torch.manual_seed(config.seed)
    local, tmp = local_export(export_uri, s3_settings(config))
    try:
        model, tokenizer = load_lm_export(local)
    finally:
        if tmp is not None:
            tmp.cleanup()
    device = torch.device("cuda") if config.cluster.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    result = generation_score(model, tokenizer, names, per_class, seed=config.seed)
    metrics = {"eval/generation_score": result["score"], "eval/generation_chance": result["chance"]}
    logger = RunLogger(tracking_uri, run_id, active=True)
    try:
        metrics.update(_understanding_eval(config, model, tokenizer, names, logger, step))
    except Exception:  # as above: a finished run keeps its generation score
        log.exception("no understanding score")
    logger.log_metrics(metrics, step)
    rows = result["images"].view(len(names), per_class, *result["images"].shape[1:]).transpose(0, 1)
    grid = image_grid(list(rows), column_labels=[f'"{zero_shot_prompt(name)}"' for name in names],
                      row_labels=[f"sample {k + 1}" for k in range(per_class)])
    logger.log_image(grid, f"samples/generation_step_{step:07d}.png")
    predicted = result["predicted"].tolist()
    lines = [f"{names[label]}\t{names[p]}" for label, p in zip(result["labels"].tolist(), predicted)]
    logger.log_text("prompted class\tclassified as\n" + "\n".join(lines) + "\n", f"samples/generation_step_{step:07d}.tsv")
    return metrics


def _understanding_eval(config: Config, model, tokenizer, names: list[str], logger, step: int) -> dict[str, float]:
    from orchestration.data.tower_data import build_eval_split

    from vilau_model.evaluation import answer_accuracy

    split = build_eval_split(config, stats_group=None)
    images = understanding_score(model, tokenizer, split["pixels"], split["labels"], names)
    answers, labels, kinds = list(images["answers"]), split["labels"].tolist(), ["image"] * len(images["answers"])
    metrics = {"eval/understanding_image_score": images["class_acc"]}
    clips = None
    try:
        clips = eval_clips(config, model.config.frames_per_video)
    except Exception:  # an unreadable clips file costs the clips, not the score
        log.exception("held-back clips not scored")
    if clips is not None and len(clips["labels"]):
        clip_answers = video_understanding_answers(model, tokenizer, clips["frames"])
        metrics["eval/understanding_video_score"] = answer_accuracy(clip_answers, clips["labels"].tolist(), names)["class_acc"]
        answers, labels = answers + clip_answers, labels + clips["labels"].tolist()
        kinds += ["clip"] * len(clip_answers)
    metrics["eval/understanding_clips"] = float(len(kinds) - len(images["answers"]))
    result = {**answer_accuracy(answers, labels, names), "answers": answers}
    lines = [f"{kind}\t{names[label]}\t{' '.join(w or '-' for w in named)}\t{answer!r}"
             for kind, label, named, answer in zip(kinds, labels, result["named"], result["answers"])]
    logger.log_text(f"question (images): {UNDERSTANDING_QUESTION}\nclips: the caption after [BOS, video]\n"
                    "kind\ttrue class\tnamed\tanswer\n" + "\n".join(lines) + "\n",
                    f"samples/understanding_step_{step:07d}.tsv")
    return {**understanding_metrics(result), **metrics}


def generation_resources(config: Config) -> dict:
    """Ray resources of the generation task: one GPU when the cluster trains on GPUs."""
    return {"num_cpus": 1, "num_gpus": 1 if config.cluster.use_gpu else 0}

