"""Write synthetic COYO / MMC4 / OpenVid-1M / ShareGPT4V shards (and a labelled eval split).

    python jobs/make_synthetic_data.py [--config F] [section.key=value ...] [--out DIR] [--samples 64]
        [--eval-samples 64] [--seed 0] [--corrupt-fraction 0.2]
    python jobs/make_synthetic_data.py --out s3://bucket/vilau-smoke/data      # written locally, then uploaded

The defaults come from the config: --out is data.root, the rest data.synthetic.* (a flag given wins).
The folder must be absent, empty, or an earlier generation: a folder holding anything else may be real
data and is refused (for an s3:// --out, a prefix with objects and no synthetic manifest).

For an s3:// --out, credentials and endpoint come from the standard AWS environment variables
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3 for an S3-protocol server other than AWS).
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit` runs us from jobs/

from orchestration.data.synthetic import make_synthetic_dataset, synthetic_folder_state  # noqa: E402
from orchestration.job_cli import job_parser, load_job_config, write_summary  # noqa: E402
from orchestration.storage import S3Settings, filesystem, is_s3, join, upload_dir  # noqa: E402


def s3_prefix_state(uri: str) -> str:
    """"absent", "complete" (a synthetic manifest) or "foreign" for an S3 prefix."""
    fs, path = filesystem(uri, S3Settings.from_config(None))
    if not fs.exists(path) or not fs.find(path, maxdepth=None):
        return "absent"
    if fs.exists(join(path, "manifest.json")):
        return "complete"  # an earlier upload: the generator's own (real data has no such manifest at its root)
    return "foreign"


def main(argv=None) -> None:
    parser = job_parser(__doc__, trains=False)
    parser.add_argument("--out", default=None, help="output directory or s3://bucket/prefix (default: data.root)")
    parser.add_argument("--samples", type=int, default=None, help="records per format (data.synthetic.samples)")
    parser.add_argument("--eval-samples", type=int, default=None, help="records in the labelled eval split")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--corrupt-fraction", type=float, default=None, help="share of bad records per format")
    args = parser.parse_args(argv)
    config = load_job_config(args)
    synthetic = config.data.synthetic
    out = args.out or config.data.root

    def given(flag, default):
        return default if flag is None else flag

    state = s3_prefix_state(out) if is_s3(out) else synthetic_folder_state(out)
    if state == "foreign":
        field = "--out" if args.out else "data.root"
        raise SystemExit(f"error: {field}: {out} holds files that are not generated shards (no synthetic "
                         "manifest.json); generated shards could overwrite real data there: choose an empty folder")
    with tempfile.TemporaryDirectory(prefix="vilau-shards-") as staging:
        local = staging if is_s3(out) else out
        manifest = make_synthetic_dataset(
            local, samples=given(args.samples, synthetic.samples), seed=given(args.seed, synthetic.seed),
            corrupt_fraction=given(args.corrupt_fraction, synthetic.corrupt_fraction),
            eval_samples=given(args.eval_samples, synthetic.eval_samples),
        )
        if is_s3(out):
            upload_dir(local, out)
    counts = {name: {"records": f["records"], "bad": len(f["bad"])} for name, f in manifest["formats"].items()}
    summary = {"out": out, "formats": counts}
    write_summary(args.summary_json, summary)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
