"""Exports written from a sharded (DCP) checkpoint without building or gathering the model: the tower's
safetensors and the stage-2 export (Hugging Face LLM directory, sharded) stream a few tensors at a time,
and what they write loads back to exactly the weights that were checkpointed."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

from orchestration.config import load_config
from orchestration.train import export


def _save_checkpoint(model_state: dict[str, torch.Tensor], directory) -> None:
    """A checkpoint laid out as the trainer writes it ({"model", "optim"}), 0-d parameters stored as
    1-element vectors as FSDP2 holds them."""
    model_state = {k: (v.reshape(1) if v.dim() == 0 else v).clone() for k, v in model_state.items()}
    dcp.save({"model": model_state, "optim": {"state": {}}}, checkpoint_id=str(directory), no_dist=True)


@pytest.fixture()
def read_groups(monkeypatch):
    """The bytes of every group the export reads from the checkpoint, with a small group limit."""
    monkeypatch.setattr(export, "READ_GROUP_BYTES", 64 << 10)
    groups: list[int] = []
    original = export.CheckpointTensors.read

    def counting_read(self, names):
        groups.append(sum(self.nbytes(n) for n in names) if len(names) > 1 else 0)
        return original(self, names)

    monkeypatch.setattr(export.CheckpointTensors, "read", counting_read)
    return groups


def test_safetensors_written_tensor_by_tensor_read_back_by_safetensors(tmp_path):
    from safetensors import safe_open

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, 2).bfloat16(),
               "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4)}
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    path = tmp_path / "t.safetensors"
    export.write_safetensors(lambda p: open(p, "wb"), str(path), specs, iter(tensors.items()), metadata={"format": "pt"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(tensors)
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k
    with pytest.raises(export.ExportError, match="expected b"):
        export.write_safetensors(lambda p: open(p, "wb"), str(tmp_path / "bad.safetensors"), specs,
                                 iter([("a", tensors["a"]), ("c", tensors["c"])]))


def test_tower_export_from_a_sharded_checkpoint(tmp_path, read_groups):
    from orchestration.train.outputs import load_tower_export
    from orchestration.data.tower_data import tower_config
    from orchestration.train.tower import tower_loss_config
    from vilau_model.vision_tower import UnifiedVisionTower

    config = load_config(None, [f"output_dir={tmp_path}"])
    torch.manual_seed(3)
    tower = UnifiedVisionTower(tower_config(config), tower_loss_config(config))
    state = tower.state_dict()
    _save_checkpoint(state, tmp_path / "ckpt")

    info = export.export_tower_from_checkpoint(config, str(tmp_path / "ckpt"), str(tmp_path / "export"))
    loaded = load_tower_export(str(tmp_path / "export")).state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert torch.equal(info["ema_count"], state["quantizer.ema_count"])
    total = sum(v.numel() * v.element_size() for v in state.values())
    assert len(read_groups) > 3 and max(read_groups) <= 64 << 10 < total  # never the whole model at once


def test_lm_export_from_a_sharded_checkpoint_loads_with_from_pretrained(tmp_path, read_groups, monkeypatch):
    from orchestration.data.lm_data import directory_files, lm_config
    from orchestration.train.outputs import load_lm_export
    from orchestration.train.outputs import save_tower_export
    from vilau_model.config import get_tower_config
    from vilau_model.tokenizer import SpecialIds, train_bpe_tokenizer
    from vilau_model.unified_lm import UnifiedLM
    from vilau_model.vision_tower import UnifiedVisionTower

    monkeypatch.setattr(export, "HF_SHARD_BYTES", 256 << 10)  # several llm/model-*.safetensors files
    config = load_config(None, [f"output_dir={tmp_path}"])
    tokenizer = train_bpe_tokenizer(["a red circle in the top left", "a blue square"] * 20, tmp_path / "tok")
    torch.manual_seed(0)
    tower = UnifiedVisionTower(get_tower_config("tiny"))
    save_tower_export(tower, str(tmp_path / "tower"))
    model = UnifiedLM(lm_config(config), tower, SpecialIds.from_tokenizer(tokenizer))
    trained = {k: v for k, v in model.state_dict().items() if not k.startswith("tower.")}  # as checkpoints hold it
    _save_checkpoint(trained, tmp_path / "ckpt")

    export.export_lm_from_checkpoint(config, str(tmp_path / "ckpt"), str(tmp_path / "export"),
                                     directory_files(str(tmp_path / "tok")), str(tmp_path / "tower"))
    index = json.loads((tmp_path / "export" / "llm" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    loaded, _ = load_lm_export(str(tmp_path / "export"))
    reloaded = loaded.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded[key], value), key


def test_lm_export_config_carries_the_rope_scaling_of_the_run(tmp_path, read_groups):
    """Plain transformers loading of export/llm gets the RoPE the model was trained with, also when the
    LLM came from a pretrained directory whose own config.json has none."""
    from transformers import AutoConfig

    from orchestration.data.lm_data import directory_files, lm_config
    from orchestration.train.outputs import save_tower_export
    from vilau_model.config import get_lm_config, get_tower_config
    from vilau_model.tokenizer import SpecialIds, train_bpe_tokenizer
    from vilau_model.unified_lm import UnifiedLM, build_llm
    from vilau_model.vision_tower import UnifiedVisionTower

    tokenizer = train_bpe_tokenizer(["a red circle in the top left", "a blue square"] * 20, tmp_path / "tok")
    special = SpecialIds.from_tokenizer(tokenizer)
    torch.manual_seed(0)
    build_llm(get_lm_config("tiny"), special.vocab_size).save_pretrained(tmp_path / "pretrained")
    assert "rope_scaling" not in json.loads((tmp_path / "pretrained" / "config.json").read_text()) or \
        json.loads((tmp_path / "pretrained" / "config.json").read_text())["rope_scaling"] is None
    config = load_config(None, [f"output_dir={tmp_path}", f"model.lm_path={tmp_path / 'pretrained'}",
                                "model.rope_scaling.type=linear", "model.rope_scaling.factor=2.0"])
    tower = UnifiedVisionTower(get_tower_config("tiny"))
    save_tower_export(tower, str(tmp_path / "tower"))
    model = UnifiedLM(lm_config(config), tower, special)
    assert model.llm.config.rope_scaling["factor"] == 2.0
    _save_checkpoint({k: v for k, v in model.state_dict().items() if not k.startswith("tower.")}, tmp_path / "ckpt")

    export.export_lm_from_checkpoint(config, str(tmp_path / "ckpt"), str(tmp_path / "export"),
                                     directory_files(str(tmp_path / "tok")), str(tmp_path / "tower"))
    written = json.loads((tmp_path / "export" / "llm" / "config.json").read_text())["rope_scaling"]
    assert written["factor"] == 2.0 and written.get("rope_type", written.get("type")) == "linear"
    assert AutoConfig.from_pretrained(tmp_path / "export" / "llm").rope_scaling["factor"] == 2.0

    from orchestration.train.outputs import save_lm_export  # the in-process export writes it too

    save_lm_export(model, tokenizer, str(tmp_path / "saved"))
    assert json.loads((tmp_path / "saved" / "llm" / "config.json").read_text())["rope_scaling"]["factor"] == 2.0
