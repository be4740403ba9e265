"""Turn a released VILA-U directory (mit-han-lab vila-u-7b-256 / vila-u-7b-384) into this project's export.

    python jobs/import_vila_u.py --src vila-u-7b-256 --out imports/vila-u-256 [--summary-json PATH]

The export is a stage-2 export (llm/, vilau_lm.*, tower.*): generate from it with jobs/generate.py, or start
training from it with `model.init_from=imports/vila-u-256`. No Ray is needed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit` runs us from jobs/

from orchestration.job_cli import write_summary
from orchestration.released import import_released


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="released VILA-U directory (config.json, llm/, vision_tower/, mm_projector/)")
    parser.add_argument("--out", required=True, help="export directory to write")
    parser.add_argument("--summary-json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    info = import_released(args.src, args.out)
    write_summary(args.summary_json, {"export_path": args.out, "notes": info["notes"], "extras": info["extras"]})
    print(f"export: {args.out}")
    for note in info["notes"]:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
