"""Typed, validated run configuration.

A run is configured by one YAML preset (``jobs/configs/*.yaml``) plus ``section.key=value`` overrides
from the command line. Everything is checked here, before any cluster resource is taken: unknown keys,
wrong types and out-of-range values fail with a :class:`ConfigError` naming the field and the bad value.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from vilau_model.config import LM_PRESETS, LMConfig, PAPER_LM_PRESETS, PAPER_TOWER_PRESETS, TOWER_PRESETS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "jobs" / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"
REDACTED = "**********"

log = logging.getLogger(__name__)


def absolute_local_path(path: str | None) -> str | None:
    """A relative local path made absolute against the current directory; URIs pass through.

    Paths are fixed when the config is loaded, on the driver: Ray workers run in other directories.
    """
    if path is None or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def pretrained_context(model: "ModelSection") -> int | None:
    """max_position_embeddings of the pretrained LLM (its local config.json), or None when there is none."""
    if not model.lm_path or "://" in model.lm_path:
        return None
    try:
        with open(os.path.join(model.lm_path, "config.json")) as f:
            return int(json.load(f).get("max_position_embeddings") or 0) or None
    except (OSError, ValueError):
        return None


class ConfigError(ValueError):
    """A configuration that cannot run; the message names every bad field and value."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)


# ---------------------------------------------------------------- model


class RopeScalingSection(Section):
    type: Literal["linear", "dynamic", "yarn", "llama3"] = "linear"
    factor: float = Field(default=2.0, gt=1.0)


class ModelSection(Section):
    tower: str = "tiny"
    lm: str = "tiny"
    # open_clip tag or local checkpoint to initialise the tower encoders from (the real recipe).
    tower_pretrained: str | None = None
    # Local path of a text tokenizer for the tower (SigLIP presets need one; CLIP presets ship theirs).
    tower_text_tokenizer: str | None = None
    # A stage-1 export to start stage 2 from; None = the export stage 1 of this run wrote.
    tower_checkpoint: str | None = None
    # Local path of a pretrained LLM + tokenizer (LLaMA-2-7B for the paper preset).
    lm_path: str | None = None
    codebook_size: PositiveInt | None = None
    code_depth: PositiveInt | None = None
    # Pixel normalization of the tower; None = the checkpoint's own preprocessing config.
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] | None = None
    # RoPE scaling of the LLM (transformers `rope_scaling`), e.g. {type: linear, factor: 2.0} to train
    # 8192-token rows on LLaMA-2's 4096 context.
    rope_scaling: RopeScalingSection | None = None
    # Attention over packed rows (vilau_model/packed_attention.py): sdpa_dense = a [B,1,L,L] mask (any
    # device; the tiny default), flex = FlexAttention with a block mask from the segment ids (never
    # [L,L], skips other samples' tiles; GPU only for training: torch 2.14 has no CPU flex backward),
    # flash_varlen = flash-attn's varlen kernel (GPU, the `gpu` extra: pip install '.[gpu]').
    attention: Literal["sdpa_dense", "flex", "flash_varlen"] = "sdpa_dense"
    # Paper presets refuse to start without tower_pretrained / lm_path; true lets them train from random init.
    allow_random_init: bool = False
    # A stage-2 export to start from (a run's <run>-lm/export, or `python jobs/import_vila_u.py` of a released
    # VILA-U): lm_path and tower_checkpoint default to its llm/ and its tower, the LM's and the tower's
    # architecture come from its vilau_lm.json / tower.json, stage 2 also starts its projector and depth
    # transformer from it, and stage 1 starts the whole tower from it.
    init_from: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _init_from_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("init_from"):
            data = dict(data)
            root = absolute_local_path(data["init_from"])
            data["init_from"] = root
            if not data.get("lm_path"):
                data["lm_path"] = os.path.join(root, "llm")
            if not data.get("tower_checkpoint"):
                data["tower_checkpoint"] = root
        return data

    @model_validator(mode="after")
    def _pretrained_weights_for_paper_presets(self) -> "ModelSection":
        if self.allow_random_init or self.init_from:
            return self
        if self.tower in PAPER_TOWER_PRESETS and not self.tower_pretrained:
            raise ValueError(
                f"model.tower_pretrained: required for the paper preset tower={self.tower!r} (the tower does not "
                "converge from random init); set it to a CLIP/SigLIP checkpoint (open_clip file or directory, or "
                "a transformers SigLIP directory), or set model.allow_random_init=true"
            )
        if self.lm in PAPER_LM_PRESETS and not self.lm_path:
            raise ValueError(
                f"model.lm_path: required for the paper preset lm={self.lm!r}; set it to a local LLaMA-2 "
                "directory (weights + tokenizer), or set model.allow_random_init=true"
            )
        return self

    @field_validator("tower")
    @classmethod
    def _known_tower(cls, value: str) -> str:
        if value not in TOWER_PRESETS:
            raise ValueError(f"unknown vision tower preset; known: {sorted(TOWER_PRESETS)}")
        return value

    @field_validator("lm")
    @classmethod
    def _known_lm(cls, value: str) -> str:
        if value not in LM_PRESETS:
            raise ValueError(f"unknown LM preset; known: {sorted(LM_PRESETS)}")
        return value

    def tower_overrides(self) -> dict[str, Any]:
        overrides: dict[str, Any] = {}
        if self.codebook_size is not None:
            overrides["codebook_size"] = self.codebook_size
        if self.code_depth is not None:
            overrides["code_depth"] = self.code_depth
        if self.tower_pretrained is not None:
            overrides["pretrained"] = self.tower_pretrained
        if self.image_mean is not None:
            overrides["image_mean"] = tuple(self.image_mean)
        if self.image_std is not None:
            overrides["image_std"] = tuple(self.image_std)
        return overrides

    def lm_overrides(self) -> dict[str, Any]:
        overrides: dict[str, Any] = {}
        if self.lm_path:
            overrides["pretrained_path"] = self.lm_path
        if self.rope_scaling is not None:
            overrides["rope_scaling_type"] = self.rope_scaling.type
            overrides["rope_scaling_factor"] = self.rope_scaling.factor
        overrides["attention"] = self.attention
        return overrides


