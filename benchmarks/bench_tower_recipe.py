"""Stage 1 with the tokenizer recipe (LPIPS + PatchGAN) against the MSE-only loss: held-back PSNR.

Two tiny-tower trainings in this process, identical but for the reconstruction loss: the tiny default
(pixel MSE on [-1, 1]), and the same plus LPIPS (weight 1) and the PatchGAN hinge term (gan_weight,
VQGAN adaptive weight) from gan_start_step on, the discriminator stepping with its own AdamW after the
tower's step. Both go through stage 1's own task (``orchestration.train.tower.TowerTask``: its model,
loss, discriminator hooks and optimizers), driven in the trainer's order on one rank without Ray: per
step the tower's backward, the discriminator's backward, the tower's clipped AdamW step, then the
discriminator's. Same seed, same images, same schedule (the tiny preset's: lr 4e-3, 10% warmup, cosine).

Data: generated scenes (a coloured shape on a plain background, the tiny default's data) at the tiny
tower's 32 px; held back: 256 scenes of another seed. The LPIPS network is a random VGG16-layout
stand-in (no pretrained VGG on this machine): it exercises the loss path and its cost, but random
features are no perceptual metric, so the recipe's run is not expected to win on anything here. PSNR
is a pixel metric, which LPIPS and GAN terms trade away by design; what they buy (sharper textures,
rFID) needs real images, the real VGG and many more steps. The numbers are reported as they come.

    python benchmarks/bench_tower_recipe.py [--steps 150] [--batch 32] [--gan-start 50] [--gan-weight 0.5]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def scenes(seed: int, n: int, size: int):
    from orchestration.data.scenes import render_scene

    rng = np.random.default_rng(seed)
    images, captions = [], []
    for _ in range(n):
        image, caption, _ = render_scene(rng, size)
        images.append(image)
        captions.append(caption)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions


def train(overrides: list[str], args, train_pixels, train_captions, held_pixels) -> dict:
    from orchestration.config import load_config
    from orchestration.train.fsdp import build_sharded_model, mixed_precision
    from orchestration.train.optim import build_optimizer, build_scheduler, clip_grad_norm
    from orchestration.train.tower import TowerTask
    from vilau_model.evaluation import evaluate_tower

    config = load_config(None, [f"tower_train.steps={args.steps}", *overrides])
    torch.manual_seed(config.seed)
    task = TowerTask(config)
    model = build_sharded_model(task, None, mixed_precision(torch.device("cpu")))  # one rank: no FSDP
    model.to_empty(device="cpu")
    task.init_weights(model, config.seed)
    params = task.trainable_parameters(model)
    optimizer = build_optimizer(params, task.section.optim)
    scheduler = build_scheduler(optimizer, task.section.optim, args.steps)
    task.extra_optimizers(model)
    tokens = model.tokenize(train_captions)
    generator = torch.Generator().manual_seed(0)
    curve, nonfinite, started = [], 0, time.perf_counter()
    for step in range(args.steps):
        index = torch.randint(0, train_pixels.shape[0], (args.batch,), generator=generator)
        batch = {"pixels": train_pixels[index], "text_tokens": tokens[index]}
        model.train()
        out = task.forward(model, batch, step)
        out["loss"].backward()
        out.update(task.after_backward(model, batch, out, step, 1.0))
        norm = clip_grad_norm(params, task.section.optim.grad_clip)
        finite = bool(torch.isfinite(norm)) and bool(torch.isfinite(out["loss"]))
        nonfinite += not finite
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.update(task.after_optimizer_step(model, step, finite))
        scheduler.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            metrics = evaluate_tower(model, held_pixels.float() / 255.0)
            curve.append((step + 1, metrics["psnr"], metrics["ssim"]))
            extra = ""
            if "loss_discriminator" in out:
                extra = (f", loss_gan {out['loss_gan'].item():+.3f}, adaptive weight {out['gan_adaptive_weight'].item():.3f}, "
                         f"loss_discriminator {out['loss_discriminator'].item():.3f}")
            print(f"  step {step + 1:4d}: held-back PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}; "
                  f"loss_pixel {out['loss_pixel'].item():.4f}, loss_perceptual {out['loss_perceptual'].item():.4f}{extra}",
                  flush=True)
    return {"curve": curve, "seconds": time.perf_counter() - started, "nonfinite": nonfinite,
            "discriminator": sum(p.numel() for p in model.discriminator_parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--gan-start", type=int, default=50)
    parser.add_argument("--gan-weight", type=float, default=0.5)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--held-back", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from vilau_model.config import get_tower_config
    from vilau_model.losses import save_stand_in_perceptual_weights

    size = get_tower_config("tiny").image_size
    train_pixels, train_captions = scenes(0, 2048, size)
    held_pixels, _ = scenes(12345, args.held_back, size)
    print(f"tiny tower ({size} px), {args.steps} steps of {args.batch}, held-back {args.held_back} scenes; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        stand_in = save_stand_in_perceptual_weights(os.path.join(tmp, "stand_in_vgg.safetensors"))
        print("MSE only (the tiny default):", flush=True)
        mse = train([], args, train_pixels, train_captions, held_pixels)
        print(f"MSE + LPIPS (stand-in VGG) + PatchGAN (weight {args.gan_weight}, from step {args.gan_start}):", flush=True)
        recipe = train([
            "tower_train.perceptual_weight=1.0", f"tower_train.perceptual_weights_path={stand_in}",
            f"tower_train.gan_weight={args.gan_weight}", f"tower_train.gan_start_step={args.gan_start}",
        ], args, train_pixels, train_captions, held_pixels)

    (_, mse_psnr, mse_ssim), (_, gan_psnr, gan_ssim) = mse["curve"][-1], recipe["curve"][-1]
    print(f"\nheld-back PSNR after {args.steps} steps: MSE only {mse_psnr:.2f} dB, recipe {gan_psnr:.2f} dB "
          f"({gan_psnr - mse_psnr:+.2f} dB); SSIM {mse_ssim:.3f} vs {gan_ssim:.3f}")
    print(f"time: {mse['seconds']:.1f} s vs {recipe['seconds']:.1f} s (x{recipe['seconds'] / mse['seconds']:.2f}); "
          f"discriminator {recipe['discriminator'] / 1e6:.2f} M parameters; non-finite steps {mse['nonfinite']} / {recipe['nonfinite']}")
    assert all(math.isfinite(v) for _, p, s in mse["curve"] + recipe["curve"] for v in (p, s))
    print(f"RESULT mse_only_psnr_db={mse_psnr:.2f}")
    print(f"RESULT gan_psnr_db={gan_psnr:.2f}")
    print(f"RESULT gan_minus_mse_psnr_db={gan_psnr - mse_psnr:.2f}")
    print(f"RESULT recipe_time_ratio={recipe['seconds'] / mse['seconds']:.2f}")
    print(f"RESULT gan_nonfinite_steps={recipe['nonfinite']}")


if __name__ == "__main__":
    main()
