"""What a run will ask for, before anything is spent: every worker group, actor pool and task each stage
asks Ray for, held against the cluster, and each stage's per-GPU memory peak of one optimizer step,
computed at the config's real shapes without a GPU (fake tensors, a fake process group of the real
world size). Exit 1, naming the fields, when the run does not fit.

    python jobs/plan.py --config jobs/configs/vilau-384.yaml [section.key=value ...]

Only shapes are used: the paper presets need no weights here (model.allow_random_init is implied).
Every job runs the same check before it starts Ray work (memory only for GPU runs).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit` runs us from jobs/

from orchestration.job_cli import job_parser, load_job_config  # noqa: E402
from orchestration.launch import LM, TOWER  # noqa: E402
from orchestration.run_plan import plan_run, report_lines  # noqa: E402


def main(argv=None) -> None:
    args = job_parser(__doc__).parse_args(argv)
    args.overrides = ["model.allow_random_init=true", *args.overrides]  # shapes only
    config = load_job_config(args)
    plan = plan_run(config, (TOWER, LM))
    print("\n".join(report_lines(config, plan)))
    for stage, name in ((TOWER, "plan_stage1_peak_gib"), (LM, "plan_stage2_peak_gib")):
        if stage in plan.memory:
            print(f"RESULT {name}={plan.memory[stage].peak_gib:.2f}")
    if not plan.fits:
        sys.exit(1)


if __name__ == "__main__":
    main()