# ---------------------------------------------------------------- data


class S3Section(Section):
    """How to reach s3:// URIs. Credentials default to the standard AWS environment variables."""

    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    anonymous: bool = False
    max_retries: NonNegativeInt = 5


SourceFormat = Literal["coyo_parquet", "coyo_webdataset", "mmc4", "openvid", "sharegpt4v"]


class SourceSection(Section):
    format: SourceFormat
    # A directory or URI; relative paths are taken under data.root.
    path: str
    # This source's share of the trained samples (relative to the other sources' weights; a stage-2
    # image-text pair trained both ways is two samples); records repeat or are subsampled to match.
    weight: NonNegativeFloat = 1.0
    # Where referenced images/videos live (MMC4, OpenVid, ShareGPT4V); None = the dataset's own layout
    # beside the index files (<path>/images, <path>/videos, <path>). Relative paths are under data.root.
    media_root: str | None = None
    # Image-text pairs and video clips in stage 2: [image/video, text] (understanding), [text,
    # image/video] (generation), or both (two samples per record).
    image_text_task: Literal["understanding", "generation", "both"] = "both"


class SyntheticSection(Section):
    """The generated shards that the embedded default and the tests use."""

    make_if_missing: bool = True
    samples: PositiveInt = 256
    eval_samples: PositiveInt = 64
    seed: int = 0
    corrupt_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)


def _default_sources() -> dict[str, SourceSection]:
    return {
        "coyo": SourceSection(format="coyo_parquet", path="coyo/parquet", weight=1.0),
    }


