"""Ray Tune sweep of the vision tower's contrastive / reconstruction loss weights.

    python jobs/tune_loss_weights.py [--config F] [k=v ...] [--summary-json PATH]

Ranges, search method (grid, random, optuna), ASHA settings and trial resources are in the config's
`tune` section; rerunning the same command resumes an interrupted sweep.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit` runs us from jobs/

from orchestration.job_cli import job_parser, load_job_config  # noqa: E402
from orchestration.tune import run_sweep, write_summary_json  # noqa: E402


def main(argv=None) -> None:
    args = job_parser(__doc__).parse_args(argv)
    config = load_job_config(args, stages=("tune",))  # fails before Ray starts on a bad config or a trial that cannot fit
    summary = run_sweep(config)
    print(summary.table())
    if args.summary_json:
        write_summary_json(summary, args.summary_json)


if __name__ == "__main__":
    main()
