"""Share of real (non-pad) tokens in the packed rows stage 2 trains on, at each preset's settings.

The tokenization pool packs each of its calls (``data.pack_window`` records, in the order the rank's
stream gives them) into rows of ``data.seq_len`` tokens with `vilau_model.sequence.pack_call` (best
fit decreasing over the call: orchestration/data/lm_data.py); before, it streamed them through a
StreamingPacker (best fit in arrival order, 16 open rows), also measured here. What a call holds
decides how full the rows can get: a call of OpenVid clips alone (8 frames: 5834 positions at 384 px)
puts only one clip in an 8192-token row, whatever the packer does.

For every preset in jobs/configs (its row length, pack window, sources, weights, tasks, and its
tower's image and video positions), two compositions of the calls:

- **mixed** (what the pool gets): the records in the order the real mixer draws them
  (`orchestration.data.mixture.mix_order`, weights as shares of samples), cut into calls;
- **source-grouped**: every call holds records of one source only (the pipeline before the mixer drew
  by weight; still what a single-source run gets), calls per source in the weights' proportions.

Sample lengths per source (tokens; "img"/"vid" = the tower's positions of an image/clip incl. markers):

    COYO pair       2 + img + caption (~30)           both ways: two samples a record
    OpenVid clip    2 + vid + caption (~20)           both ways: two samples a record
    MMC4 document   2 + k x img + text (k = 0..max_images_per_doc, text log-normal, median ~800), cut at the row
    ShareGPT4V      2 + img + template ~40 + turns (log-normal, median ~350)

Run:  python benchmarks/bench_packing.py [--records 20000] [--seed 0]
RESULT lines: ``packed_share_paper`` (vilau-384, mixed calls: what its pool packs; goal >= 0.97),
``packed_share_paper_source_grouped`` (vilau-384, source-grouped calls) and
``packed_share_default`` (the default config, mixed calls).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vilau_model.sequence import BuiltSequence, StreamingPacker, pack_call  # noqa: E402

PRESET_OVERRIDES = ["model.allow_random_init=true"]  # the presets' pretrained paths are not needed to read their shapes


def preset_settings(path: str | None) -> dict:
    """What packing depends on, from a preset (None: the default config)."""
    from orchestration.config import load_config
    from orchestration.data.lm_data import lm_samples_per_record
    from orchestration.data.records import FORMAT_KIND
    from orchestration.data.sources import visual_tokens
    from vilau_model.config import get_lm_config, get_tower_config

    config = load_config(path, PRESET_OVERRIDES)
    image, video = visual_tokens(config)
    lm = get_lm_config(config.model.lm, **config.model.lm_overrides())
    tower = get_tower_config(config.model.tower, **config.model.tower_overrides())
    per_record = lm_samples_per_record(config)
    return {
        "seq_len": config.data.seq_len, "pack_window": config.data.pack_window, "image": image, "video": video,
        "depth": tower.code_depth if hasattr(tower, "code_depth") else 4, "max_images": lm.max_images_per_doc,
        "mix_by": config.data.mix_by,
        "sources": {name: {"kind": FORMAT_KIND[s.format], "weight": s.weight, "samples": per_record.get(name, 1)}
                    for name, s in config.data.lm_sources.items() if s.weight > 0},
    }


def record_lengths(kind: str, samples: int, settings: dict, rng: np.random.Generator) -> list[int]:
    """The token lengths of the samples one record of ``kind`` gives."""
    from orchestration.data.records import KIND_CONVERSATION, KIND_IMAGE_TEXT, KIND_INTERLEAVED, KIND_VIDEO

    image, video, seq_len = settings["image"], settings["video"], settings["seq_len"]
    if kind == KIND_IMAGE_TEXT:
        length = 2 + image + int(np.clip(rng.normal(30, 12), 5, 80))
    elif kind == KIND_VIDEO:
        length = 2 + video + int(np.clip(rng.normal(20, 8), 5, 60))
    elif kind == KIND_INTERLEAVED:
        length = 2 + int(rng.integers(0, settings["max_images"] + 1)) * image + int(rng.lognormal(np.log(800), 0.8))
    elif kind == KIND_CONVERSATION:
        length = 2 + image + 40 + int(rng.lognormal(np.log(350), 0.6))
    else:
        raise ValueError(kind)
    return [min(length, seq_len)] * samples  # the builder cuts an over-long sample to the row length


def source_records(settings: dict, records: int, rng: np.random.Generator) -> dict[str, list[list[int]]]:
    """Each source's records (as their samples' lengths), as many as its weight (a share of samples)
    asks for out of ``records`` in all."""
    sources = settings["sources"]
    per_sample = {n: s["weight"] / s["samples"] for n, s in sources.items()}
    total = sum(per_sample.values())
    return {n: [record_lengths(s["kind"], s["samples"], settings, rng) for _ in range(max(1, round(records * per_sample[n] / total)))]
            for n, s in sources.items()}


def mixed_order(by_source: dict[str, list[list[int]]], seed: int, buffer_rows: int = 512) -> list[list[int]]:
    """The records in the order the real mixer draws them (one window holding every source)."""
    from orchestration.data.mixture import mix_order

    names = sorted(by_source)
    iters = [iter(by_source[n]) for n in names]
    parts = [[(len(by_source[n]), 0)] for n in names]
    return [record for _, record in mix_order(parts, seed, buffer_rows, lambda i, j: next(iters[i], None))]


def pack_calls(calls: list[list[list[int]]], settings: dict, packer: str = "pool") -> float:
    """Each call packed (rows materialized, as the pool does): the non-pad share of all rows.
    ``packer``: "pool" = what the tokenization pool runs (`pack_call`: best fit decreasing over the
    call), "stream" = the stream packer it ran before (best fit in arrival order, 16 open rows)."""
    seq_len, depth = settings["seq_len"], settings["depth"]
    tokens = slots = 0
    for call in calls:
        seqs = [BuiltSequence(np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros((n, depth), np.int16), np.zeros(n, bool))
                for record in call for n in record]
        if packer == "pool":
            rows, _ = pack_call(seqs, seq_len, depth, 0)
        else:
            stream = StreamingPacker(seq_len=seq_len, code_depth=depth, pad_id=0)
            rows = [row for s in seqs for row in stream.add(s)] + stream.flush()
        tokens += sum(len(s) for s in seqs)
        slots += len(rows) * seq_len
    return tokens / max(slots, 1)


def calls_of(records: list[list[int]], window: int) -> list[list[list[int]]]:
    return [records[i : i + window] for i in range(0, len(records), window)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20000, help="records per preset")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    presets = {"default": None} | {os.path.basename(p)[:-5]: p for p in sorted(glob.glob("jobs/configs/*.yaml"))}
    print(f"{args.records} records per preset; non-pad share of the packed rows. Pool = best fit decreasing over "
          "each call (now); stream = best fit in arrival order over 16 open rows (before).\n")
    print("| preset | seq_len | pack_window | img/vid positions | mixed calls: pool (stream) | source-grouped calls: pool (stream) | grouped, pool, per source |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    results: dict[str, dict[str, float]] = {}
    for name, path in presets.items():
        try:
            settings = preset_settings(path)
        except Exception as exc:  # e.g. a cluster preset whose placeholders must be filled in first
            print(f"| {name} | not loadable here: {str(exc).splitlines()[0][:80]} | | | | | |")
            continue
        rng = np.random.default_rng(args.seed)
        by_source = source_records(settings, args.records, rng)
        window = settings["pack_window"]
        mixed = calls_of(mixed_order(by_source, args.seed), window)
        grouped = [c for n in sorted(by_source) for c in calls_of(by_source[n], window)]
        r = results[name] = {f"{calls}_{packer}": pack_calls(c, settings, packer)
                             for calls, c in (("mixed", mixed), ("grouped", grouped)) for packer in ("pool", "stream")}
        per_source = ", ".join(f"{n} {pack_calls(calls_of(by_source[n], window), settings):.3f}" for n in sorted(by_source))
        print(f"| {name} | {settings['seq_len']} | {window} | {settings['image']}/{settings['video']} | "
              f"**{r['mixed_pool']:.3f}** ({r['mixed_stream']:.3f}) | {r['grouped_pool']:.3f} ({r['grouped_stream']:.3f}) | "
              f"{per_source} |", flush=True)
    paper = results["vilau-384"]
    print(f"\nvilau-384 before (stream packer): mixed calls {paper['mixed_stream']:.4f}, source-grouped {paper['grouped_stream']:.4f}")
    print(f"RESULT packed_share_paper={paper['mixed_pool']:.4f}")
    print(f"RESULT packed_share_paper_source_grouped={paper['grouped_pool']:.4f}")
    print(f"RESULT packed_share_default={results['default']['mixed_pool']:.4f}")


if __name__ == "__main__":
    main()
