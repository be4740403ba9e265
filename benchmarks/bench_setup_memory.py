"""Peak host memory of a worker while it sets up a sharded LLaMA: meta build + shard-wise load vs
building the whole model and then sharding it, in the same run.

A LLaMA-shaped model of >= 1.5 GB in fp32 is written once with ``save_pretrained`` (several safetensors
files). Then, for each variant, a fresh 2-worker Ray Train run (CPU, gloo, FSDP2) sets it up and every
worker reports its peak RSS during setup (VmHWM, reset just before setup via /proc/self/clear_refs):

- whole-random:       the whole model built and initialized on every rank, then ``fully_shard`` (what
                      the trainer did before for a model without pretrained weights);
- sharded-random:     built under ``torch.device("meta")``, ``fully_shard``, ``to_empty``, then the
                      per-module seeded init (``orchestration.train.weights.init_by_name``);
- whole-pretrained:   ``from_pretrained`` on every rank, then ``fully_shard`` (the trainer before, with
                      ``model.lm_path``; transformers maps the safetensors files, so on a CPU only the
                      pages that sharding copies ever become resident);
- sharded-pretrained: meta build, ``fully_shard``, ``to_empty``, then each rank reads only its slices
                      of the safetensors files (``orchestration.train.weights.load_pretrained``); the
                      same shards as whole-pretrained (checked with a checksum per rank).

    python benchmarks/bench_setup_memory.py [--hidden 1536 --layers 12 --intermediate 4096 --vocab 32000]

Last line: ``RESULT setup_peak_ratio=<sharded/whole>`` (random init; peak RSS, max over workers; goal
<= 0.6); the line before it, the same ratio for the pretrained load.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1024**3


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def setup_worker(loop_config: dict) -> dict:
    import gc

    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    from orchestration.train.fsdp import data_parallel_mesh, mixed_precision, shard_model
    from orchestration.train.weights import init_by_name, load_pretrained, local_tensor

    torch.set_num_threads(1)
    path, variant = loop_config["path"], loop_config["variant"]
    device = torch.device("cpu")
    gc.collect()
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = rss_kib("VmRSS")
    t0 = time.perf_counter()
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if variant == "whole-random":  # the old trainer: the whole model built (and initialized) on every rank
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    elif variant == "whole-pretrained":  # the old trainer with model.lm_path: from_pretrained on every rank
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    mesh = data_parallel_mesh(device)
    model = shard_model(model, list(model.model.layers), mesh, mixed_precision(device))
    if variant == "sharded-random":
        model.to_empty(device=device)
        init_by_name(model, seed=0)
    elif variant == "sharded-pretrained":
        model.to_empty(device=device)
        load_pretrained(model, path, seed=0)
    gc.collect()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        checksum = float(sum(local_tensor(p).double().sum() for p in model.parameters()))
    out = {
        "rank": dist.get_rank(),
        "rss_before_gib": before / 1024**2,
        "peak_gib": rss_kib("VmHWM") / 1024**2,
        "after_gib": rss_kib("VmRSS") / 1024**2,
        "seconds": seconds,
        "checksum": checksum,
    }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, out)
    return gathered


def run_variant(path: str, variant: str, storage: str) -> list[dict]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        setup_worker,
        train_loop_config={"path": path, "variant": variant},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(name=f"setup-{variant}", storage_path=storage),
    )
    return trainer.fit().return_value


def write_checkpoint(directory: str, args) -> float:
    """A LLaMA of the given shapes written by save_pretrained in several files; returns its fp32 GB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                         num_key_value_heads=args.hidden // 128, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(i))
    size = sum(p.numel() for p in model.parameters()) * 4 / 1e9
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="400MB")
    del model
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()

    import ray

    work = tempfile.mkdtemp(prefix="bench_setup_memory-")
    try:
        path = f"{work}/llama"
        size = write_checkpoint(path, args)
        files = len(list(Path(path).glob("*.safetensors")))
        print(f"LLaMA-shaped model: {size:.2f} GB in fp32, {files} safetensors files", flush=True)
        ray.init(address="local", num_cpus=8, include_dashboard=False)
        results = {}
        for variant in ("whole-random", "sharded-random", "whole-pretrained", "sharded-pretrained"):
            results[variant] = run_variant(path, variant, f"{work}/ray")
            for r in results[variant]:
                print(f"{variant:18s} rank {r['rank']}: RSS before {r['rss_before_gib']:.2f} GiB, peak {r['peak_gib']:.2f} GiB, "
                      f"after {r['after_gib']:.2f} GiB, setup {r['seconds']:.1f} s", flush=True)
        for a, b in zip(results["whole-pretrained"], results["sharded-pretrained"]):
            assert abs(a["checksum"] - b["checksum"]) <= 1e-6 * max(1.0, abs(a["checksum"])), (a, b)
        peak = {v: max(r["peak_gib"] for r in rs) for v, rs in results.items()}
        growth = {v: max(r["peak_gib"] - r["rss_before_gib"] for r in rs) for v, rs in results.items()}
        for kind in ("random", "pretrained"):
            whole, sharded = f"whole-{kind}", f"sharded-{kind}"
            print(f"{kind:10s} init: peak RSS per worker during setup (max over 2 workers) whole-then-shard "
                  f"{peak[whole]:.2f} GiB, meta + shard-wise {peak[sharded]:.2f} GiB, ratio {peak[sharded] / peak[whole]:.3f}; "
                  f"growth over the pre-setup RSS {growth[whole]:.2f} vs {growth[sharded]:.2f} GiB, "
                  f"ratio {growth[sharded] / growth[whole]:.3f}")
        print("pretrained: both paths end with the same shards (checksums per rank agree)")
        print(f"RESULT setup_peak_ratio_pretrained={peak['sharded-pretrained'] / peak['whole-pretrained']:.3f}")
        print(f"RESULT setup_peak_ratio={peak['sharded-random'] / peak['whole-random']:.3f}")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