class DataSection(Section):
    root: str = "data/synthetic"
    synthetic: SyntheticSection = SyntheticSection()
    # Stage-1 sources (image-text pairs).
    tower_sources: dict[str, SourceSection] = Field(default_factory=_default_sources)
    # Stage-2 sources, mixed by weight.
    lm_sources: dict[str, SourceSection] = Field(default_factory=dict)
    # What the sources' weights are shares of: trained samples, or trained tokens (each source's tokens
    # per sample estimated at planning from its first shard; see orchestration/data/mixture.py).
    mix_by: Literal["samples", "tokens"] = "samples"
    # The order of every epoch follows from this seed (orchestration/data/epochs.py): shards permuted
    # per epoch and pass, each read task about shuffle_window_shards shards' worth of records of every
    # source, each source through its share of a buffer of shuffle_buffer_rows records.
    shuffle_seed: int = 0
    shuffle_window_shards: PositiveInt = 8
    shuffle_buffer_rows: PositiveInt = 512
    # Debugging/tests: every rank writes the keys of each micro-batch it trains on under the run's
    # storage directory (trained_keys/rank<r>/step<n>_<i>.json), one small file per micro-batch.
    record_trained_keys: bool = False
    decode_batch_size: PositiveInt = 32
    # Actors of the tokenization pool. With data.cache_dir, stage 2 tokenizes once through ONE pool of
    # this size over the whole cluster (before training takes the GPUs); without it, every training
    # rank runs a pool of this size beside its trainer (small runs only: jobs/plan.py checks the fit).
    tokenizer_actors: PositiveInt = 1
    tokenizer_actor_gpus: NonNegativeFloat = 0.0
    # How long an actor pool may wait for its actors' resources before the run fails naming them
    # (Ray Data's own default waits forever).
    actor_start_timeout_s: PositiveFloat = 600.0
    # How long a training rank waits for its next batch before the run fails naming its data pipeline.
    batch_timeout_s: PositiveFloat = 1800.0
    # Images per forward pass of the frozen tower in the tokenization pool.
    tokenizer_batch_size: PositiveInt = 16
    # Samples per call of the tokenization pool; sequences are packed within one call, so a bigger
    # window fills rows better (and holds more samples in an actor's memory). bench_packing: flushing
    # every 256 samples keeps 0.966 of the tokens real at 8192, every 1024 samples >= 0.98 (the goal).
    pack_window: PositiveInt = 1024
    seq_len: PositiveInt = 1024
    # The labelled eval split (eval.parquet + classes.json); relative paths are under data.root.
    eval_path: str = "eval"
    # Where tokenized stage-2 rows are written once and read by later runs; None = tokenize on the fly.
    cache_dir: str | None = None
    s3: S3Section = S3Section()

    _absolute_paths = field_validator("root", "cache_dir")(absolute_local_path)

    @model_validator(mode="after")
    def _some_weight(self) -> "DataSection":
        for field in ("tower_sources", "lm_sources"):
            sources = getattr(self, field)
            if sources and sum(s.weight for s in sources.values()) <= 0:
                raise ValueError(f"{field}: the source weights sum to 0")
        return self


# ---------------------------------------------------------------- training


