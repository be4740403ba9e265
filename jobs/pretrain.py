"""VILA-U pretraining, both stages: the vision tower, then the unified LM over the frozen tower.

    python jobs/pretrain.py [--config F] [section.key=value ...] [--summary-json PATH]

With no arguments this is the embedded default (jobs/configs/tiny.yaml): it writes generated shards
under data/synthetic if they are missing, trains the tiny tower briefly, tokenizes the stage-2 data
through the actor pool, trains the tiny LM on 2 FSDP2 workers, all on a local Ray instance with MLflow
on SQLite under outputs/, then prints where the checkpoints and runs are.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit` runs us from jobs/

from orchestration.launch import job_parser, load_job_config, pretrain, pretrain_summary, where_things_are, write_summary


def main(argv=None) -> None:
    args = job_parser(__doc__).parse_args(argv)
    config = load_job_config(args)
    tower, lm = pretrain(config)
    write_summary(args.summary_json, pretrain_summary(config, tower, lm))
    print(where_things_are(config, [tower, lm]))


if __name__ == "__main__":
    main()
