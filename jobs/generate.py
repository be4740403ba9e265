"""Generate images (or video frames) from text with a trained stage-2 model, as PNG files.

    python jobs/generate.py --checkpoint outputs/ray/tiny-lm/export --prompt "a red circle in the top left"
        [--prompt ...] [--num-samples 1] [--video] [--out generated] [--seed 0] [--cfg-scale 3.0] [--device auto]
        [--summary-json PATH]

Each run writes into a new folder generated/gen-NNNN (never over an earlier run's files).

--checkpoint is the export a stage-2 run writes (<storage_path>/<run_name>-lm/export) or that run's
directory; no Ray is needed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit` runs us from jobs/

from orchestration.job_cli import write_summary
from orchestration.train.lm import generate_to_files, resolve_export


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="stage-2 export directory (or its run directory)")
    parser.add_argument("--prompt", action="append", required=True, help="text prompt (repeat for several)")
    parser.add_argument("--video", action="store_true", help="generate video frames instead of one image")
    parser.add_argument("--out", default="generated", help="output directory for the PNG files")
    parser.add_argument("--num-samples", type=int, default=1, help="images (or clips) per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (default 3.0)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N")
    parser.add_argument("--summary-json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    export = resolve_export(args.checkpoint)
    files = generate_to_files(export, args.prompt, args.out, video=args.video, seed=args.seed, cfg_scale=args.cfg_scale,
                              device=args.device, num_samples=args.num_samples)
    write_summary(args.summary_json, {"checkpoint_path": export, "prompts": args.prompt, "files": files})
    print("\n".join(files))


if __name__ == "__main__":
    main()
