"""Vision towers from real checkpoint layouts, saved locally by the tests (tiny random models):
an open_clip checkpoint file, a local open_clip directory (the `hf-hub:` layout), a transformers SigLIP
directory. Each must normalize pixels as its checkpoint says, quantize exactly the source model's own
hidden state after the penultimate block, and survive export -> load with the same codes."""

from __future__ import annotations

import dataclasses
import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from vilau_model.config import get_tower_config
from vilau_model.encoders import checkpoint_normalization, clip_source
from vilau_model.vision_tower import UnifiedVisionTower

SIGLIP_NORM = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
# A tiny open_clip CLIP with the tiny preset's vision shapes (32 px, patch 4, width 64, 4 blocks).
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 64, "layers": 4, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
REGISTERED_NAME = "vilau-test-tiny-siglipnorm"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(3, 3, 32, 32)


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory):
    """open_clip_config.json (model + SigLIP preprocess config) + open_clip_model.safetensors."""
    directory = tmp_path_factory.mktemp("open_clip_dir")
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": SIGLIP_NORM}))
    torch.manual_seed(7)
    model = open_clip.model.CLIP(**TINY_OPEN_CLIP)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "open_clip_model.safetensors"))
    # the same architecture also under an open_clip model name, for the "name + checkpoint file" form
    (directory / "configs").mkdir()
    (directory / "configs" / f"{REGISTERED_NAME}.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(directory / "configs")
    return directory


def hidden_after_penultimate_open_clip(directory, pixels: torch.Tensor) -> torch.Tensor:
    """open_clip loads the directory itself; the output of its second-to-last block, class token dropped."""
    model = open_clip.create_model(f"local-dir:{directory}").eval()
    seen = {}
    model.visual.transformer.resblocks[-2].register_forward_hook(lambda m, i, o: seen.setdefault("h", o))
    with torch.no_grad():
        model.encode_image(pixels)
    return seen["h"][:, 1:]


def tower_config(**overrides):
    return get_tower_config("tiny", **overrides)


def check_export_roundtrip(tower, config, images, tmp_path):
    path = str(tmp_path / "tower.safetensors")
    tower.save(path)
    # loaded where the pretrained checkpoint is absent (e.g. a tokenization actor on another node)
    loaded = UnifiedVisionTower.load(path, dataclasses.replace(config, pretrained=str(tmp_path / "absent"))).eval()
    torch.testing.assert_close(loaded.pixel_mean, tower.pixel_mean)
    torch.testing.assert_close(loaded.pixel_std, tower.pixel_std)
    assert loaded.config.image_mean == pytest.approx(tower.config.image_mean)
    assert torch.equal(loaded.encode_codes(images), tower.encode_codes(images))
    return loaded


def test_checkpoint_file_normalizes_as_siglip_and_export_keeps_it(open_clip_dir, images, tmp_path):
    config = tower_config(clip_model=REGISTERED_NAME, pretrained=str(open_clip_dir / "open_clip_model.safetensors"))
    assert clip_source(config).kind == "open_clip"
    tower = UnifiedVisionTower(config).eval()
    assert tower.config.image_mean == tower.config.image_std == (0.5, 0.5, 0.5)
    assert tower.pixel_mean.flatten().tolist() == tower.pixel_std.flatten().tolist() == [0.5, 0.5, 0.5]
    with torch.no_grad():
        features = tower._features(images)
    torch.testing.assert_close(features, hidden_after_penultimate_open_clip(open_clip_dir, (images - 0.5) / 0.5))
    # the normalization is part of the weights: export -> load keeps it, and the codes
    loaded = check_export_roundtrip(tower, config, images, tmp_path)
    assert "pixel_mean" in loaded.state_dict()
    # an explicit setting wins over the checkpoint's
    explicit = dataclasses.replace(config, image_mean=(0.4, 0.4, 0.4), image_std=(0.2, 0.2, 0.2))
    assert checkpoint_normalization(explicit)[:2] == ((0.4, 0.4, 0.4), (0.2, 0.2, 0.2))


@pytest.mark.parametrize("form", ["pretrained_dir", "local_dir_name"])
def test_local_open_clip_directory(open_clip_dir, images, tmp_path, form):
    if form == "pretrained_dir":
        config = tower_config(pretrained=str(open_clip_dir))
    else:
        config = tower_config(clip_model=f"local-dir:{open_clip_dir}")
    assert clip_source(config).kind == "open_clip_config"
    tower = UnifiedVisionTower(config).eval()
    assert tower.config.image_mean == (0.5, 0.5, 0.5)
    with torch.no_grad():
        features = tower._features(images)
    torch.testing.assert_close(features, hidden_after_penultimate_open_clip(open_clip_dir, (images - 0.5) / 0.5))
    check_export_roundtrip(tower, config, images, tmp_path)


def test_transformers_siglip_directory(images, tmp_path):
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    directory = tmp_path / "siglip"
    torch.manual_seed(3)
    source = SiglipModel(SiglipConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, projection_size=64),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           image_size=32, patch_size=4),
    ))
    source.save_pretrained(directory)
    SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(directory)

    config = tower_config(pretrained=str(directory))
    assert clip_source(config).kind == "siglip_hf"
    tower = UnifiedVisionTower(config).eval()
    assert tower.config.image_mean == tower.config.image_std == (0.5, 0.5, 0.5)

    reference = SiglipModel.from_pretrained(directory).eval()
    seen = {}
    reference.vision_model.encoder.layers[-2].register_forward_hook(lambda m, i, o: seen.setdefault("h", o))
    pixels = (images - 0.5) / 0.5
    with torch.no_grad():
        image_features = reference.get_image_features(pixel_values=pixels)
        features = tower._features(images)
        torch.testing.assert_close(features, seen["h"])
        # the head on top of the split is SigLIP's own last block + post-norm + attention pooling
        torch.testing.assert_close(tower.vision.head(features), image_features)
        text = torch.randint(0, 100, (3, 16))
        torch.testing.assert_close(tower.clip.encode_text(text), reference.get_text_features(input_ids=text))

    # the tower trains on it: vision side only, the text tower frozen
    tower.train()
    out = tower(images, text)
    out["loss"].backward()
    assert tower.clip.model.vision_model.encoder.layers[0].mlp.fc1.weight.grad is not None
    assert all(p.grad is None for p in tower.clip.model.text_model.parameters())
    tower.eval()
    check_export_roundtrip(tower, config, images, tmp_path)


def test_paper_siglip_names_with_a_local_file_use_siglip_normalization(tmp_path):
    weights = tmp_path / "open_clip_model.safetensors"
    weights.write_bytes(b"")  # only its presence matters: no weights are read here
    for preset in ("vilau-256", "vilau-384"):
        config = get_tower_config(preset, pretrained=str(weights))
        mean, std, where = checkpoint_normalization(config)
        assert (mean, std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), (preset, where)
    # and with the open_clip tag itself
    assert checkpoint_normalization(get_tower_config("vilau-384", pretrained="webli"))[:2] == ((0.5,) * 3, (0.5,) * 3)
