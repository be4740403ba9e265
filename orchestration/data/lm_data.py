"""Stage-2 input: the tokenization actor pool turns decoded samples into packed rows.

    read (one task per shard) -> fetch + decode (CPU map_batches)
      -> TokenizePool (actors holding the frozen tower + the LLM tokenizer; GPUs on a cluster):
         pixels -> tower codes (int16), text -> ids, SequenceBuilder layout + loss masks, packing
      -> rows in vilau_model.sequence's packed-row format (ROW_SCHEMA)

Packing happens within one call of the pool (data.pack_window samples). The dataset preserves order,
so which samples share a call, and so the rows, do not depend on how many actors there are or which
one is faster: 1 actor and 2 actors give the same rows.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from orchestration.config import Config
from orchestration.data.decode import decode_counted
from orchestration.data.records import (
    FORMAT_KIND,
    KIND_CONVERSATION,
    KIND_IMAGE_TEXT,
    KIND_INTERLEAVED,
    KIND_VIDEO,
    ReadUnit,
    fs_and_path,
    iter_texts,
    list_shards,
    media_root_for,
    read_bytes,
)
from orchestration.resource_plan import pool_start_error, tokenizer_actor_bundle
from orchestration.data.sources import (
    ensure_data,
    fault_ledger,
    plan_sources,
    rank_windows,
    read_dataset,
    resolve_sources,
    s3_settings,
)
from orchestration.data.epochs import DataPosition, EpochPlan, part_id
from orchestration.data.stats import DECODE_ERROR, TOO_LONG, Tally, stats_actor
from orchestration.data.tower_data import tower_config, track_columns
from orchestration.storage import S3Settings, is_s3
from vilau_model.config import LMConfig, VisionTowerConfig, get_lm_config

log = logging.getLogger(__name__)

LM_GROUP = "lm"
MAX_TOKENIZER_TEXTS = 200_000  # texts a fallback BPE is trained on

DECODED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("kind", pa.string()),
        ("text", pa.string()),
        ("media_slots", pa.list_(pa.int32())),
        ("num_images", pa.int32()),
        # uint8 [num_images, 3, S, S] as raw bytes: one column type for 0, 1, 6 or 8 images
        ("pixels", pa.binary()),
        ("sample_id", pa.int64()),  # the record's place in the rank's epoch (epochs.py); -1: carrier
        ("origin", pa.string()),  # which record (records.py: unit#offset)
        ("skipped", pa.list_(pa.string())),  # records dropped just before this one (stats.skip_entry)
        ("notes", pa.list_(pa.string())),  # faults noted on this record, which is kept (stats.skip_entry)
        ("done_parts", pa.list_(pa.int32())),  # samples of this record trained before a resume
    ]
)


def lm_config(config: Config) -> LMConfig:
    cfg = get_lm_config(config.model.lm, **config.model.lm_overrides())
    if config.model.init_from:  # the export's architecture (orchestration.released)
        from orchestration.released import export_lm_config

        cfg = export_lm_config(config.model.init_from, cfg, rope_from_run=config.model.rope_scaling is not None)
    return cfg


# ---------------------------------------------------------------- the LLM tokenizer


def ensure_lm_tokenizer(config: Config) -> str:
    """Path of the LLM's text tokenizer (markers added on load by vilau_model.tokenizer.load_tokenizer).

    model.lm_path's tokenizer when set; otherwise a small byte-level BPE trained on the lm sources'
    texts, saved under <output_dir>/lm_tokenizer and reused when present.
    """
    if config.model.lm_path:
        return config.model.lm_path
    if is_s3(config.output_dir):
        return _lm_tokenizer_on_s3(config)
    out = Path(config.output_dir) / "lm_tokenizer"
    if (out / "tokenizer.json").is_file():
        return str(out)
    return _train_lm_tokenizer(config, out)


def _lm_tokenizer_on_s3(config: Config) -> str:
    """output_dir on S3 (a cluster): the tokenizer lives at <output_dir>/lm_tokenizer; this returns a
    local copy of it, trained and uploaded first if missing, so every run of the job uses the same one.

    The local copy is named by its content (``<tmp>/vilau-<uid>/lm-tokenizer-<sha256>``, in this user's
    private temp root): every call (driver, each rank, each restart) reuses the one folder instead of
    leaving a new temp dir behind, after checking that its files still hash to that name. Downloads
    and training happen in a TemporaryDirectory: only a process killed during that copy leaves one."""
    from orchestration.private_temp import user_temp_root
    from orchestration.storage import filesystem, join, upload_dir

    uri = join(config.output_dir, "lm_tokenizer")
    s3 = s3_settings(config)
    fs, path = filesystem(uri, s3)
    with tempfile.TemporaryDirectory(prefix=".lm-tokenizer-staging-", dir=user_temp_root()) as staging:
        local = Path(staging) / "lm_tokenizer"
        if fs.exists(f"{path}/tokenizer.json"):
            local.mkdir()
            fs.get(f"{path}/", f"{local}/", recursive=True)
        else:
            _train_lm_tokenizer(config, local)
            upload_dir(str(local), uri, s3)
            log.info("uploaded the LM tokenizer to %s", uri)
        return _content_addressed_copy(local)


def _content_addressed_copy(folder: Path) -> str:
    """Move ``folder`` to ``<user temp root>/lm-tokenizer-<sha256 of its files>`` unless a copy whose
    files still hash to that name is there (a leftover that does not is replaced, never trusted)."""
    from orchestration.private_temp import user_temp_root

    digest = files_sha256(directory_files(str(folder)))  # as the tokenized cache fingerprints it
    target = user_temp_root() / f"lm-tokenizer-{digest[:32]}"

    def intact() -> bool:
        return (target / "tokenizer.json").is_file() and files_sha256(directory_files(str(target))) == digest

    if not intact():
        try:
            folder.rename(target)  # atomic: a concurrent reader sees all of it or none
        except OSError:  # another process got there first with the same content, or a broken leftover
            if not intact():
                shutil.rmtree(target, ignore_errors=True)
                folder.rename(target)
    return str(target)


def _train_lm_tokenizer(config: Config, out: Path) -> str:
    from vilau_model.sequence import VICUNA_SYSTEM
    from vilau_model.tokenizer import train_bpe_tokenizer

    ensure_data(config)
    field = "lm_sources" if config.data.lm_sources else "tower_sources"
    s3 = s3_settings(config)
    # The chat template's fixed words, so that they become tokens rather than being spelled out.
    texts = [VICUNA_SYSTEM, "USER: ASSISTANT:"] * 8
    for name, source in sorted(resolve_sources(config, getattr(config.data, field), field).items()):
        for uri in list_shards(source["format"], source["path"], s3):
            unit = ReadUnit(name, source["format"], uri, media_root_for(source["format"], source["path"], source["media_root"]))
            texts.extend(itertools.islice(iter_texts(unit, s3), MAX_TOKENIZER_TEXTS - len(texts)))
    # Train beside the target and rename, so a concurrent reader never sees half a tokenizer.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".lm_tokenizer-", dir=out.parent))
    train_bpe_tokenizer(texts, staging, vocab_size=lm_config(config).vocab_size)
    try:
        staging.rename(out)
    except OSError:  # someone else finished first: use theirs
        shutil.rmtree(staging, ignore_errors=True)
    log.info("trained a %d-text BPE tokenizer at %s", len(texts), out)
    return str(out)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


def directory_files(path: str) -> dict[str, bytes]:
    """A tokenizer directory's files as bytes, to ship to actors on other machines. Model weights that
    share the directory (model.lm_path is a whole LLaMA checkpoint) are left out."""
    return {
        p.name: p.read_bytes()
        for p in sorted(Path(path).iterdir())
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and not p.name.startswith(".")
    }


def files_sha256(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return digest.hexdigest()


# ---------------------------------------------------------------- the frozen tower


@dataclass(frozen=True)
class TowerSource:
    """Which frozen tower the pool uses: a stage-1 export (safetensors file or a directory holding
    one, local or s3://) or, without one, the preset initialised from a seed (tests, the tiny default)."""

    config: VisionTowerConfig
    path: str | None
    seed: int

    def identity(self, s3: S3Settings | None) -> dict:
        if self.path is None:
            return {"preset": self.config.name, "init": f"seed-{self.seed}", "pretrained": self.config.pretrained}
        return {"preset": self.config.name, "checkpoint_sha256": file_sha256(self.safetensors_uri(s3), s3)}

    def safetensors_uri(self, s3: S3Settings | None) -> str:
        fs, path = fs_and_path(self.path, s3)
        if fs.isdir(path):
            # a stage-2 export holds the tower beside llm/*.safetensors: its tower.safetensors first
            found = sorted(p for p in fs.find(path) if p.endswith(".safetensors"))
            found = [p for p in found if p.rsplit("/", 1)[-1] == "tower.safetensors"] or found
            if not found:
                raise FileNotFoundError(f"{self.path}: no .safetensors tower export inside")
            return ("s3://" + found[0]) if is_s3(self.path) else found[0]
        return self.path

    def load(self, s3: S3Settings | None):
        import torch

        from vilau_model.vision_tower import UnifiedVisionTower

        if self.path is None:
            torch.manual_seed(self.seed)
            return UnifiedVisionTower(self.config)
        uri = self.safetensors_uri(s3)
        if not is_s3(uri):
            return UnifiedVisionTower.load(uri, self.config)
        with tempfile.NamedTemporaryFile(suffix=".safetensors") as tmp:
            tmp.write(read_bytes(uri, s3))
            tmp.flush()
            return UnifiedVisionTower.load(tmp.name, self.config)


def file_sha256(uri: str, s3: S3Settings | None) -> str:
    fs, path = fs_and_path(uri, s3)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def tower_source(config: Config, tower_path: str | None) -> TowerSource:
    """The given export, else model.tower_checkpoint, else the seeded preset."""
    return TowerSource(tower_config(config), tower_path or config.model.tower_checkpoint, config.seed)


# ---------------------------------------------------------------- decode stage


def decode_lm_block(block: pa.Table, *, rows: int, group: str | None, size: int, frames: int, s3: S3Settings | None):
    """Normalized records -> DECODED_SCHEMA (media fetched and decoded), in slices of ``rows`` records;
    bad records dropped, each carried by the next good row (or the block's last one, or a carrier row)."""
    tally = Tally(group)
    held = None
    block_skipped: list[str] = []

    def taken() -> list[str]:
        entries = tally.take_skipped()
        block_skipped.extend(entries)
        return entries

    for start in range(0, block.num_rows, rows):
        out = []
        for record in block.slice(start, rows).to_pylist():
            pixels = decode_counted(record, size, lambda uri: read_bytes(uri, s3), tally, frames)
            if pixels is None:
                continue
            out.append(
                {
                    "key": record["key"],
                    "source": record["source"],
                    "kind": record["kind"],
                    "text": record["text"],
                    "media_slots": record["media_slots"],
                    "num_images": len(pixels),
                    "pixels": pixels.tobytes(),
                    "sample_id": record.get("sample_id", -1),
                    "origin": record.get("origin") or "",
                    "skipped": taken(),
                    "notes": record.get("notes") or [],
                    "done_parts": record.get("done_parts") or [],
                }
            )
            block_skipped.extend(record.get("notes") or [])  # a driver-side build counts them here
        if out:
            if held is not None:
                yield pa.Table.from_pylist(held, schema=DECODED_SCHEMA)
            held = out
    trailing = taken()
    if trailing and group is None:  # the training path: counts travel with the rows
        if held is None:
            held = [{"key": "", "source": "", "kind": "", "text": "", "media_slots": [], "num_images": 0, "pixels": b"",
                     "sample_id": -1, "origin": "", "skipped": [], "notes": [], "done_parts": []}]
        held[-1]["skipped"] = held[-1]["skipped"] + trailing
    tally.flush(block_skipped)
    if held is not None:
        yield pa.Table.from_pylist(held, schema=DECODED_SCHEMA)


# ---------------------------------------------------------------- the tokenization pool


class TokenizePool:
    """The callable class the actor pool runs: frozen tower + LLM tokenizer + sequence builder + packer."""

    def __init__(
        self,
        tower: TowerSource,
        tokenizer_files: dict[str, bytes],
        s3: S3Settings | None,
        seq_len: int,
        encode_batch_size: int,
        image_text_tasks: dict[str, str],
        frames_per_video: int,
        max_images_per_doc: int,
        group: str | None,
        use_gpu: bool,
        track: bool = False,
    ):
        import torch

        from vilau_model.sequence import SequenceBuilder
        from vilau_model.tokenizer import load_tokenizer_from_files

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.tower = tower.load(s3).eval().requires_grad_(False).to(self.device)
        self.size = tower.config.image_size
        self.depth = tower.config.code_depth
        self.tokenizer = load_tokenizer_from_files(tokenizer_files)
        self.builder = SequenceBuilder(
            self.tokenizer,
            code_depth=self.depth,
            max_len=seq_len,
            frames_per_video=frames_per_video,
            max_images_per_doc=max_images_per_doc,
            # no caption dropout here: rows keep every prompt, and the trainer drops prompts per (record,
            # epoch) when it builds batches (LMTask.host_batch)
        )
        self.seq_len, self.encode_batch_size = seq_len, encode_batch_size
        self.image_text_tasks, self.group, self.track = image_text_tasks, group, track

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, 3, S, S] -> int16 codes [N, H, W, D], in batches of encode_batch_size."""
        import torch

        codes = []
        for start in range(0, len(pixels), self.encode_batch_size):
            x = torch.from_numpy(pixels[start : start + self.encode_batch_size]).to(self.device).float().div_(255)
            codes.append(self.tower.encode_codes(x).to(torch.int16).cpu().numpy())
        return np.concatenate(codes) if codes else np.zeros((0,), np.int16)

    def samples(self, record: dict, codes: np.ndarray) -> list:
        from vilau_model.sequence import (
            CaptionSample,
            ConversationSample,
            GenerationSample,
            InterleavedSample,
            VideoCaptionSample,
            VideoSample,
        )

        kind, text = record["kind"], record["text"]
        if kind == KIND_IMAGE_TEXT:
            task = self.image_text_tasks.get(record["source"], "both")
            out = []
            if task in ("understanding", "both"):
                out.append(CaptionSample(codes=codes[0], text=text))
            if task in ("generation", "both"):
                out.append(GenerationSample(text=text, codes=codes[0]))
            return out
        if kind == KIND_VIDEO:
            # Clips train both directions as image-text pairs do: frames -> caption, caption -> frames.
            task = self.image_text_tasks.get(record["source"], "both")
            out = []
            if task in ("understanding", "both"):
                out.append(VideoCaptionSample(codes=codes, text=text))
            if task in ("generation", "both"):
                out.append(VideoSample(text=text, codes=codes))
            return out
        if kind == KIND_INTERLEAVED:
            return [InterleavedSample(sentences=json.loads(text), images=list(codes), image_sentence=list(record["media_slots"]))]
        if kind == KIND_CONVERSATION:
            return [ConversationSample.from_sharegpt(json.loads(text), codes[0] if len(codes) else None)]
        raise ValueError(f"unknown record kind {kind!r}")

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        from vilau_model.sequence import ROW_COLUMNS, empty_row, pack_call

        records = [r for r in batch.to_pylist()]
        carried = [entry for r in records for entry in (r.get("skipped") or [])]
        records = [r for r in records if r["kind"]]  # carrier rows hold only dropped records
        size = self.size
        pixels = [np.frombuffer(r["pixels"], dtype=np.uint8).reshape(r["num_images"], 3, size, size) for r in records]
        all_codes = self.encode(np.concatenate(pixels)) if any(len(p) for p in pixels) else None
        tally = Tally(self.group)
        sequences, origin, offset = [], {}, 0
        for record, images in zip(records, pixels):
            codes = all_codes[offset : offset + len(images)] if len(images) else np.zeros((0,), np.int16)
            offset += len(images)
            notes = list(record.get("notes") or [])  # counted with the row that trains the record's first part
            try:
                samples = self.samples(record, codes)
            except Exception:
                log.exception("record %s of source %s: cannot make a sample", record["key"], record["source"])
                tally.skipped.extend(notes)
                tally.skip(DECODE_ERROR, record["key"], record["source"], record.get("origin") or "",
                           part_id(record["sample_id"]) if record["sample_id"] >= 0 else -1)
                continue
            done = set(record.get("done_parts") or ())
            for part, sample in enumerate(samples):
                if part in done:
                    continue  # trained before the resume
                built = self.builder.build(sample)
                pid = part_id(record["sample_id"], part, len(samples))
                if built is None:
                    tally.skip(TOO_LONG, record["key"], record["source"], f"{record.get('origin') or ''}/part{part}",
                               pid if record["sample_id"] >= 0 else -1)
                    continue
                sequences.append(built)
                origin[id(built)] = (pid, f"{record['source']}/{record['key']}", notes)
                notes = []
                tally.tokens[record["source"]] += len(built)
            tally.skipped.extend(notes)  # no part built: counted with the call
        skipped = carried + tally.take_skipped()
        tally.flush(skipped if not self.track else [])
        # The whole call is known: best fit decreasing fills the rows fuller than a stream packer (the
        # short samples fill the gaps the long ones leave; benchmarks/bench_packing.py).
        rows, groups = pack_call(sequences, self.seq_len, self.depth, self.builder.ids.pad)
        if not rows and self.track and skipped:  # nothing trainable: one carrier row for the counts
            rows, groups = [empty_row(self.seq_len, self.depth, self.builder.ids.pad)], [[]]
        if not rows:  # all dropped: an empty batch, shaped
            template = empty_row(self.seq_len, self.depth, self.builder.ids.pad)
            out = {name: np.zeros((0,) + template[name].shape, template[name].dtype) for name in ROW_COLUMNS}
            if self.track:
                out.update(track_columns([], [], [], []))
            return out
        out = {name: np.stack([row[name] for row in rows]) for name in ROW_COLUMNS}
        if self.track:
            # One call is one span of the rank's stream: every row of it names the call's first id.
            call_start = part_id(min(r["sample_id"] for r in records)) if records else -1
            members = [[origin[id(sequences[i])] for i in group] for group in groups]
            out.update(track_columns(
                [sorted({i for i, _, _ in m}) for m in members],
                [call_start] * len(rows),
                [[k for _, k, _ in m] for m in members],
                [(skipped if i == 0 else []) + [n for _, _, notes in m for n in notes] for i, m in enumerate(members)],
            ))
        return out


def plan_lm_data(config: Config) -> EpochPlan:
    """Stage 2's epoch plan over data.lm_sources (lists the index shards; run once on the driver)."""
    ensure_data(config)
    return plan_sources(config, config.data.lm_sources, "lm_sources", samples_per_record=lm_samples_per_record(config))


