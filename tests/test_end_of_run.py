"""The end of a run never holds a rank in a collective: a deliberately slow export (12 s) under a
process-group timeout of 10 s still finishes the run, because the export runs as its own Ray task after
every worker of the group has returned. (Exporting on rank 0 while the other ranks waited in a barrier,
as the trainer once did, fails this run with a gloo timeout.)"""

from __future__ import annotations

import os

import pytest

# The delay only has to outlast the timeout: a rank held in a collective for the export would time out first.
PROCESS_GROUP_TIMEOUT_S, EXPORT_DELAY_S, STEPS = 10, 12, 2


@pytest.mark.e2e
def test_a_slow_export_runs_after_the_worker_group_under_a_short_process_group_timeout(ray_session, tiny_config):
    from orchestration.launch import fit_tower
    from orchestration.train.tower import load_tower_export

    config = tiny_config(
        "run_name=slow-export",
        f"tower_train.steps={STEPS}",
        "tower_train.batch_size_per_worker=4",
        f"tower_train.checkpoint_every={STEPS}",
        f"tower_train.eval_every={STEPS}",
        "cluster.num_workers=2",
        f"cluster.process_group_timeout_s={PROCESS_GROUP_TIMEOUT_S}",
        f"cluster.fault_injection.export_delay_s={EXPORT_DELAY_S}",
        "tracking.enabled=false",  # nothing here reads the MLflow run; the workers then never load MLflow
    )
    result = fit_tower(config)

    assert result.steps_done == STEPS and result.history == [[1, STEPS]]
    # The export started after rank 0 had left the training function, and took longer than a rank
    # may wait in a collective.
    assert result.workers_finished_at is not None and result.end_of_run_started_at is not None
    assert result.end_of_run_started_at >= result.workers_finished_at
    assert result.timings["end_of_run_s"] >= EXPORT_DELAY_S > PROCESS_GROUP_TIMEOUT_S
    assert os.path.isfile(os.path.join(result.export_path, "tower.safetensors"))
    assert load_tower_export(result.export_path) is not None
    assert "codebook_dead_codes" in result.metrics
