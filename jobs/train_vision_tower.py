"""Stage 1: train the unified vision tower (contrastive + reconstruction) on Ray Train with FSDP2.

    python jobs/train_vision_tower.py [--config F] [section.key=value ...] [--summary-json PATH]

Rerunning with the same run_name resumes from the latest checkpoint.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit` runs us from jobs/

from orchestration.console import JobConsole, where_things_are
from orchestration.job_cli import job_parser, load_job_config, write_summary
from orchestration.launch import TOWER, fit_tower


def main(argv=None) -> None:
    args = job_parser(__doc__).parse_args(argv)
    config = load_job_config(args, stages=(TOWER,))
    with JobConsole(config, "train_vision_tower") as console:
        result = fit_tower(config, console=console)
        write_summary(args.summary_json, result.summary())
        console.print(where_things_are(config, [result]))
        console.print(f"done in {console.elapsed():.0f} s; full log: {console.log_path}")


if __name__ == "__main__":
    main()