class OptimSection(Section):
    lr: PositiveFloat = 1e-3
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    weight_decay: NonNegativeFloat = 0.0
    warmup_fraction: float = Field(default=0.03, ge=0.0, lt=1.0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: PositiveFloat = 1.0

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError("each beta must be in [0, 1)")
        return value


class StageSection(Section):
    steps: PositiveInt = 100
    batch_size_per_worker: PositiveInt = 8
    grad_accum: PositiveInt = 1
    optim: OptimSection = OptimSection()
    checkpoint_every: PositiveInt = 50
    keep_checkpoints: PositiveInt = 2
    log_every: PositiveInt = 10
    activation_checkpointing: bool = False
    # A run of this many non-finite losses in a row stops the job.
    max_nonfinite_in_a_row: PositiveInt = 5


class TowerTrainSection(StageSection):
    w_contra: NonNegativeFloat = 1.0
    w_recon: NonNegativeFloat = 1.0
    contrastive: Literal["sigmoid", "softmax"] = "sigmoid"
    pixel_loss: Literal["mse", "l1"] = "mse"
    # LPIPS (VGG16) term of the reconstruction loss; 0 = off (the tiny default), 1.0 in the paper presets.
    perceptual_weight: NonNegativeFloat = 0.0
    # The LPIPS weights, a local file (no hub at run time): an `lpips.LPIPS(net="vgg")` state dict, or
    # torchvision's VGG16 `features.*` weights (LPIPS's calibrated lin layers then come from the `lpips`
    # package's bundled vgg.pth). Required when perceptual_weight > 0 (unless model.allow_random_init).
    perceptual_weights_path: str | None = None
    # PatchGAN hinge term of the reconstruction loss, times the VQGAN adaptive weight; 0 = no
    # discriminator at all (the tiny default). RQ-VAE uses 0.75, LlamaGen 0.5.
    gan_weight: NonNegativeFloat = 0.0
    # The step (0-based) from which the generator term is on and the discriminator trains.
    gan_start_step: NonNegativeInt = 0
    # The PatchGAN: strided conv layers and base width (pix2pix / VQGAN: 3 and 64). It is small, so every
    # rank holds all of it (not sharded); its gradients are averaged over the ranks each step.
    discriminator_layers: PositiveInt = 3
    discriminator_channels: PositiveInt = 64
    # Its own AdamW: constant learning rate (None = optim.lr), VQGAN's betas, no weight decay.
    discriminator_lr: PositiveFloat | None = None
    discriminator_betas: tuple[float, float] = (0.5, 0.9)
    commitment_weight: NonNegativeFloat = 0.25
    eval_every: PositiveInt = 50
    frechet_weights_path: str | None = None

    _discriminator_betas_in_range = field_validator("discriminator_betas")(OptimSection._betas_in_range.__func__)


class LMTrainSection(StageSection):
    # Share of generation samples whose prompt is emptied (trains the CFG unconditional branch).
    caption_dropout: float = Field(default=LMConfig.caption_dropout, ge=0.0, le=1.0)
    # Images generated per eval class at the end of stage 2 (the generation score); the understanding
    # score on the held-back images runs in the same task. 0 turns both off.
    generate_samples: NonNegativeInt = 2


# The config section of each training stage.
STAGE_SECTIONS = {"tower": "tower_train", "lm": "lm_train"}


# ---------------------------------------------------------------- cluster, tracking, tune


class FaultInjectionSection(Section):
    """Kill one worker at a step, once per run, or fail one Tune trial, to exercise restarts (tests only)."""

    stage: Literal["tower", "lm"] | None = None
    fail_at_step: PositiveInt | None = None
    rank: NonNegativeInt = 0
    # "step": exit after the backward pass of that step (a save in flight is let commit first);
    # "save": exit half-way through that step's asynchronous checkpoint save, in its background thread
    # while training goes on (shards written, COMPLETE marker not, never registered).
    phase: Literal["step", "save"] = "step"
    # Seconds the end-of-run export waits before it starts (a slow export at scale, in small).
    export_delay_s: NonNegativeFloat = 0.0
    # Tune: the trial with this index in the sweep (its id ends in _0000N) raises at its start, before its
    # Train run, in its first `trial_failures` attempts (a transient failure, or with a large count one
    # that never goes away). None: no trial fails.
    trial_index: NonNegativeInt | None = None
    trial_failures: PositiveInt = 1
    # After each restore from a checkpoint, rank 0 writes restored_state_step<N>.json into the run's
    # directory: sums of every restored model and optimizer tensor, for tests to hold against the
    # checkpoint's own files (gathers each tensor whole: tiny models only).
    record_restored_state: bool = False


class ClusterSection(Section):
    # None: join the cluster in RAY_ADDRESS (set inside `ray job submit`), else start a local Ray
    # instance; "auto" or ray://... joins that cluster.
    address: str | None = None
    # Logical CPUs for a local instance; Data and Train deadlock on few cores without oversubscription.
    local_num_cpus: PositiveInt = 8
    num_workers: PositiveInt = 2
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    # Memory of one GPU of the training nodes (GiB); jobs/plan.py refuses a step whose per-GPU peak
    # exceeds 0.9 of it. None: not checked (CPU runs).
    gpu_memory_gib: PositiveFloat | None = None
    # The `ray up` file whose node types (x their max_workers) the plan holds the run against: the most
    # an autoscaling cluster can grow to. None: the live cluster when one is reachable, else the local
    # instance. Relative paths are taken from the current directory, then the project root.
    cluster_yaml: str | None = None
    # How long the training worker group may wait for its placement group (a stage's GPUs/CPUs) before
    # the run fails naming what it asked for; Ray Train alone retries forever.
    worker_start_timeout_s: PositiveFloat = 900.0
    storage_path: str = "outputs/ray"
    # Local paths (data.root, storage_path, output_dir, ...) are on a filesystem that every node mounts
    # (NFS, EFS, FSx). Without it, a job that joins a multi-node cluster refuses node-local paths.
    shared_filesystem: bool = False
    max_failures: NonNegativeInt = 0
    # HSDP: replicas of the model across node groups, each sharded over num_workers / hsdp_replicas
    # ranks (a 2-d mesh: shard within a node, replicate across nodes). 1 = plain FSDP.
    hsdp_replicas: PositiveInt = 1
    # Ray Train's process-group timeout (TorchConfig.timeout_s): how long a rank waits in a collective.
    process_group_timeout_s: PositiveInt = 1800
    fault_injection: FaultInjectionSection = FaultInjectionSection()

    _absolute_paths = field_validator("storage_path")(absolute_local_path)

    @model_validator(mode="after")
    def _replicas_divide_workers(self) -> "ClusterSection":
        if self.num_workers % self.hsdp_replicas:
            raise ValueError(
                f"hsdp_replicas={self.hsdp_replicas} must divide num_workers={self.num_workers}"
            )
        return self


class TrackingSection(Section):
    enabled: bool = True
    # None = SQLite under output_dir; a server URI (http://...) for clusters.
    uri: str | None = None
    experiment: str = "vilau"
    # Set by the pipeline (pretrain) and the Tune sweep: each stage's or trial's run is nested under it.
    parent_run_id: str | None = None
    # Register each stage's export as a version of the MLflow model "<register_as>-<stage>"; None: logged only.
    register_as: str | None = None


class SearchRange(Section):
    low: NonNegativeFloat
    high: NonNegativeFloat
    log: bool = False
    # For grid search: explicit values; None = low and high.
    values: list[NonNegativeFloat] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> "SearchRange":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class TuneSection(Section):
    w_contra: SearchRange = SearchRange(low=0.5, high=2.0, values=[0.5, 2.0])
    w_recon: SearchRange = SearchRange(low=0.5, high=2.0, values=[0.5, 2.0])
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: PositiveInt = 4
    max_concurrent_trials: PositiveInt = 2
    # Objective (higher is better): zero_shot_accuracy + psnr_weight * min(psnr, 50) / 50;
    # see orchestration/tune.py.
    psnr_weight: NonNegativeFloat = 1.0
    # ASHA: a trial runs at least grace_period evaluations; each rung keeps 1/reduction_factor.
    grace_period: PositiveInt = 1
    reduction_factor: float = Field(default=2.0, gt=1.0)
    workers_per_trial: PositiveInt = 1
    # The sweep's name (its folder under cluster.storage_path); None = "<run_name>-sweep".
    name: str | None = None
    # Tune restarts a failed trial this many times (a lost node, a preempted worker, a flaky read);
    # each retry's Train run resumes from the trial's latest checkpoint. A trial that still fails shows
    # its error in the sweep summary and on its MLflow run.
    trial_max_failures: NonNegativeInt = 2


class Config(Section):
    run_name: str = "tiny"
    output_dir: str = "outputs"
    seed: int = 0
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    tower_train: TowerTrainSection = TowerTrainSection()
    lm_train: LMTrainSection = LMTrainSection()
    cluster: ClusterSection = ClusterSection()
    tracking: TrackingSection = TrackingSection()
    tune: TuneSection = TuneSection()

    _absolute_paths = field_validator("output_dir")(absolute_local_path)

    @field_validator("run_name")
    @classmethod
    def _run_name_is_a_name(cls, value: str) -> str:
        if not value or "/" in value or value.strip() != value:
            raise ValueError("must be a non-empty name without '/' or surrounding spaces")
        return value

    @model_validator(mode="after")
    def _warn_beyond_pretrained_context(self) -> "Config":
        context = pretrained_context(self.model)
        factor = self.model.rope_scaling.factor if self.model.rope_scaling is not None else 1.0
        if context and self.data.seq_len > context * factor:
            log.warning(
                "data.seq_len=%d exceeds the LLM's pretrained context of %d positions%s; consider "
                "model.rope_scaling (e.g. {type: linear, factor: %g})",
                self.data.seq_len, context, f" x RoPE factor {factor:g}" if factor != 1.0 else "",
                self.data.seq_len / context,
            )
        return self

    def resolve_path(self, path: str) -> str:
        """A data path under data.root unless it is absolute or a URI."""
        if "://" in path or os.path.isabs(path):
            return path
        root = self.data.root
        return f"{root.rstrip('/')}/{path}" if "://" in root else str(Path(root) / path)

    @model_validator(mode="after")
    def _perceptual_weights_when_on(self) -> "Config":
        t = self.tower_train
        if t.perceptual_weight > 0 and not t.perceptual_weights_path and not self.model.allow_random_init:
            raise ValueError(
                f"tower_train.perceptual_weights_path: required with tower_train.perceptual_weight="
                f"{t.perceptual_weight:g} (a local LPIPS VGG16 file: an lpips.LPIPS(net='vgg') state dict or "
                "torchvision's VGG16 weights); or set tower_train.perceptual_weight=0, or model.allow_random_init="
                "true to run without it"
            )
        return self

    @model_validator(mode="after")
    def _gpu_attention_on_gpu(self) -> "Config":
        if self.model.attention != "sdpa_dense" and not self.cluster.use_gpu:
            raise ValueError(
                f"model.attention: {self.model.attention} trains on GPU workers only (torch has no CPU "
                "FlexAttention backward; flash-attn is CUDA only) but cluster.use_gpu is false; "
                "use model.attention=sdpa_dense on CPU"
            )
        return self

    @model_validator(mode="after")
    def _tracking_store_reachable(self) -> "Config":
        if self.tracking.enabled and not self.tracking.uri and "://" in self.output_dir:
            raise ValueError(
                f"tracking.uri: unset means SQLite under output_dir, but output_dir is {self.output_dir!r}; "
                "set tracking.uri to an MLflow server (http://host:5000)"
            )
        return self

    @property
    def tracking_uri(self) -> str:
        if self.tracking.uri:
            return self.tracking.uri
        return f"sqlite:///{Path(self.output_dir).resolve() / 'mlflow.db'}"


# ---------------------------------------------------------------- loading, overrides, dumping


def _known_keys(loc: tuple) -> list[str]:
    """The keys of the section that ``loc`` (a path to an unknown key) lands in."""
    model: Any = Config
    parts = list(loc[:-1])
    while parts:
        part = parts.pop(0)
        field = model.model_fields.get(str(part)) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        annotation = field.annotation
        if typing.get_origin(annotation) is dict:  # a named entry (a source): its keys are the value type's
            annotation = typing.get_args(annotation)[1]
            parts = parts[1:]
        model = next((a for a in (annotation, *typing.get_args(annotation))
                      if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def _format_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "<config>"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(item["loc"][-1]), _known_keys(item["loc"]), n=1)
            prefix = ".".join(str(part) for part in item["loc"][:-1])
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            lines.append(f"{field}: unknown key (got {item['input']!r}){hint}")
        elif item["type"] == "value_error" and message.startswith(f"{field}."):
            lines.append(message)  # a section's own check that names the field itself
        else:
            lines.append(f"{field}: {item['msg']} (got {item.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({exc})") from None
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted key in a copy of ``raw``. A section the file leaves out starts from its
    defaults, so ``tune.w_recon.low=0.1`` keeps the default ``high``."""
    result = copy.deepcopy(raw)
    defaults = Config().model_dump(mode="python")
    for text in overrides:
        parts, value = parse_override(text)
        node, default_node = result, defaults
        for part in parts[:-1]:
            default_child = default_node.get(part) if isinstance(default_node, dict) else None
            if part not in node:
                node[part] = copy.deepcopy(default_child) if isinstance(default_child, dict) else {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node, default_node = node[part], default_child
        node[parts[-1]] = value
    return result


def build_config(raw: dict[str, Any] | None, overrides: list[str] = ()) -> Config:
    merged = apply_overrides(raw or {}, list(overrides))
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None


PLACEHOLDER = re.compile(r"<[^<>/]+>")

def check_placeholders(config: Config) -> None:
    """Refuse a preset's documented ``<...>`` placeholders (e.g. ``s3://<bucket>/...``) left in place."""
    fields = [("data.root", config.data.root), ("data.cache_dir", config.data.cache_dir),
              ("cluster.storage_path", config.cluster.storage_path), ("output_dir", config.output_dir),
              ("tracking.uri", config.tracking.uri), ("cluster.address", config.cluster.address),
              ("data.s3.endpoint_url", config.data.s3.endpoint_url)]
    left = [(f, v) for f, v in fields if v and PLACEHOLDER.search(v)]
    if left:
        raise ConfigError(
            "these fields still hold a placeholder from the preset; set them in the file or on the command "
            "line (field=value):\n  " + "\n  ".join(f"{f}={v!r}" for f, v in left)
        )



def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML preset (default: the tiny preset), apply overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file() and not path.suffix and (CONFIG_DIR / f"{path}.yaml").is_file():
        path = CONFIG_DIR / f"{path}.yaml"  # a preset name such as "tiny"
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    config = build_config(raw, overrides)
    check_placeholders(config)
    return config


def config_to_dict(config: Config, redact: bool = True) -> dict[str, Any]:
    data = config.model_dump(mode="python")

    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [clean(v) for v in node]
        if isinstance(node, SecretStr):
            return REDACTED if redact else node.get_secret_value()
        return node

    return clean(data)


def config_to_yaml(config: Config) -> str:
    """The resolved config as YAML with every secret redacted (safe for MLflow and logs)."""
    return yaml.safe_dump(config_to_dict(config, redact=True), sort_keys=False)


def flatten_config(config: Config) -> dict[str, str]:
    """Dotted keys -> strings, secrets redacted: the form MLflow params take."""
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = str(node)

    walk("", config_to_dict(config, redact=True))
    return flat
