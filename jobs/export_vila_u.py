"""Write a stage-2 export (a trained run's, or an import's) in the released VILA-U layout, so the reference's
own inference and lmms-eval scripts can load it.

    python jobs/export_vila_u.py --checkpoint outputs/ray/tiny-lm/export --out vila-u-mine [--summary-json PATH]

--checkpoint is a stage-2 export or its run directory; no Ray is needed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit` runs us from jobs/

from orchestration.job_cli import write_summary
from orchestration.released import export_released


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="stage-2 export directory (or its run directory)")
    parser.add_argument("--out", required=True, help="released-layout directory to write")
    parser.add_argument("--summary-json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    info = export_released(args.checkpoint, args.out)
    write_summary(args.summary_json, {"released_path": args.out, "notes": info["notes"]})
    print(f"released layout: {args.out}")
    for note in info["notes"]:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
