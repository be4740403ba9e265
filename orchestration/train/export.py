"""Consolidated exports written from a stage's sharded checkpoint, after its worker group has finished.

The training workers never gather the model for an export (a 7B LLM would not fit one process, and the
other ranks would wait in a collective meanwhile). Instead the driver runs one Ray task per stage that
reads the final DCP checkpoint's model tensors a group at a time (``CheckpointTensors``: the DCP
metadata says what is there, ``dcp.load`` reads only the requested tensors) and streams them into
safetensors files one tensor at a time (``write_safetensors``). No process holds more than one read
group (``READ_GROUP_BYTES``) of weights.

    stage 1 -> <run>/export/tower.safetensors + tower.json              (orchestration.train.tower format)
    stage 2 -> <run>/export/llm/ (Hugging Face layout: config.json, model[-0000i-of-0000n].safetensors,
               model.safetensors.index.json when sharded, tokenizer files), vilau_lm.safetensors
               (projector + depth transformer), vilau_lm.json, and the frozen tower's files

Checkpoints are read where they are (local directory, or s3:// through torch's fsspec reader).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch

from orchestration.config import Config
from orchestration.storage import filesystem, is_s3, join, s3fs_options

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."  # the checkpoint saves {"model": ..., "optim": ...}; DCP flattens the keys
READ_GROUP_BYTES = 256 << 20  # weights read from the checkpoint per dcp.load call
HF_SHARD_BYTES = 2 << 30  # largest llm/model-*.safetensors file

_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


class ExportError(RuntimeError):
    """The checkpoint does not hold what the export needs."""


# ---------------------------------------------------------------- reading a DCP checkpoint


class CheckpointTensors:
    """The model tensors of one DCP checkpoint, read a few at a time without a process group."""

    def __init__(self, checkpoint_uri: str, s3=None):
        self.uri, self.s3 = checkpoint_uri, s3
        metadata = self._reader().read_metadata()
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
            key[len(MODEL_PREFIX):]: (meta.properties.dtype, tuple(meta.size))
            for key, meta in metadata.state_dict_metadata.items()
            if key.startswith(MODEL_PREFIX) and isinstance(meta, TensorStorageMetadata)
        }
        if not self.specs:
            raise ExportError(f"{checkpoint_uri}: no model tensors in the checkpoint")

    def _reader(self):
        if is_s3(self.uri):
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

            return FsspecReader(self.uri, **s3fs_options(self.s3))
        from torch.distributed.checkpoint import FileSystemReader

        return FileSystemReader(self.uri)

    def nbytes(self, name: str) -> int:
        dtype, shape = self.specs[name]
        return torch.Size(shape).numel() * dtype.itemsize

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        tensors = {n: torch.empty(self.specs[n][1], dtype=self.specs[n][0]) for n in names}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": tensors}, storage_reader=self._reader(), no_dist=True)
        return tensors

    def stream(self, names: list[str], group_bytes: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in the order given, read in groups of at most ``group_bytes`` (default
        READ_GROUP_BYTES), or one tensor when it alone is larger."""
        group_bytes = READ_GROUP_BYTES if group_bytes is None else group_bytes
        group: list[str] = []
        size = 0
        for name in names:
            if group and size + self.nbytes(name) > group_bytes:
                yield from self.read(group).items()
                group, size = [], 0
            group.append(name)
            size += self.nbytes(name)
        if group:
            yield from self.read(group).items()


# ---------------------------------------------------------------- writing safetensors tensor by tensor


def safetensors_header(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None) -> bytes:
    """The safetensors header (8-byte length + JSON, padded to 8 bytes) for tensors laid out in order."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (dtype, shape) in specs.items():
        if dtype not in _SAFETENSORS_DTYPES:
            raise ExportError(f"{name}: dtype {dtype} has no safetensors equivalent")
        end = offset + torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(
    open_output: Callable[[str], object],
    path: str,
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a safetensors file whose tensors arrive one at a time (in ``specs`` order): the header is
    known from the shapes alone, so no more than one tensor is held. Returns the bytes written."""
    expected = iter(specs.items())
    written = 0
    with open_output(path) as f:
        header = safetensors_header(specs, metadata)
        f.write(header)
        written += len(header)
        for name, tensor in tensors:
            want_name, (dtype, shape) = next(expected)
            # Same elements, maybe another shape: FSDP2 checkpoints hold 0-d parameters as 1-element
            # vectors (fsdp.promote_scalar_parameters); the export takes the model's own shape.
            if name != want_name or tensor.dtype != dtype or tensor.numel() != torch.Size(shape).numel():
                raise ExportError(f"{path}: got {name} {tensor.dtype} {tuple(tensor.shape)}, expected {want_name} {dtype} {shape}")
            data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
            f.write(memoryview(data))
            written += data.nbytes
    if next(expected, None) is not None:
        raise ExportError(f"{path}: the stream ended before every tensor was written")
    return written


