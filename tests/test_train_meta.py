"""Meta-device builds on real FSDP2 workers (Ray Train, CPU/gloo): each rank materializes only its
shards, loads a LLaMA checkpoint written by ``save_pretrained`` (several safetensors files) slice by
slice, and gets the same random init as a single process; HSDP meshes from the config."""

from __future__ import annotations

import pytest
import torch

VOCAB, FILE_VOCAB = 70, 64  # the model has 6 more rows (added markers) than the checkpoint


def _llama_config(vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def _meta_sharded_llama(hsdp_replicas: int = 1):
    """Build on meta, shard every decoder layer and the root, then storage for this rank's shards."""
    from transformers import LlamaForCausalLM

    from orchestration.train.fsdp import data_parallel_mesh, mixed_precision, shard_model

    device = torch.device("cpu")
    with torch.device("meta"):
        model = LlamaForCausalLM(_llama_config(VOCAB))
    mesh = data_parallel_mesh(device, hsdp_replicas)
    model = shard_model(model, list(model.model.layers), mesh, mixed_precision(device))
    model.to_empty(device=device)
    return model, mesh


def meta_worker(loop_config: dict) -> list[dict]:
    import torch.distributed as dist
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    from orchestration.train.weights import (
        clean_name,
        init_by_name,
        load_pretrained,
        local_index,
        local_tensor,
        safetensors_files,
    )

    rank = dist.get_rank()
    findings: dict = {"rank": rank}

    # 1. Pretrained: every local shard equals its slice of the checkpoint's tensors.
    model, mesh = _meta_sharded_llama()
    findings["mesh"] = tuple(mesh.shape)
    grow = ["model.embed_tokens.weight", "lm_head.weight"]
    loaded = load_pretrained(model, loop_config["checkpoint"], seed=0, grow_rows=grow)
    checked, sharded, mismatched = 0, 0, []
    for path in safetensors_files(loop_config["checkpoint"]):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                param = dict((clean_name(n), p) for n, p in model.named_parameters())[key]
                full = f.get_tensor(key)
                if key in grow:  # the added rows start at the mean of the checkpoint's rows
                    full = torch.cat([full, full.mean(dim=0, keepdim=True).expand(VOCAB - FILE_VOCAB, -1)])
                sharded += isinstance(param, DTensor) and local_tensor(param).shape != param.shape
                if not torch.equal(local_tensor(param), full[local_index(param)]):
                    mismatched.append(key)
                checked += 1
    findings.update(loaded=len(loaded), checked=checked, sharded=sharded, mismatched=mismatched)
    rotary = model.model.rotary_emb
    findings["inv_freq_ok"] = bool(torch.allclose(rotary.inv_freq, loop_config["inv_freq"]))

    # 2. Random init: the same tensors as a single process initializing the whole model.
    fresh, _ = _meta_sharded_llama()
    init_by_name(fresh, seed=7)
    findings["init_mismatched"] = [
        clean_name(n) for n, p in fresh.named_parameters()
        if not torch.equal(local_tensor(p), loop_config["single_process_init"][clean_name(n)][local_index(p)])
    ]

    # 3. HSDP: 2 replicas of 1 shard each.
    hsdp, hsdp_mesh = _meta_sharded_llama(hsdp_replicas=2)
    findings["hsdp_mesh"] = (tuple(hsdp_mesh.shape), hsdp_mesh.mesh_dim_names)
    findings["hsdp_placements"] = str(hsdp.lm_head.weight.placements)

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, findings)
    return gathered  # rank 0's is the run's return value


@pytest.mark.e2e
def test_two_fsdp_workers_build_on_meta_and_load_a_multi_file_llama_checkpoint_shard_wise(ray_session, tmp_path):
    import sys

    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from transformers import LlamaForCausalLM

    from orchestration.train.weights import init_by_name, safetensors_files

    torch.manual_seed(0)
    pretrained = LlamaForCausalLM(_llama_config(FILE_VOCAB))
    checkpoint = tmp_path / "llama"
    pretrained.save_pretrained(checkpoint, safe_serialization=True, max_shard_size="20KB")
    assert len(safetensors_files(str(checkpoint))) >= 2  # several files, with an index

    with torch.device("meta"):
        single = LlamaForCausalLM(_llama_config(VOCAB))
    single.to_empty(device="cpu")
    init_by_name(single, seed=7)  # one process, nothing sharded

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    trainer = TorchTrainer(
        meta_worker,
        train_loop_config={
            "checkpoint": str(checkpoint),
            "single_process_init": {k: v.clone() for k, v in single.state_dict().items()},
            "inv_freq": pretrained.model.rotary_emb.inv_freq.clone(),
        },
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(name="meta", storage_path=str(tmp_path / "ray")),
    )
    findings = trainer.fit().return_value
    n_tensors = len(pretrained.state_dict())
    for f in findings:
        assert f["mesh"] == (2,)
        assert f["loaded"] == n_tensors and f["checked"] == n_tensors
        assert f["sharded"] > 0  # the ranks really hold parts, not copies
        assert f["mismatched"] == [], f
        assert f["inv_freq_ok"]
        assert f["init_mismatched"] == [], f
        assert f["hsdp_mesh"] == ((2, 1), ("replicate", "shard"))
        assert "Replicate()" in f["hsdp_placements"] and "Shard(dim=0)" in f["hsdp_placements"]


def test_hsdp_replicas_must_divide_the_workers_and_fail_before_any_cluster_work():
    from orchestration.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"hsdp_replicas=3 must divide num_workers=4"):
        load_config(None, ["cluster.num_workers=4", "cluster.hsdp_replicas=3"])
    assert load_config(None, ["cluster.num_workers=4", "cluster.hsdp_replicas=2"]).cluster.hsdp_replicas == 2
    assert load_config(None, []).cluster.hsdp_replicas == 1  # plain FSDP by default
