"""Stage 1: train the unified vision tower (contrastive + reconstruction) on Ray Train with FSDP2.

    python jobs/train_vision_tower.py [--config F] [section.key=value ...] [--summary-json PATH]

Rerunning with the same run_name resumes from the latest checkpoint.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit` runs us from jobs/

from orchestration.launch import fit_tower, job_parser, load_job_config, where_things_are, write_summary


def main(argv=None) -> None:
    args = job_parser(__doc__).parse_args(argv)
    config = load_job_config(args)
    result = fit_tower(config)
    write_summary(args.summary_json, result.summary())
    print(where_things_are(config, [result]))


if __name__ == "__main__":
    main()
