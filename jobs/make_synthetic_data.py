"""Write synthetic COYO / MMC4 / OpenVid-1M / ShareGPT4V shards (and a labelled eval split).

    python jobs/make_synthetic_data.py --out data/synthetic --samples 64 [--seed 0] [--corrupt-fraction 0.2]
    python jobs/make_synthetic_data.py --out s3://bucket/vilau-smoke/data      # written locally, then uploaded

For an s3:// --out, credentials and endpoint come from the standard AWS environment variables
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3 for an S3-protocol server other than AWS).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit` runs us from jobs/

from orchestration.data.synthetic import make_synthetic_dataset  # noqa: E402
from orchestration.storage import is_s3, upload_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory or s3://bucket/prefix")
    parser.add_argument("--samples", type=int, default=64, help="records per format")
    parser.add_argument("--eval-samples", type=int, default=64, help="records in the labelled eval split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corrupt-fraction", type=float, default=0.0, help="share of bad records per format")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vilau-shards-") as staging:
        local = staging if is_s3(args.out) else args.out
        manifest = make_synthetic_dataset(
            local, samples=args.samples, seed=args.seed, corrupt_fraction=args.corrupt_fraction, eval_samples=args.eval_samples
        )
        if is_s3(args.out):
            upload_dir(local, args.out)
    counts = {name: {"records": f["records"], "bad": len(f["bad"])} for name, f in manifest["formats"].items()}
    print(json.dumps({"out": args.out, "formats": counts}, indent=1))


if __name__ == "__main__":
    main()
