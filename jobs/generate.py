"""Generate images (or video frames) from text with a trained stage-2 model, as PNG files.

    python jobs/generate.py --prompt "a red circle in the top left" [--prompt ...]
        [--config F] [section.key=value ...] [--checkpoint EXPORT] [--num-samples 1] [--video]
        [--out generated] [--seed 0] [--cfg-scale 3.0] [--device auto] [--summary-json PATH]

The model is the stage-2 export of the config's run (<storage_path>/<run_name>-lm/export; with no
--config, the embedded default's), or --checkpoint: an export or the run directory that holds it.
An export on S3 is copied to a temporary folder first. No Ray is needed. Each run writes into a new
folder generated/gen-NNNN (never over an earlier run's files).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit` runs us from jobs/

from orchestration.job_cli import job_parser, load_job_config, write_summary  # noqa: E402
from orchestration.storage import S3Settings  # noqa: E402
from orchestration.train.generation import generate_to_files  # noqa: E402
from orchestration.train.outputs import local_export, resolve_export, stage_export_uri  # noqa: E402


def main(argv=None) -> None:
    parser = job_parser(__doc__, trains=False)
    parser.add_argument("--checkpoint", default=None, help="stage-2 export directory (or its run directory)")
    parser.add_argument("--prompt", action="append", help="text prompt (repeat for several; at least one)")
    parser.add_argument("--video", action="store_true", help="generate video frames instead of one image")
    parser.add_argument("--out", default="generated", help="output directory for the PNG files")
    parser.add_argument("--num-samples", type=int, default=1, help="images (or clips) per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (default 3.0)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N")
    args = parser.parse_args(argv)
    config = load_job_config(args)  # (--print-config ends here)
    if not args.prompt:
        parser.error("at least one --prompt is required")
    if args.checkpoint:
        source, export, copy = args.checkpoint, args.checkpoint, None
    else:
        source = stage_export_uri(config, "lm")
        export, copy = local_export(source, S3Settings.from_config(config.data.s3))
    try:
        export = resolve_export(export)
        files = generate_to_files(export, args.prompt, args.out, video=args.video, seed=args.seed,
                                  cfg_scale=args.cfg_scale, device=args.device, num_samples=args.num_samples)
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {exc}") from None
    finally:
        if copy is not None:
            copy.cleanup()
    write_summary(args.summary_json, {"checkpoint_path": source, "prompts": args.prompt, "files": files})
    print("\n".join(files))


if __name__ == "__main__":
    main()
