"""Ray Tune sweep of the vision tower's contrastive / reconstruction loss weights.

    python jobs/tune_loss_weights.py [--config F] [k=v ...] [--summary-json PATH]

Ranges, search method (grid, random, optuna), ASHA settings and trial resources are in the config's
`tune` section; rerunning the same command resumes an interrupted sweep.
"""

import argparse

from orchestration.config import load_config
from orchestration.tune import run_sweep, write_summary_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML preset (default: jobs/configs/tiny.yaml)")
    parser.add_argument("--summary-json", default=None, help="write the sweep summary here")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)  # fails before Ray starts on a bad config
    summary = run_sweep(config)
    print(summary.table())
    if args.summary_json:
        write_summary_json(summary, args.summary_json)


if __name__ == "__main__":
    main()
