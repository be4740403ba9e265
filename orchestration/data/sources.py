"""From the config's sources to a Ray dataset of normalized records (read stage of both pipelines)."""

from __future__ import annotations

import functools
import logging

import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from orchestration.config import Config, ConfigError, SourceSection
from orchestration.data.epochs import STREAM_SCHEMA, DataPosition, EpochPlan, Window, window_reader
from orchestration.data.counting import count_sources
from orchestration.data.mixture import PARQUET_UNIT_ROWS, plan_reads
from orchestration.data.records import FORMAT_KIND, KIND_IMAGE_TEXT, KIND_VIDEO, FaultLedger, reading_with
from orchestration.data.synthetic import ensure_synthetic_dataset, synthetic_folder_state
from orchestration.storage import S3Settings, is_s3

log = logging.getLogger(__name__)


def s3_settings(config: Config) -> S3Settings:
    return S3Settings.from_config(config.data.s3)


def ensure_data(config: Config) -> None:
    """Write the synthetic shards under data.root when the config asks for them and none are there.

    The one place that writes generated data. It writes only into a local data.root that is absent,
    empty, or holds an earlier generation (its manifest, or the mark of one that did not finish); any
    other folder may hold a user's real shards and is refused with a ConfigError naming data.root.
    Called before Ray starts (launch.preflight) and again by the data planners (a no-op by then).
    """
    synthetic = config.data.synthetic
    root = config.data.root
    if not synthetic.make_if_missing or is_s3(root):
        return
    state = synthetic_folder_state(root)
    if state == "complete":
        return
    if state == "foreign":
        raise ConfigError(
            f"data.root: {root} holds files that are not generated shards (no synthetic manifest.json), and "
            "data.synthetic.make_if_missing=true would write generated shards there. To train on the data in it, "
            "set data.synthetic.make_if_missing=false (and data.tower_sources / data.lm_sources to its layout); "
            "for generated data, point data.root at a new or empty folder"
        )
    ensure_synthetic_dataset(
        root,
        samples=synthetic.samples,
        seed=synthetic.seed,
        corrupt_fraction=synthetic.corrupt_fraction,
        eval_samples=synthetic.eval_samples,
    )


def resolve_sources(config: Config, sources: dict[str, SourceSection], field: str, kinds: tuple[str, ...] | None = None) -> dict[str, dict]:
    """{name: {format, path, weight, media_root}} with paths resolved under data.root."""
    if not sources:
        raise ValueError(f"data.{field}: no sources configured")
    resolved = {}
    for name, source in sources.items():
        if kinds is not None and FORMAT_KIND[source.format] not in kinds:
            raise ValueError(
                f"data.{field}.{name}.format: {source.format} gives {FORMAT_KIND[source.format]} records; "
                f"this stage takes {', '.join(kinds)}"
            )
        resolved[name] = {
            "format": source.format,
            "path": config.resolve_path(source.path),
            "weight": source.weight,
            "media_root": config.resolve_path(source.media_root) if source.media_root else None,
        }
    return resolved


class WindowDatasource(Datasource):
    """One Ray Data read task per window of a rank's epoch (epochs.py), yielding STREAM_SCHEMA tables
    (normalized records + sample ids) in the window's shuffled order.

    A real datasource (rather than a map over a list of windows) keeps one task per window when Ray
    Data fuses the decode stage into the reads. With a `FaultLedger`, the read tasks skip what it
    knows to be unreadable and record what they find (records.py).
    """

    def __init__(self, windows: list[Window], s3: S3Settings | None, ledger: FaultLedger | None = None):
        self.windows, self.s3, self.ledger = windows, s3, ledger

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_name(self) -> str:
        return "Windows"

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        return [
            ReadTask(
                functools.partial(_read_window, window, self.s3, self.ledger),
                BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=[u.uri for u in window.units]),
                schema=STREAM_SCHEMA if all(u.format in FORMAT_KIND for u in window.units) else None,
                per_task_row_limit=per_task_row_limit,
            )
            for window in self.windows
        ]


WINDOW_BLOCK_BYTES = 16 * 1024 * 1024


def _read_window(window: Window, s3: S3Settings | None, ledger: FaultLedger | None):
    """One window's read task, its readers using the run's fault ledger."""
    with reading_with(ledger):
        yield from window_reader(window, s3)()


