"""Stage 1 with the paper's tokenizer recipe on FSDP2 ranks (gloo, no Ray): LPIPS (a tiny stand-in VGG)
and the PatchGAN, its discriminator replicated on every rank with its own AdamW, the adaptive weight
taken inside the sharded forward, and the discriminator and its optimizer state through a checkpoint.

The step below is the trainer's order (orchestration/train/trainer.py ``train_step``) through the task's
hooks: per micro-batch the tower's backward, then ``after_backward`` (the discriminator's); then the
tower's clip and step, then ``after_optimizer_step`` (the discriminator's all-reduce and step).
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from gloo_ranks import run_on_gloo_ranks
from orchestration.config import load_config
from vilau_model.losses import save_stand_in_perceptual_weights

WORLD, BATCH, ACCUM, GAN_START = 2, 4, 2, 1


def _config(stand_in: str, *extra: str):
    return load_config(None, [
        "tower_train.gan_weight=0.5", f"tower_train.gan_start_step={GAN_START}",
        "tower_train.perceptual_weight=1.0", f"tower_train.perceptual_weights_path={stand_in}",
        f"tower_train.batch_size_per_worker={BATCH}", f"tower_train.grad_accum={ACCUM}",
        "tower_train.optim.lr=2e-3", *extra,
    ])


def _batches(rank: int, step: int, size: int, context: int) -> list[dict]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [{"pixels": torch.randint(0, 256, (BATCH, 3, size, size), dtype=torch.uint8, generator=g),
             "text_tokens": torch.randint(1, 50, (BATCH, context), generator=g)} for _ in range(ACCUM)]


def _build(task, seed: int = 0):
    from orchestration.train.fsdp import build_sharded_model, data_parallel_mesh, mixed_precision
    from orchestration.train.optim import build_optimizer, build_scheduler

    device = torch.device("cpu")
    model = build_sharded_model(task, data_parallel_mesh(device), mixed_precision(device))
    model.to_empty(device=device)
    task.init_weights(model, seed)
    params = task.trainable_parameters(model)
    optimizer = build_optimizer(params, task.section.optim)
    return model, params, [optimizer, *task.extra_optimizers(model)], build_scheduler(optimizer, task.section.optim, 10)


def _step(task, model, params, optimizers, step: int, batches: list[dict]) -> dict[str, float]:
    from orchestration.train.fsdp import set_micro_batch_sync
    from orchestration.train.optim import clip_grad_norm

    scalars: dict[str, float] = {}
    for i, batch in enumerate(batches):
        set_micro_batch_sync(model, is_last=i == ACCUM - 1)
        out = task.forward(model, batch, step)
        (out["loss"] / ACCUM).backward()
        out.update(task.after_backward(model, batch, out, step, 1.0 / ACCUM))
        for k in ("loss", "loss_gan", "loss_perceptual", "gan_adaptive_weight", "loss_discriminator"):
            scalars[k] = scalars.get(k, 0.0) + float(out[k]) / ACCUM
    norm = clip_grad_norm(params, task.section.optim.grad_clip)
    optimizers[0].step()
    optimizers[0].zero_grad(set_to_none=True)
    scalars.update({k: float(v) for k, v in task.after_optimizer_step(model, step, bool(torch.isfinite(norm))).items()})
    return scalars


def _discriminator_state(model, optimizer) -> dict[str, torch.Tensor]:
    state = {f"param/{i}": p.detach().clone() for i, p in enumerate(model.discriminator_parameters())}
    for i, p in enumerate(model.discriminator_parameters()):
        for name, value in optimizer.state[p].items():
            state[f"optim/{i}/{name}"] = value.detach().clone() if torch.is_tensor(value) else torch.tensor(value)
    return state


def _gan_rank(rank: int, world: int, stand_in: str, out: str) -> None:
    import pyarrow.fs as pafs
    from torch.distributed.fsdp import FSDPModule

    from orchestration.train import checkpoint as ckpt
    from orchestration.train.tower import TowerTask

    torch.manual_seed(0)
    task = TowerTask(_config(stand_in))
    model, params, optimizers, scheduler = _build(task)
    assert isinstance(model.decoder.stages[0], FSDPModule) and not isinstance(model.decoder, FSDPModule)
    disc_params = model.discriminator_parameters()
    assert disc_params and not any(hasattr(p, "device_mesh") for p in disc_params)  # whole, not DTensors
    assert not {id(p) for p in disc_params} & {id(p) for p in params}
    assert model.perceptual is not None
    cfg = task.tower_cfg
    before = [p.detach().clone() for p in disc_params]
    history = []
    for step in range(3):
        history.append(_step(task, model, params, optimizers, step, _batches(rank, step, cfg.image_size, cfg.context_length)))
        if step < GAN_START:  # before its start the discriminator neither trains nor feeds the loss
            assert all(torch.equal(a, b) for a, b in zip(before, disc_params))
    state = ckpt.TrainState(world_size=world)
    state.start_segment()
    for _ in range(3):
        state.advance()
    directory = os.path.join(out, "checkpoint_step0000003_x")
    ckpt.save_checkpoint(directory, model, optimizers, scheduler, state, filesystem=pafs.LocalFileSystem())
    saved = _discriminator_state(model, optimizers[1])

    # A fresh model (other seed) restored from the checkpoint holds the same discriminator and AdamW state.
    fresh_task = TowerTask(_config(stand_in))
    fresh, fresh_params, fresh_optimizers, fresh_scheduler = _build(fresh_task, seed=1)
    assert not torch.equal(fresh.discriminator_parameters()[0], disc_params[0])
    ckpt.load_checkpoint(directory, fresh, fresh_optimizers, fresh_scheduler, filesystem=pafs.LocalFileSystem())
    restored = _discriminator_state(fresh, fresh_optimizers[1])
    torch.save({"history": history, "saved": saved, "restored": restored,
                "discriminator": [p.detach() for p in disc_params]}, os.path.join(out, f"rank{rank}.pt"))


def test_gan_and_lpips_train_on_fsdp_ranks_with_a_replicated_discriminator_that_checkpoints(tmp_path):
    stand_in = save_stand_in_perceptual_weights(str(tmp_path / "stand_in_vgg.safetensors"))
    with tempfile.TemporaryDirectory(dir=tmp_path) as out:
        run_on_gloo_ranks(_gan_rank, WORLD, stand_in, out)
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(WORLD)]
    for r in ranks:
        for step, scalars in enumerate(r["history"]):
            assert all(torch.isfinite(torch.tensor(v)) for v in scalars.values()), scalars
            assert scalars["loss_perceptual"] > 0
            active = step >= GAN_START
            assert (scalars["gan_adaptive_weight"] > 0) == active and (scalars["loss_gan"] != 0) == active
            assert (scalars["loss_discriminator"] > 0) == active
            assert (scalars["discriminator_grad_norm"] > 0) == active
        # the restored discriminator and its optimizer state are the saved ones, tensor for tensor
        assert r["saved"].keys() == r["restored"].keys() and any(k.endswith("exp_avg_sq") for k in r["saved"])
        for key, value in r["saved"].items():
            torch.testing.assert_close(r["restored"][key], value, rtol=0, atol=0, msg=key)
    # replicated: both ranks trained on different images, and hold the same discriminator (averaged gradients)
    for a, b in zip(ranks[0]["discriminator"], ranks[1]["discriminator"]):
        assert torch.equal(a, b)
    assert ranks[0]["history"][-1]["loss_discriminator"] != ranks[1]["history"][-1]["loss_discriminator"]


def test_a_checkpoint_from_before_the_gan_start_holds_the_discriminator_optimizer_state():
    """The discriminator's AdamW state exists from the start (a step at learning rate 0), so a checkpoint
    saved before its first real step restores into a fresh run like any other."""
    from orchestration.train.tower import TowerTask

    with tempfile.TemporaryDirectory() as tmp:
        stand_in = save_stand_in_perceptual_weights(os.path.join(tmp, "vgg.safetensors"))
        task = TowerTask(_config(stand_in, "tower_train.gan_start_step=100"))
        model = task.build_model()
    (optimizer,) = task.extra_optimizers(model)
    before = [p.detach().clone() for p in model.discriminator_parameters()]
    assert all(set(optimizer.state[p]) == {"step", "exp_avg", "exp_avg_sq"} for p in model.discriminator_parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.discriminator_parameters()))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-3) and optimizer.param_groups[0]["betas"] == (0.5, 0.9)
    assert task.after_optimizer_step(model, 0, True)["discriminator_grad_norm"].item() == 0.0  # not started: no step
    assert all(torch.equal(a, b) for a, b in zip(before, model.discriminator_parameters()))


def _checkpoint_sums(checkpoint_dir: str, local) -> dict[str, list[float]]:
    """[sum, sum of squares] of every tensor of a sharded checkpoint, read back without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from orchestration.train.checkpoint import flat_tensors

    dcp_to_torch_save(checkpoint_dir, local)
    state = torch.load(local, weights_only=False)
    return {name: [float(t.double().sum()), float((t.double() ** 2).sum())]
            for name, t in flat_tensors({"model": state["model"], "optim": state["optim"]}).items()}