def lm_samples_per_record(config: Config) -> dict[str, int]:
    """Samples a record of each stage-2 source gives: 2 for an image-text pair or a clip trained both
    ways (understanding and generation, ``image_text_task: both``), else 1."""
    return {
        name: 2 if FORMAT_KIND[s.format] in (KIND_IMAGE_TEXT, KIND_VIDEO) and s.image_text_task == "both" else 1
        for name, s in config.data.lm_sources.items()
    }


def lm_samples_from_records(config: Config, records: dict[str, int]) -> dict[str, int]:
    """Stage-2 records decoded per source (the stats' counts) -> the samples they give."""
    per_record = lm_samples_per_record(config)
    return {name: n * per_record.get(name, 1) for name, n in records.items()}


def decoded_dataset(
    config: Config,
    stats_group: str | None = LM_GROUP,
    *,
    plan: EpochPlan | None = None,
    epoch: int = 0,
    rank: int = 0,
    world: int = 1,
    position: DataPosition | None = None,
    fault_dir: str | None = None,
) -> ray.data.Dataset:
    """data.lm_sources read, mixed and decoded (DECODED_SCHEMA rows): the pool's input. By default
    the whole of epoch 0; a training rank passes its plan/epoch/rank/world/position (see epochs.py).
    ``fault_dir``: where unreadable shards are recorded and looked up (records.py)."""
    if plan is None:
        plan = plan_lm_data(config)
    if stats_group is not None:
        stats_actor()  # created by the driver, so it outlives the tasks and actors that count into it
    s3 = s3_settings(config)
    windows, formats = rank_windows(plan, epoch, rank, world, position)
    return read_dataset(windows, s3, config.data.decode_batch_size, formats, fault_ledger(config, fault_dir)).map_batches(
        decode_lm_block,
        fn_kwargs={
            "rows": config.data.decode_batch_size,
            "group": stats_group,
            "size": tower_config(config).image_size,
            "frames": lm_config(config).frames_per_video,
            "s3": s3,
        },
        batch_size=None,  # whole blocks (cut to decode_batch_size rows by the read stage)
        batch_format="pyarrow",
    )