def fault_ledger(config: Config, directory: str | None) -> FaultLedger | None:
    """The unreadable shards recorded under ``directory`` (a run's or the tokenized cache's folder,
    local or s3:// with data.s3's settings), loaded now; None: faults are skipped but not recorded."""
    return FaultLedger.load(directory, s3_settings(config)) if directory else None


def read_dataset(windows: list[Window], s3: S3Settings | None, rows_per_block: int, formats: set[str],
                 ledger: FaultLedger | None = None) -> ray.data.Dataset:
    """Records of the given windows with their sample ids, in window order (``preserve_order``).

    When a source references its media (MMC4, OpenVid, ShareGPT4V), blocks are cut to
    ``rows_per_block`` records (streaming, no shuffle): a window of one big index file (ShareGPT4V's
    JSON, OpenVid's CSV) would otherwise be a single block, fetched and decoded by a single task.
    Windows with inline images (COYO) stay whole: their records are cheap to decode, and more, smaller
    tasks cost more than they parallelize.
    """
    if not windows:
        ds = ray.data.from_arrow(STREAM_SCHEMA.empty_table())
    else:
        ds = ray.data.read_datasource(WindowDatasource(windows, s3, ledger), override_num_blocks=len(windows))
        if any(FORMAT_KIND.get(fmt) not in (KIND_IMAGE_TEXT, None) for fmt in formats):
            ds = ds.repartition(target_num_rows_per_block=rows_per_block)
    ds.context.execution_options.preserve_order = True  # the epoch's order is the position's meaning
    # A window is one read task of ~shuffle_window_shards shards (80k COYO records): blocks of at most
    # WINDOW_BLOCK_BYTES, not Ray's 128 MiB, so that its first records reach the trainer after a few
    # thousand reads and decodes, not tens of thousands (the first batch of an epoch or after a resume).
    ds.context.target_max_block_size = WINDOW_BLOCK_BYTES
    return ds


def plan_sources(config: Config, sources: dict[str, SourceSection], field: str, kinds=None,
                 samples_per_record: dict[str, int] | None = None) -> EpochPlan:
    """The epoch plan of a stage's sources (the units listed and sized once, on the driver).
    ``samples_per_record``: how many trained samples a record of each source gives (default 1), so
    that the weights are shares of samples (stage 2 trains a COYO pair both ways); with
    ``data.mix_by: tokens`` they are shares of tokens (see mixture.py)."""
    resolved = resolve_sources(config, sources, field, kinds)
    for name, n in (samples_per_record or {}).items():
        resolved[name]["samples_per_record"] = n
    if config.data.mix_by == "tokens":
        per_media = visual_tokens(config)
        for name, source in resolved.items():
            source["tokens_per_media"] = per_media[FORMAT_KIND[source["format"]] == KIND_VIDEO]
    # Counted here (not inside plan_reads) so that the plan can say how: stats files, footers, estimates.
    counts = count_sources({n: s for n, s in resolved.items() if s["weight"] > 0}, s3_settings(config), PARQUET_UNIT_ROWS)
    units = plan_reads(resolved, s3_settings(config), config.data.shuffle_seed, mix_by=config.data.mix_by, counts=counts)
    return epoch_plan(config, units, {name: c.method for name, c in counts.items()})


def visual_tokens(config: Config) -> tuple[int, int]:
    """Sequence positions of one image and of one video (their grid cells and two markers)."""
    from vilau_model.config import get_lm_config, get_tower_config

    grid = get_tower_config(config.model.tower, **config.model.tower_overrides()).grid_size
    frames = get_lm_config(config.model.lm, **config.model.lm_overrides()).frames_per_video
    return grid * grid + 2, frames * grid * grid + 2


def epoch_plan(config: Config, units, counted_by: dict[str, str] | None = None) -> EpochPlan:
    data = config.data
    return EpochPlan(tuple(units), data.shuffle_seed, data.shuffle_window_shards, data.shuffle_buffer_rows,
                     counted_by=dict(counted_by or {}))


def rank_windows(plan: EpochPlan, epoch: int, rank: int, world: int, position: DataPosition | None) -> tuple[list[Window], set[str]]:
    return plan.windows(epoch, rank, world, position), {u.format for u in plan.units}