@pytest.mark.e2e
def test_the_recipe_trains_in_a_ray_train_fit_and_a_restart_restores_the_discriminator(tiny_config, tmp_path):
    """Two FSDP2 workers through the real trainer: LPIPS (stand-in) and the GAN from step 1, rank 1 killed
    after step 3; the restarted group restores the step-2 checkpoint, discriminator and its AdamW state
    included, and runs to the end without a non-finite loss."""
    import json
    from pathlib import Path

    from mlflow import MlflowClient

    from orchestration.launch import fit_tower
    from orchestration.train.outputs import load_tower_export

    stand_in = save_stand_in_perceptual_weights(str(tmp_path / "stand_in_vgg.safetensors"))
    config = tiny_config(
        "run_name=gan", "tower_train.steps=4", "tower_train.batch_size_per_worker=4", "tower_train.log_every=1",
        "tower_train.checkpoint_every=2", "tower_train.eval_every=4", "tower_train.gan_weight=0.5",
        f"tower_train.gan_start_step={GAN_START}", "tower_train.perceptual_weight=1.0",
        f"tower_train.perceptual_weights_path={stand_in}", "cluster.num_workers=2", "cluster.max_failures=1",
        "cluster.fault_injection.stage=tower", "cluster.fault_injection.fail_at_step=3",
        "cluster.fault_injection.rank=1", "cluster.fault_injection.record_restored_state=true",
    )
    result = fit_tower(config)
    assert result.steps_done == 4 and result.history == [[1, 2], [3, 4]]
    run_dir = Path(config.cluster.storage_path).resolve() / result.run_name
    restored = json.loads((run_dir / "restored_state_step0000002.json").read_text())
    expected = _checkpoint_sums(restored["checkpoint"], tmp_path / "full.pt")
    assert set(restored["tensors"]) == set(expected)
    discriminator_state = [k for k in expected if k.startswith("optim/state/discriminator.") and k.endswith("exp_avg_sq")]
    assert discriminator_state and any(k.startswith("model/discriminator.") for k in expected)
    for name, sums in expected.items():
        assert restored["tensors"][name] == pytest.approx(sums, rel=1e-9, abs=1e-12), name

    client = MlflowClient(tracking_uri=config.tracking_uri)

    def history(name: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, name)}

    assert all(torch.isfinite(torch.tensor(v)) for v in history("loss").values())
    assert history("nonfinite_skipped")[4] == 0
    assert history("loss_discriminator")[4] > 0 and history("gan_adaptive_weight")[4] > 0
    assert set(history("discriminator_rank_divergence").values()) == {0.0}  # replicated, identical on both ranks
    tower = load_tower_export(result.export_path)
    assert tower.discriminator is not None and "eval/psnr" in result.metrics
