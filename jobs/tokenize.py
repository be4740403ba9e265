"""Tokenize the stage-2 sources once into data.cache_dir (parquet shards + manifest).

    python jobs/tokenize.py [--config F] [--tower PATH] [--force] [section.key=value ...]

--tower: the stage-1 tower export (safetensors file or directory, local or s3://); default:
model.tower_checkpoint, else the preset initialised from the seed. Pretraining with the same config
then reads these rows instead of re-encoding every image; a cache made with other settings is refused.
"""

import os
import sys

# This file shares its name with the standard library's `tokenize`, which linecache and inspect
# import, and jobs/ is first on sys.path for every job script. Take jobs/ off the path; and when this
# file is being imported *as* the standard module, hand the importer the real one instead.
_JOBS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _JOBS_DIR]
if __name__ == "tokenize":
    del sys.modules["tokenize"]
    import tokenize as _stdlib_tokenize  # noqa: E402  (now the standard library's)

    sys.modules["tokenize"] = _stdlib_tokenize
    globals().update(_stdlib_tokenize.__dict__)

import argparse  # noqa: E402
import json  # noqa: E402


def main() -> None:
    # Imported here, not above: when this file stands in for the standard `tokenize` during an
    # interpreter-wide import, it must not pull in the project (that import cycle fails).
    from orchestration.config import ConfigError, load_config
    from orchestration.data.pipeline import CacheMismatchError, run_tokenize_job

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML preset (default: the tiny preset)")
    parser.add_argument("--tower", default=None, help="stage-1 tower export to encode images with")
    parser.add_argument("--force", action="store_true", help="replace an existing cache, even a mismatched one")
    parser.add_argument("--summary-json", default=None, help="also write the summary here")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args()
    try:
        manifest = run_tokenize_job(load_config(args.config, args.overrides), args.tower, force=args.force)
    except (ConfigError, CacheMismatchError) as exc:
        sys.exit(f"error: {exc}")
    summary = {k: manifest[k] for k in ("rows", "mixture", "skipped", "created_at")}
    summary["tower"] = manifest["fingerprint"]["tower"]
    print(json.dumps(summary, indent=1))
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
