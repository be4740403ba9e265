"""VILA-U pretraining, both stages: the vision tower, then the unified LM over the frozen tower.

    python jobs/pretrain.py [--config F] [section.key=value ...] [--summary-json PATH]

With no arguments this is the embedded default (jobs/configs/tiny.yaml): it writes generated shards
under data/synthetic if they are missing, trains the tiny tower briefly, tokenizes the stage-2 data
through the actor pool, trains the tiny LM on 2 FSDP2 workers, all on a local Ray instance with MLflow
on SQLite under outputs/, then prints a summary: losses, evaluation against chance, where the
checkpoints, exports and runs are. The terminal shows progress only; the full log goes to outputs/logs/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit` runs us from jobs/

from orchestration.console import JobConsole, where_things_are
from orchestration.job_cli import job_parser, load_job_config, write_summary
from orchestration.launch import LM, TOWER, pretrain, pretrain_summary


def main(argv=None) -> None:
    args = job_parser(__doc__).parse_args(argv)
    config = load_job_config(args, stages=(TOWER, LM))
    with JobConsole(config, "pretrain") as console:
        tower, lm = pretrain(config, console=console)
        write_summary(args.summary_json, pretrain_summary(config, tower, lm))
        console.print(where_things_are(config, [tower, lm]))
        console.print(f"done in {console.elapsed():.0f} s; full log: {console.log_path}")


if __name__ == "__main__":
    main()
