"""Write synthetic COYO / MMC4 / OpenVid-1M / ShareGPT4V shards (and a labelled eval split).

    python jobs/make_synthetic_data.py --out data/synthetic --samples 64 [--seed 0] [--corrupt-fraction 0.2]
"""

import argparse
import json

from orchestration.data.synthetic import make_synthetic_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--samples", type=int, default=64, help="records per format")
    parser.add_argument("--eval-samples", type=int, default=64, help="records in the labelled eval split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corrupt-fraction", type=float, default=0.0, help="share of bad records per format")
    args = parser.parse_args()
    manifest = make_synthetic_dataset(
        args.out, samples=args.samples, seed=args.seed, corrupt_fraction=args.corrupt_fraction, eval_samples=args.eval_samples
    )
    counts = {name: {"records": f["records"], "bad": len(f["bad"])} for name, f in manifest["formats"].items()}
    print(json.dumps({"out": args.out, "formats": counts}, indent=1))


if __name__ == "__main__":
    main()
