"""Tokenize the stage-2 sources once into data.cache_dir (parquet shards + manifest).

    python jobs/tokenize_data.py [--config F] [--tower PATH] [--force] [section.key=value ...]

--tower: the stage-1 tower export (safetensors file or directory, local or s3://); default:
model.tower_checkpoint, else the preset initialised from the seed. Pretraining with the same config
then reads these rows instead of re-encoding every image; a cache made with other settings is refused.
Like every job, it joins the cluster it is submitted to (`ray job submit`, RAY_ADDRESS or
cluster.address) and starts a local Ray instance otherwise.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit` runs us from jobs/

from orchestration.config import ConfigError  # noqa: E402
from orchestration.job_cli import job_parser, load_job_config, write_summary  # noqa: E402
from orchestration.cluster import init_ray  # noqa: E402
from orchestration.launch import LM  # noqa: E402


def main(argv=None) -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--tower", default=None, help="stage-1 tower export to encode images with")
    parser.add_argument("--force", action="store_true", help="replace an existing cache, even a mismatched one")
    args = parser.parse_args(argv)
    from orchestration.data.pipeline import CacheMismatchError, run_tokenize_job

    try:
        config = load_job_config(args, stages=(LM,))
        init_ray(config)
        manifest = run_tokenize_job(config, args.tower, force=args.force)
    except (ConfigError, CacheMismatchError) as exc:
        sys.exit(f"error: {exc}")
    summary = {k: manifest[k] for k in ("rows", "mixture", "skipped", "created_at")}
    summary["unreadable_shards"] = manifest.get("unreadable_shards", [])
    summary["tower"] = manifest["fingerprint"]["tower"]
    print(json.dumps(summary, indent=1))
    write_summary(args.summary_json, summary)


if __name__ == "__main__":
    main()
