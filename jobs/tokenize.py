"""Tokenize the stage-2 sources once into data.cache_dir (parquet shards + manifest).

    python jobs/tokenize.py [--config F] [--tower PATH] [--force] [section.key=value ...]

--tower: the stage-1 tower export (safetensors file or directory, local or s3://); default:
model.tower_checkpoint, else the preset initialised from the seed. Pretraining with the same config
then reads these rows instead of re-encoding every image; a cache made with other settings is refused.
"""

import os
import sys

# This file shares its name with the standard library's `tokenize` (which linecache and inspect
# import): take jobs/ off the import path so that `import tokenize` finds the real module.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402

from orchestration.config import load_config  # noqa: E402
from orchestration.data.pipeline import run_tokenize_job  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML preset (default: the tiny preset)")
    parser.add_argument("--tower", default=None, help="stage-1 tower export to encode images with")
    parser.add_argument("--force", action="store_true", help="replace an existing cache, even a mismatched one")
    parser.add_argument("--summary-json", default=None, help="also write the summary here")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args()
    manifest = run_tokenize_job(load_config(args.config, args.overrides), args.tower, force=args.force)
    summary = {k: manifest[k] for k in ("rows", "mixture", "skipped", "created_at")}
    summary["tower"] = manifest["fingerprint"]["tower"]
    print(json.dumps(summary, indent=1))
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