def _shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    total = 0
    for name, size in sizes.items():
        if shards[-1] and total + size > max_bytes:
            shards.append([])
            total = 0
        shards[-1].append(name)
        total += size
    return shards


class _Output:
    """Where an export goes (local directory or s3://), written through fsspec."""

    def __init__(self, uri: str, s3):
        self.uri = uri
        self.fs, self.root = filesystem(uri, s3)
        self.fs.makedirs(self.root, exist_ok=True)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def open(self, path: str):
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        return self.fs.open(path, "wb")

    def write_json(self, relative: str, data: dict) -> None:
        with self.open(self.path(relative)) as f:
            f.write(json.dumps(data, indent=1).encode())

    def put_dir(self, local_dir: str, relative: str) -> None:
        for name in sorted(os.listdir(local_dir)):
            with open(os.path.join(local_dir, name), "rb") as src, self.open(self.path(relative, name)) as dst:
                dst.write(src.read())


def _end_of_run_delay(config: Config) -> None:
    """Fault injection (tests): a slow export, to show that no training rank waits for it."""
    delay = config.cluster.fault_injection.export_delay_s
    if delay:
        log.warning("fault injection: export delayed by %.1f s", delay)
        time.sleep(delay)


# ---------------------------------------------------------------- stage 1


def export_tower_from_checkpoint(config: Config, checkpoint_uri: str, export_uri: str) -> dict:
    """tower.safetensors + tower.json from the stage-1 checkpoint; returns codebook statistics."""
    from orchestration.data.sources import s3_settings
    from orchestration.train.outputs import TOWER_FILE, TOWER_META, tower_metadata
    from orchestration.data.tower_data import tower_config
    from orchestration.train.tower import tower_loss_config
    from vilau_model.vision_tower import UnifiedVisionTower

    _end_of_run_delay(config)
    s3 = s3_settings(config)
    checkpoint = CheckpointTensors(checkpoint_uri, s3)
    tower_cfg, loss_cfg = tower_config(config), tower_loss_config(config)
    # The names and shapes the tower expects, without allocating it or reading pretrained/VGG weights.
    meta_cfg = dataclasses.replace(tower_cfg, pretrained=None)
    meta_loss = dataclasses.replace(loss_cfg, perceptual_weight=0.0, perceptual_weights_path=None)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in UnifiedVisionTower(meta_cfg, meta_loss).state_dict().items()
                    if not k.startswith("perceptual.")}
    names = [n for n in checkpoint.specs if not n.startswith("perceptual.")]
    missing, unexpected = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
    if missing or unexpected:
        raise ExportError(f"{checkpoint_uri}: tower export: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = _Output(export_uri, s3)
    write_safetensors(
        out.open, out.path(TOWER_FILE), {n: (checkpoint.specs[n][0], expected[n]) for n in names}, checkpoint.stream(names),
        metadata={"config_name": tower_cfg.name, "clip_model": tower_cfg.clip_model},
    )
    out.write_json(TOWER_META, tower_metadata(tower_cfg, loss_cfg))
    ema_count = checkpoint.read(["quantizer.ema_count"])["quantizer.ema_count"]
    return {"ema_count": ema_count}


# ---------------------------------------------------------------- stage 2


def _meta_llm(lm_cfg, vocab_size: int):
    """The LLM on the meta device: its config and state-dict names, without weights."""
    from vilau_model.unified_lm import build_llm

    # build_llm's own meta path: the pretrained config with the markers' rows and the run's RoPE scaling,
    # so that config.json tells plain transformers the RoPE the model was trained with.
    with torch.device("meta"):
        return build_llm(lm_cfg, vocab_size)


def export_lm_from_checkpoint(
    config: Config, checkpoint_uri: str, export_uri: str, tokenizer_files: dict[str, bytes], tower_path: str
) -> dict:
    """The stage-2 export (see the module docstring) from the stage-2 checkpoint and the stage-1 export."""
    from orchestration.data.lm_data import lm_config
    from orchestration.data.sources import s3_settings
    from orchestration.train.outputs import HEAD_PREFIXES, LLM_DIR, LM_META, LM_WEIGHTS, TOWER_FILE, TOWER_META, lm_metadata
    from vilau_model.tokenizer import SpecialIds, load_tokenizer

    _end_of_run_delay(config)
    s3 = s3_settings(config)
    checkpoint = CheckpointTensors(checkpoint_uri, s3)
    out = _Output(export_uri, s3)
    with tempfile.TemporaryDirectory(prefix="vilau-lm-export-") as tmp:
        tokenizer_dir = os.path.join(tmp, "tokenizer_in")
        os.makedirs(tokenizer_dir)
        for name, data in tokenizer_files.items():
            with open(os.path.join(tokenizer_dir, name), "wb") as f:
                f.write(data)
        tokenizer = load_tokenizer(tokenizer_dir)
        special = SpecialIds.from_tokenizer(tokenizer)
        lm_cfg = lm_config(config)

        # llm/: the Hugging Face layout save_pretrained writes, tied duplicates left out as it does.
        llm = _meta_llm(lm_cfg, special.vocab_size)
        seen, hf_names, hf_shapes = set(), [], {}
        for name, param in llm.state_dict(keep_vars=True).items():
            if id(param) not in seen:
                seen.add(id(param))
                hf_names.append(name)
                hf_shapes[name] = tuple(param.shape)
        missing = [n for n in hf_names if f"llm.{n}" not in checkpoint.specs]
        if missing:
            raise ExportError(f"{checkpoint_uri}: LLM export: missing {missing[:5]}")
        shards = _shards({n: checkpoint.nbytes(f"llm.{n}") for n in hf_names}, HF_SHARD_BYTES)
        files = ["model.safetensors"] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
        ]
        weight_map = {}
        for file, shard in zip(files, shards):
            stream = ((n[len("llm."):], t) for n, t in checkpoint.stream([f"llm.{n}" for n in shard]))
            specs = {n: (checkpoint.specs[f"llm.{n}"][0], hf_shapes[n]) for n in shard}
            write_safetensors(out.open, out.path(LLM_DIR, file), specs,
                              stream, metadata={"format": "pt"})
            weight_map.update({n: file for n in shard})
        if len(files) > 1:
            total = sum(checkpoint.nbytes(f"llm.{n}") for n in hf_names)
            out.write_json("llm/model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
        llm.config.architectures = [type(llm).__name__]
        config_dir = os.path.join(tmp, "llm")
        llm.config.save_pretrained(config_dir)
        tokenizer.save_pretrained(config_dir)
        out.put_dir(config_dir, LLM_DIR)

        heads = [n for n in checkpoint.specs if n.startswith(HEAD_PREFIXES)]
        if not heads:
            raise ExportError(f"{checkpoint_uri}: no projector/depth-transformer weights in the checkpoint")
        write_safetensors(out.open, out.path(LM_WEIGHTS), {n: checkpoint.specs[n] for n in heads}, checkpoint.stream(heads))
        template = None
        if config.model.init_from:  # a run started from an import keeps the release's chat template
            from orchestration.released import export_conversation

            template = export_conversation(config.model.init_from)
        out.write_json(LM_META, lm_metadata(lm_cfg, special, template))

    # The frozen tower, as stage 1 exported it.
    src_fs, src = filesystem(tower_path, s3)
    tower_dir = src if src_fs.isdir(src) else src.rsplit("/", 1)[0]
    tower_file = next((p for p in sorted(src_fs.find(tower_dir)) if p.endswith(".safetensors")), None)
    if tower_file is None:
        raise ExportError(f"{tower_path}: no tower safetensors to copy into the stage-2 export")
    for source, target in ((tower_file, TOWER_FILE), (f"{tower_dir}/{TOWER_META}", TOWER_META)):
        with src_fs.open(source, "rb") as f, out.open(out.path(target)) as g:
            while block := f.read(64 << 20):
                g.write(block)
    return {"llm_files": files}


def export_uri_of(run_uri: str) -> str:
    return join(run_uri, "export")


# ---------------------------------------------------------------- the end-of-run tasks (driver calls them)


def finish_tower_stage(config: Config, checkpoint_uri: str, export_uri: str, run, step: int) -> dict:
    """Ray task body: the tower export, then its codebook-usage plot and dead-code count in MLflow."""
    started_at = time.time()
    info = export_tower_from_checkpoint(config, checkpoint_uri, export_uri)
    from orchestration.train.artifacts import codebook_usage_figure
    from orchestration.data.tower_data import tower_config
    from orchestration.train.tracking import RunLogger

    logger = RunLogger(run.tracking_uri, run.mlflow_run_id, active=True)
    fig = codebook_usage_figure(info["ema_count"], f"{tower_config(config).name} tower")
    logger.log_figure(fig, "codebook_usage.png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    metrics = {"codebook_dead_codes": float((info["ema_count"] < 1.0).sum())}
    logger.log_metrics(metrics, step)
    return {"metrics": metrics, "started_at": started_at}


def finish_lm_export(config: Config, checkpoint_uri: str, export_uri: str, tokenizer_files: dict[str, bytes],
                     tower_path: str) -> dict:
    """Ray task body: the stage-2 export."""
    started_at = time.time()
    export_lm_from_checkpoint(config, checkpoint_uri, export_uri, tokenizer_files, tower_path)
    return {"metrics": {}, "started_at": started_at}
