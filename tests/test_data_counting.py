"""Planning counts: img2dataset stats files where a crawl left them, parquet footers otherwise, and the
plan says which (orchestration/data/counting.py)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestration.data.counting import FROM_FOOTERS, FROM_STATS, count_sources
from orchestration.storage import filesystem, upload_dir
from tests.conftest import S3_BUCKET


def write_shard(directory, name: str, rows: int, row_group_size: int | None = None, successes: int | None = None,
                stats_text: str | None = None) -> None:
    """An img2dataset-style parquet shard (key, jpg, caption; failed downloads have no image) and, with
    ``successes`` or ``stats_text``, its ``<name>_stats.json`` beside it."""
    images = [b"\xff\xd8jpeg" if successes is None or i < successes else None for i in range(rows)]
    table = pa.table({"key": [f"{name}{i:04d}" for i in range(rows)], "jpg": images,
                      "caption": [f"caption {i}" for i in range(rows)]})
    pq.write_table(table, directory / f"{name}.parquet", row_group_size=row_group_size)
    if successes is not None:
        stats_text = json.dumps({"count": rows, "successes": successes, "failed_to_download": rows - successes,
                                 "failed_to_resize": 0, "duration": 1.5, "status_dict": {"success": successes}})
    if stats_text is not None:
        (directory / f"{name}_stats.json").write_text(stats_text)


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    """Four shards: two with stats files, one without, one whose stats file is not one."""
    root = tmp_path_factory.mktemp("crawl")
    shards = root / "coyo"
    shards.mkdir()
    write_shard(shards, "00000", rows=12, successes=9)
    write_shard(shards, "00001", rows=10, successes=10)
    write_shard(shards, "00002", rows=11)  # no stats file: its footer counts it
    write_shard(shards, "00003", rows=7, stats_text="{not json")  # a broken stats file: the footer instead
    return root


def sizes(counts, name="coyo") -> dict[str, int]:
    out: dict[str, int] = {}
    for uri, _, _, n in counts[name].pieces:
        key = uri.rsplit("/", 1)[-1]
        out[key] = out.get(key, 0) + n
    return out


def test_stats_files_count_their_shards_footers_the_rest_and_the_plan_says_which(crawl):
    counts = count_sources({"coyo": {"format": "coyo_parquet", "path": str(crawl / "coyo")}}, None, unit_rows=10_000)
    # A stats file's successes (what trains: the other rows carry no image), else the footer's rows.
    assert sizes(counts) == {"00000.parquet": 9, "00001.parquet": 10, "00002.parquet": 11, "00003.parquet": 7}
    assert counts["coyo"].shards == {FROM_STATS: 2, FROM_FOOTERS: 2, "counted": 0, "estimated": 0}
    assert counts["coyo"].method == f"{FROM_STATS} (2 shards), {FROM_FOOTERS} (2 shards)"
    assert not counts["coyo"].estimated


def test_a_shard_bigger_than_a_unit_is_cut_at_its_row_groups_despite_its_stats_file(tmp_path):
    shards = tmp_path / "coyo"
    shards.mkdir()
    write_shard(shards, "00000", rows=30, row_group_size=10, successes=28)
    write_shard(shards, "00001", rows=5, successes=5)
    counts = count_sources({"coyo": {"format": "coyo_parquet", "path": str(shards)}}, None, unit_rows=10)
    pieces = sorted((uri.rsplit("/", 1)[-1], groups, n) for uri, groups, _, n in counts["coyo"].pieces)
    assert pieces == [("00000.parquet", (0, 1), 10), ("00000.parquet", (1, 2), 10), ("00000.parquet", (2, 3), 10),
                      ("00001.parquet", None, 5)]


def test_counts_on_s3_match_local_and_the_epoch_plan_records_the_method(crawl, s3_server, tmp_path):
    from orchestration.config import load_config
    from orchestration.data.epochs import EpochPlan
    from orchestration.data.tower_data import plan_tower_data

    uri = f"s3://{S3_BUCKET}/counting-crawl"
    upload_dir(str(crawl), uri, s3_server)
    counts = count_sources({"coyo": {"format": "coyo_parquet", "path": f"{uri}/coyo"}}, s3_server, unit_rows=10_000)
    assert sizes(counts) == {"00000.parquet": 9, "00001.parquet": 10, "00002.parquet": 11, "00003.parquet": 7}

    fs, path = filesystem(f"{uri}/coyo/00002_stats.json", s3_server)
    with fs.open(path, "w") as f:  # now every readable stats file is there: the source is counted from them
        f.write(json.dumps({"count": 11, "successes": 11}))
    config = load_config(None, [
        f"data.root={uri}", f"output_dir={tmp_path}", "data.synthetic.make_if_missing=false",
        "data.tower_sources={coyo: {format: coyo_parquet, path: coyo}}",
        f"data.s3.endpoint_url={s3_server.endpoint_url}", f"data.s3.access_key_id={s3_server.access_key_id}",
        f"data.s3.secret_access_key={s3_server.secret_access_key}",
    ])
    plan = plan_tower_data(config)
    assert sum(u.size for u in plan.units) == 9 + 10 + 11 + 7
    again = EpochPlan.from_json(plan.to_json())  # what the workers read from the run's directory
    assert again.counted_by == {"coyo": f"{FROM_STATS} (3 shards), {FROM_FOOTERS} (1 shard)"}
    assert again == plan
