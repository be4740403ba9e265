"""GPU check of stage 2: bf16 FSDP2 steps of the unified LM on a ~1B LLaMA-shaped config.

Built the way the trainer builds it (meta device, fully_shard per decoder layer, the depth transformer
one unit, to_empty, per-module init from the seed), bf16 compute with fp32 reduction, attention over
packed rows as `model.attention` flash_varlen (flash-attn installed) or flex (FlexAttention block mask), packed rows of
``--seq`` tokens with half of the positions visual. Prints step time, tokens/s and MFU (model FLOPs
6 * trainable parameters per token, over the GPU's dense bf16 peak). Run through benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestration.config import OptimSection  # noqa: E402
from orchestration.train.fsdp import data_parallel_mesh, mixed_precision, shard_model  # noqa: E402
from orchestration.train.metrics import peak_flops  # noqa: E402
from orchestration.train.optim import build_optimizer, clip_grad_norm  # noqa: E402
from orchestration.train.weights import default_module_init, init_by_name  # noqa: E402


def attention_choice(cuda: bool) -> str:
    """model.attention for this machine: flash-attn's varlen kernel when installed, else FlexAttention on a
    GPU (the paper presets' choice), else the dense mask (CPU: no FlexAttention backward)."""
    try:
        import flash_attn  # noqa: F401

        return "flash_varlen"
    except ImportError:
        return "flex" if cuda else "sdpa_dense"


def batch(rows: int, seq: int, depth: int, vocab: int, codebook: int, device) -> dict[str, torch.Tensor]:
    """Packed rows: 4 samples per row, the second half of each sample visual."""
    g = torch.Generator(device="cpu").manual_seed(0)
    per = seq // 4
    positions = torch.arange(seq) % per
    segments = torch.arange(seq) // per + 1
    visual = positions >= per // 2
    out = {
        "input_ids": torch.randint(0, vocab, (rows, seq), generator=g),
        "codes": torch.randint(0, codebook, (rows, seq, depth), generator=g),
        "is_visual": visual.expand(rows, seq).clone(),
        "position_ids": positions.expand(rows, seq).clone(),
        "segment_ids": segments.expand(rows, seq).clone(),
    }
    out["labels"] = out["input_ids"].clone()
    return {k: v.to(device) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=2, help="packed rows per GPU per step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--activation-checkpointing", action="store_true")
    args = parser.parse_args()

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from vilau_model.config import get_lm_config, get_tower_config
    from vilau_model.unified_lm import UnifiedLM
    from vilau_model.vision_tower import UnifiedVisionTower

    cuda = torch.cuda.is_available()  # without one: a CPU smoke run of the script (small shapes)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tower_cfg = get_tower_config("tiny", codebook_size=16384, code_depth=4)
    lm_cfg = get_lm_config("tiny", hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.heads, vocab_size=32000,
                           max_position_embeddings=args.seq, attention=attention_choice(cuda),
                           depth_layers=3, depth_heads=16, depth_hidden_size=1024)
    with torch.device("meta"):
        model = UnifiedLM(lm_cfg, UnifiedVisionTower(tower_cfg))
    layers = model.llm.get_decoder().layers
    if args.activation_checkpointing:
        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer)
    mesh = data_parallel_mesh(device)
    blocks = list(layers) + [model.depth]  # as stage 2 shards it (orchestration.train.lm.lm_units)
    model = shard_model(model, blocks, mesh, mixed_precision(device), set(model.tower.parameters()))
    model.to_empty(device=device)
    init_by_name(model, seed=0, init_module=default_module_init, skip=lambda name, m: name.startswith("tower"))
    with torch.no_grad():  # the tower's code vectors: any fixed values will do for timing
        model.tower.quantizer.embed.normal_(0, 0.02)
    params = model.trainable_parameters()
    n_params = sum(p.numel() for p in params)
    optimizer = build_optimizer(params, OptimSection(lr=1e-4))
    data = batch(args.rows, args.seq, tower_cfg.code_depth, 32000, tower_cfg.codebook_size, device)
    times = []
    for step in range(args.steps):
        sync()
        t0 = time.perf_counter()
        # One GPU runs without FSDP (no mixed-precision policy): autocast gives it the same bf16 compute.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and mesh is None):
            out = model(**data)
        out["loss"].backward()
        clip_grad_norm(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[min(3, len(times) - 1):])
    tokens_per_s = args.rows * args.seq * dist.get_world_size() / step_s
    peak = peak_flops(device)
    mfu = 6.0 * n_params * tokens_per_s / (peak * dist.get_world_size()) if peak else float("nan")
    if rank == 0:
        name = torch.cuda.get_device_name(device) if cuda else "CPU"
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
        print(f"{name} x {dist.get_world_size()}, {lm_cfg.attention}, "
              f"{n_params / 1e9:.2f}B trainable parameters, {args.rows} x {args.seq} tokens per GPU per step: "
              f"step {step_s * 1000:.0f} ms, {tokens_per_s:,.0f} tokens/s, MFU {100 * mfu:.1f}%, "
              f"peak memory {memory:.1f} GiB, last loss {float(out['loss'].detach()):.3f}")
        print(f"RESULT tokens_per_s={tokens_per_s:.0f}")
        print(f"RESULT mfu={mfu:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
