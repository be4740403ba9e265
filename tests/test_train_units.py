"""The trainer's parts that need no cluster: LR schedule, the non-finite guard, checkpoints that are
cut off half-way, and the fallback to the newest complete one."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from orchestration.config import OptimSection
from orchestration.train import checkpoint as ckpt
from orchestration.train.optim import build_optimizer, build_scheduler, lr_factor
from orchestration.train.trainer import NonFiniteGuard, NonFiniteLossError


def test_warmup_then_cosine_to_the_floor():
    total, warmup_fraction, floor = 100, 0.1, 0.1
    factors = [lr_factor(s, total, warmup_fraction, floor) for s in range(total)]
    assert factors[0] < factors[5] < factors[9] <= 1.0  # linear warmup over 10 steps
    assert factors[10] == pytest.approx(1.0)  # peak right after warmup
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # then only down
    assert factors[-1] == pytest.approx(floor, abs=0.01)


def test_non_finite_losses_are_skipped_and_a_run_of_them_stops():
    guard = NonFiniteGuard(limit=3, stage="tower")
    assert guard.check(True, 1, 1.0)
    assert not guard.check(False, 2, float("nan"))
    assert not guard.check(False, 3, float("inf"))
    assert guard.check(True, 4, 0.9)  # a good step resets the run
    assert guard.skipped == 2
    guard.check(False, 5, float("nan"))
    guard.check(False, 6, float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses in a row .*step 7.*optim.lr"):
        guard.check(False, 7, float("nan"))


def _model_and_optim():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    optim = build_optimizer(list(model.parameters()), OptimSection(lr=0.1))
    sched = build_scheduler(optim, OptimSection(lr=0.1), total_steps=10)
    return model, optim, sched


def _train(model, optim, sched, state, steps):
    for _ in range(steps):
        model(torch.randn(3, 4)).pow(2).mean().backward()
        optim.step()
        optim.zero_grad()
        sched.step()
        state.advance()


class Died(Exception):
    pass


def test_a_save_cut_off_half_way_leaves_the_previous_checkpoint_loadable(tmp_path):
    model, optim, sched = _model_and_optim()
    state = ckpt.TrainState()
    state.start_segment()
    _train(model, optim, sched, state, 2)
    good = str(tmp_path / "checkpoint_step0000002_a")
    ckpt.save_checkpoint(good, model, [optim], sched, state)
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    _train(model, optim, sched, state, 2)
    cut = str(tmp_path / "checkpoint_step0000004_b")

    def die():
        raise Died  # the process is gone after writing its shards, before finishing the save

    with pytest.raises(Died):
        ckpt.save_checkpoint(cut, model, [optim], sched, state, before_complete=die)
    assert os.path.isfile(os.path.join(cut, ".metadata"))  # shards are there ...
    with pytest.raises(ckpt.IncompleteCheckpointError, match="never finished"):  # ... but it is refused
        ckpt.check_complete(cut)
    assert ckpt.newest_complete_sibling(cut, None, ckpt.checkpoint_step(cut)) == good

    fresh, fresh_optim, fresh_sched = _model_and_optim()
    restored = ckpt.load_checkpoint(good, fresh, [fresh_optim], fresh_sched)
    assert restored.step == 2 and restored.history == [[1, 2]]
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    assert fresh_sched.last_epoch == 2
    assert all(s["step"].item() == 2 for s in fresh_optim.state.values())  # Adam steps, not one more
