"""Stage-2 loss normalization: every supervised token weighs the same, however the tokens are spread
over micro-batches (and ranks, which FSDP averages the same way)."""

from __future__ import annotations

import torch

from orchestration.train.lm import LMTask, TowerCodebook, supervised_counts
from vilau_model.config import get_lm_config, get_tower_config
from vilau_model.sequence import IGNORE_INDEX
from vilau_model.unified_lm import UnifiedLM


def _rows(n: int, length: int, supervised: float, seed: int, vocab: int, codebook: int, depth: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    labels = ids.clone()
    labels[torch.rand(n, length, generator=g) > supervised] = IGNORE_INDEX
    return {
        "input_ids": ids,
        "labels": labels,
        "codes": torch.randint(0, codebook, (n, length, depth), generator=g),
        "is_visual": torch.rand(n, length, generator=g) < 0.5,
        "position_ids": torch.arange(length).expand(n, length).clone(),
        "segment_ids": torch.ones(n, length, dtype=torch.long),
    }


def test_lm_loss_over_global_counts_equals_the_loss_of_all_rows_in_one_batch():
    torch.manual_seed(0)
    tower_cfg = get_tower_config("tiny")
    tower = TowerCodebook(tower_cfg)
    tower.quantizer.embed.normal_()
    model = UnifiedLM(get_lm_config("tiny"), tower)
    args = dict(vocab=model.special.vocab_size, codebook=tower_cfg.codebook_size, depth=tower_cfg.code_depth)
    dense = _rows(3, 24, supervised=0.9, seed=1, **args)  # many targets
    sparse = _rows(1, 24, supervised=0.15, seed=2, **args)  # few targets
    both = {k: torch.cat([dense[k], sparse[k]]) for k in dense}

    out = model(**both)
    counts = supervised_counts(both)
    assert counts.tolist() == [int(out["num_text"]), int(out["num_image"])]
    reference = out["loss"]
    reference.backward()
    expected = [p.grad.clone() for p in model.trainable_parameters()]
    model.zero_grad()

    task = LMTask.__new__(LMTask)  # only the normalization, no config needed
    task.prepare_step([dense, sparse])
    total = 0.0
    for part in (dense, sparse):
        loss = task.forward(model, part, step=0)["loss"]
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, reference.detach())
    for p, g in zip(model.trainable_parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)

    # The old normalization (a mean of per-part means) weighs the sparse part's tokens far more.
    mean_of_means = (model(**dense)["loss"] + model(**sparse)["loss"]) / 2
    assert abs(float(mean_of_means) - float(reference)) > 1e-3
