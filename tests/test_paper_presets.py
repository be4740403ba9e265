"""The paper presets (jobs/configs/vilau-256.yaml, vilau-384.yaml): the recipe of DESIGN.md 4, pretrained
weights required before anything starts, RoPE scaling reaching the LLM config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestration.config import ConfigError, load_config
from vilau_model.config import get_lm_config, get_tower_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["vilau-256", "vilau-384"]
WEIGHTS = ["model.tower_pretrained=/weights/tower.safetensors", "model.lm_path=/weights/llama-2-7b",
           "tower_train.perceptual_weights_path=/weights/lpips_vgg.pth"]


@pytest.mark.parametrize("name", PRESETS)
def test_paper_preset_carries_the_recipe(name):
    config = load_config(ROOT / "jobs" / "configs" / f"{name}.yaml", WEIGHTS)
    lm = config.lm_train
    assert (lm.optim.lr, lm.optim.warmup_fraction, lm.optim.weight_decay) == (5e-5, 0.03, 0.0)
    assert config.data.seq_len == 8192
    assert config.cluster.num_workers * lm.batch_size_per_worker * lm.grad_accum == 512
    assert config.cluster.use_gpu and config.cluster.num_workers % 8 == 0
    assert lm.caption_dropout == 0.1
    assert config.model.tower == name and config.model.lm == "vilau-7b"
    lm_cfg = get_lm_config(config.model.lm, **config.model.lm_overrides())
    assert lm_cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert lm_cfg.pretrained_path == "/weights/llama-2-7b"
    assert lm_cfg.attention == "flex"  # packed 8192-token rows: no [L,L] mask, other samples' tiles skipped
    # the tokenizer recipe: pixels on [-1, 1], LPIPS, a delayed PatchGAN, RQ-VAE's decoder
    tower = config.tower_train
    assert (tower.pixel_loss, tower.perceptual_weight, tower.gan_weight) == ("mse", 1.0, 0.75)
    assert 0 < tower.gan_start_step < tower.steps
    assert get_tower_config(config.model.tower).decoder == "rqvae"
    # and the tiny default keeps both off
    tiny = load_config(None).tower_train
    assert (tiny.perceptual_weight, tiny.gan_weight) == (0.0, 0.0)


@pytest.mark.parametrize("name", PRESETS)
def test_paper_preset_without_weights_names_the_missing_field(name):
    path = ROOT / "jobs" / "configs" / f"{name}.yaml"
    with pytest.raises(ConfigError, match="model.tower_pretrained"):
        load_config(path)
    with pytest.raises(ConfigError, match="model.lm_path"):
        load_config(path, WEIGHTS[:1])
    with pytest.raises(ConfigError, match="tower_train.perceptual_weights_path"):
        load_config(path, WEIGHTS[:2])
    # the explicit opt-out
    assert load_config(path, ["model.allow_random_init=true"]).model.tower_pretrained is None


def test_caption_dropout_defaults_to_cfg_training():
    assert load_config(None).lm_train.caption_dropout == 0.1


def test_seq_len_beyond_the_pretrained_context_warns(tmp_path, caplog):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    base = ["model.lm_path=" + str(tmp_path), "data.seq_len=8192"]
    with caplog.at_level("WARNING", logger="orchestration.config"):
        load_config(None, base)
    assert "exceeds the LLM's pretrained context of 4096" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="orchestration.config"):
        load_config(None, base + ["model.rope_scaling={type: linear, factor: 2.0}"])
    assert "pretrained context" not in caplog.text


def test_pretrain_job_without_weights_exits_before_ray(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "pretrain.py"), "--config", str(ROOT / "jobs" / "configs" / "vilau-256.yaml"),
         f"output_dir={tmp_path}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "model.tower_pretrained" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("ray*")) and not (tmp_path / "mlflow.db").exists()
    print(f"exited in {time.monotonic() - started:.1f} s")  # information only: tests never assert on time


def test_small_pair_builds_on_meta_for_one_gpu():
    import torch

    from vilau_model.config import get_tower_config
    from vilau_model.unified_lm import UnifiedLM
    from vilau_model.vision_tower import UnifiedVisionTower

    tower_cfg = get_tower_config("small")
    with torch.device("meta"):
        tower = UnifiedVisionTower(tower_cfg)
        model = UnifiedLM(get_lm_config("small"), tower)
        tokens = tower.vision.penultimate(torch.empty(1, 3, 256, 256))
    assert (tower_cfg.grid_size, tower_cfg.code_depth, tower_cfg.codebook_size) == (16, 4, 16384)
    assert tokens.shape == (1, 256, 768)
    assert tower.config.image_mean == (0.5, 0.5, 0.5)  # SigLIP's normalization, from open_clip's tags
    llm = sum(p.numel() for p in model.llm.parameters())
    trainable = sum(p.numel() for p in model.trainable_parameters())
    assert 250e6 < llm < 400e6
    # bf16 weights + fp32 grads + AdamW (fp32 master, 2 moments) ~ 18 bytes per trainable parameter
    assert trainable * 18 < 16 * 2**30
    print(f"small: LLM {llm / 1e6:.0f}M, trainable {trainable / 1e6:.0f}M, tower {tower.num_parameters()}")


def test_small_preset_loads_for_one_gpu():
    config = load_config(ROOT / "jobs" / "configs" / "small.yaml")
    assert (config.model.tower, config.model.lm) == ("small", "small")
    assert config.cluster.num_workers == 1 and config.cluster.use_gpu
    assert config.lm_train.caption_dropout == 0.1