def tokenize_dataset(
    config: Config,
    tower: TowerSource,
    tokenizer_path: str | None,
    stats_group: str | None = LM_GROUP,
    *,
    tokenizer_files: dict[str, bytes] | None = None,
    track: bool = False,
    **rank_args,
) -> ray.data.Dataset:
    """Packed rows made on the fly from data.lm_sources (mixed by weight) through the actor pool.

    ``rank_args`` (plan, epoch, rank, world, position, fault_dir) select a training rank's share of an epoch;
    ``track`` adds the position columns its BatchStream consumes. Each such rank runs its own pool of
    data.tokenizer_actors actors.
    """
    s3 = s3_settings(config)
    lm = lm_config(config)
    ds = decoded_dataset(config, stats_group, **rank_args)
    gpus = config.data.tokenizer_actor_gpus
    actor = tokenizer_actor_bundle(config)
    ds = ds.map_batches(
        TokenizePool,
        fn_constructor_kwargs={
            "tower": tower,
            "tokenizer_files": tokenizer_files if tokenizer_files is not None else directory_files(tokenizer_path),
            "s3": s3,
            "seq_len": config.data.seq_len,
            "encode_batch_size": config.data.tokenizer_batch_size,
            "image_text_tasks": {n: s.image_text_task for n, s in config.data.lm_sources.items()},
            "frames_per_video": lm.frames_per_video,
            "max_images_per_doc": lm.max_images_per_doc,
            "group": stats_group,
            "use_gpu": gpus > 0,
            "track": track,
        },
        batch_size=config.data.pack_window,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=config.data.tokenizer_actors),
        num_gpus=gpus if gpus > 0 else None,
        # Each actor holds the tower and the tokenizer: reserve memory for them. Resource requests that
        # differ from the decode tasks' also keep Ray Data from fusing decoding into the actors, so
        # decoding stays on the CPU task pool (on GPU nodes num_gpus alone would do that).
        memory=actor.memory,
    )
    # Order preserved: the pool's calls (and so the packed rows) are the same whatever the pool size.
    ds.context.execution_options.preserve_order = True
    # Ray Data waits for pool actors forever by default: a pool the cluster has no room for fails instead.
    ds.context.wait_for_min_actors_s = config.data.actor_start_timeout_s
    return ds


def pool_wait_error(config: Config, exc: BaseException) -> BaseException | None:
    """The tokenization pool's start-up deadline, said with what it asked for (None: another error)."""
    return pool_start_error(
        exc, "the stage-2 tokenization pool", tokenizer_actor_bundle(config), config.data.tokenizer_actors,
        ("data.tokenizer_actors", "data.tokenizer_actor_gpus", "data.actor_start_timeout_s", "data.cache_dir"),
        config.data.actor_start_timeout_s,
    )
