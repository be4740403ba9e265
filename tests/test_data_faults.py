"""Faults never stop a run. Small synthetic shards get every fault at once: a bad JSON line in an MMC4
shard, a ShareGPT4V entry without ``id``, a truncated extra tar shard, a truncated extra parquet shard,
a truncated mp4, an OpenVid CSV row naming a missing clip, and one missing image of a two-image MMC4
document. The tokenization job (through its entry point) and a stage-2 run on a real local Ray instance
both finish; each fault is counted once under its reason; the tokenized samples and the trained keys
are exactly the good records' (the document that lost an image among them); the unreadable shards are
recorded in the job's / run's storage."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from orchestration.config import load_config
from orchestration.data.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parent.parent
# Every record read once per epoch: weights in proportion to the samples each source gives (a COYO pair
# and a clip train both ways, so give two), checked against the plan below.
SOURCES = ("data.lm_sources={coyo: {format: coyo_parquet, path: coyo/parquet, weight: 16}, "
           "coyo_wds: {format: coyo_webdataset, path: coyo/webdataset, weight: 20}, "
           "mmc4: {format: mmc4, path: mmc4, weight: 9}, openvid: {format: openvid, path: openvid, weight: 10}, "
           "sharegpt4v: {format: sharegpt4v, path: sharegpt4v, weight: 9}}")
EXPECTED = {"bad_line": 1, "missing_id": 1, "unreadable_shard": 2, "undecodable_video": 1, "missing_file": 2}
EXTRA_TAR_KEYS = [f"x{i:08d}" for i in range(6)]  # the extra tar is cut inside the 4th sample's image


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def faulty_shards(tmp_path_factory):
    """(data root, good keys per source): 8 records per format (4 clips), the seven faults injected."""
    root = tmp_path_factory.mktemp("faulty_shards")
    manifest = make_synthetic_dataset(root, samples=8, seed=11, eval_samples=16, shard_size=4, video_samples=4)
    coyo = pq.read_table(root / "coyo" / "parquet" / "part-00000.parquet")
    good = {
        "coyo": {k for f in (root / "coyo" / "parquet").glob("*.parquet") for k in pq.read_table(f).column("key").to_pylist()},
        "coyo_wds": {k for f in (root / "coyo" / "webdataset").glob("*.tar") for k in
                     {Path(m).stem for m in tarfile.open(f).getnames()}},
    }
    # A bad JSON line (line 2) in an MMC4 shard; one document loses the second of its two or more images.
    shard = root / "mmc4" / "docs_shard_00000_v2.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text(lines[0] + '{"url": "https://www.example.com/articles/broken", "text_list": [\n' + "".join(lines[1:]))
    docs = [json.loads(line) for f in sorted((root / "mmc4").glob("*.jsonl")) for line in f.read_text().splitlines()
            if line.startswith('{"url"') and line.endswith("}")]
    good["mmc4"] = {d["url"].rsplit("/", 1)[-1] for d in docs}
    two = next(d for d in docs if len(d["image_info"]) >= 2)
    (root / "mmc4" / "images" / two["image_info"][1]["image_name"]).unlink()
    # A ShareGPT4V entry without an id.
    index = root / "sharegpt4v" / "sharegpt4v_instruct.json"
    entries = json.loads(index.read_text())
    good["sharegpt4v"] = {e["id"] for e in entries}
    entries.insert(3, {k: v for k, v in entries[0].items() if k != "id"})
    index.write_text(json.dumps(entries))
    # OpenVid: a truncated clip, and a row naming a clip that is not there.
    clips = root / "openvid" / "videos"
    good["openvid"] = {p.name for p in clips.glob("*.mp4")}
    cut = sorted(good["openvid"])[1]
    data = (clips / cut).read_bytes()
    (clips / cut).write_bytes(data[: len(data) // 2])
    good["openvid"].discard(cut)
    csv_path = root / "openvid" / "OpenVid-1M.csv"
    rows = csv_path.read_text().splitlines(keepends=True)
    last = rows[-1].split(",", 1)
    csv_path.write_text("".join(rows) + f"openvid_not_there.mp4,{last[1]}")
    # A truncated extra tar shard (its first three samples readable) and a truncated extra parquet shard.
    extra = root / "coyo" / "webdataset" / "00099.tar"
    image = coyo.column("jpg")[0].as_py()
    with tarfile.open(extra, "w") as tar:
        for key in EXTRA_TAR_KEYS:
            _tar_member(tar, f"{key}.jpg", image)
            _tar_member(tar, f"{key}.txt", f"a photo of sample {key}".encode())
    member = tarfile.open(extra).getmember(f"{EXTRA_TAR_KEYS[3]}.jpg")
    extra.write_bytes(extra.read_bytes()[: member.offset_data + len(image) // 2])
    good["coyo_wds"] |= set(EXTRA_TAR_KEYS[:3])
    broken = root / "coyo" / "parquet" / "part-00099.parquet"
    shutil.copyfile(root / "coyo" / "parquet" / "part-00000.parquet", broken)
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    assert manifest["formats"]["mmc4"]["records"] == 8
    return str(root), good, two["url"].rsplit("/", 1)[-1]


@pytest.fixture(scope="module")
def tower_export(tmp_path_factory) -> str:
    from orchestration.train.outputs import save_tower_export
    from vilau_model.config import get_tower_config
    from vilau_model.vision_tower import UnifiedVisionTower

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("faults_tower")
    save_tower_export(UnifiedVisionTower(get_tower_config("tiny")), str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults_outputs")


def _overrides(root: str, outputs: Path) -> list[str]:
    # Everything the jobs write stays under this test's folders (never the repository's outputs/).
    return [f"data.root={root}", f"output_dir={outputs}", f"cluster.storage_path={outputs / 'ray'}", SOURCES,
            "data.pack_window=16", "data.seq_len=1024"]


@pytest.fixture(scope="module")
def tokenized(ray_session, faulty_shards, tower_export, outputs):
    """jobs/tokenize_data.py on the faulty shards (the LM tokenizer is trained on them first)."""
    from orchestration.data.pipeline import data_stats

    spec = importlib.util.spec_from_file_location("tokenize_job", REPO / "jobs" / "tokenize_data.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    summary = outputs / "tokenize.json"
    cache = outputs / "tokenized"
    job.main([*_overrides(faulty_shards[0], outputs), f"data.cache_dir={cache}", "tracking.enabled=false",
              "--tower", tower_export, "--summary-json", str(summary)])
    return json.loads(summary.read_text()), data_stats("lm-cache"), cache


def test_every_read_is_once_per_epoch(ray_session, faulty_shards, outputs):
    """The weights above read every record once (so that 'once' below means once)."""
    from orchestration.data.pipeline import training_plan

    config = load_config(None, _overrides(faulty_shards[0], outputs))
    assert {u.source: u.repeat for u in training_plan(config, "lm").units} == dict.fromkeys(faulty_shards[1], 1.0)


def test_tokenization_job_skips_counts_and_records_every_fault(tokenized, faulty_shards):
    summary, stats, cache = tokenized
    _, good, damaged_doc = faulty_shards
    assert summary["skipped"] == EXPECTED
    assert stats["samples"] == {source: len(keys) for source, keys in good.items()}  # every good record, once
    assert "mmc4/" + damaged_doc not in str(stats["skipped_keys"].get("unreadable_shard"))
    # The two unreadable shards, named with how far they could be read, in the job's output folder.
    recorded = {Path(shard.split("#")[0]).name: readable for shard, readable in summary["unreadable_shards"]}
    assert recorded == {"00099.tar": 3, "part-00099.parquet": 0}
    assert len(list((cache / "unreadable_shards").glob("*.json"))) == 2
    assert (cache / "manifest.json").is_file()


@pytest.mark.e2e
def test_stage2_trains_exactly_the_good_records_and_counts_each_fault_once(
    tokenized, faulty_shards, tower_export, outputs, tmp_path
):
    """One worker, one row per step: the first epoch trains every good record's samples once (the
    damaged document too), counts each fault once; the run's folder records the unreadable shards."""
    from orchestration.data.lm_data import lm_samples_per_record
    from orchestration.launch import fit_lm

    summary, _, _ = tokenized
    root, good, damaged_doc = faulty_shards
    steps = summary["rows"] + 1  # epoch 0's rows, and one step into epoch 1 (which counts epoch 0's tail)
    config = load_config(None, [
        *_overrides(root, outputs), "tracking.enabled=false", "run_name=faults",
        "cluster.num_workers=1", f"lm_train.steps={steps}", "lm_train.batch_size_per_worker=1", "lm_train.grad_accum=1",
        f"lm_train.checkpoint_every={steps}", f"lm_train.log_every={steps}", "lm_train.generate_samples=0",
        "data.record_trained_keys=true",
    ])
    result = fit_lm(config, tower_export)
    assert result.steps_done == steps
    run_dir = Path(config.cluster.storage_path).resolve() / result.run_name
    trained = Counter()
    for path in run_dir.glob("trained_keys/rank*/step*.json"):
        batch = json.loads(path.read_text())
        if batch["epoch"] == 0:
            trained.update(batch["keys"])
    per_record = lm_samples_per_record(config)
    assert trained == Counter({f"{s}/{k}": per_record[s] for s, keys in good.items() for k in keys})
    assert f"mmc4/{damaged_doc}" in trained
    state = torch.load(Path(result.checkpoint_path) / "rank_0.pt", weights_only=False)["data"]
    assert state["skipped_by_epoch"][0] == EXPECTED
    assert {Path(json.loads(p.read_text())["shard"].split("#")[0]).name for p in (run_dir / "unreadable_shards").glob("*.json")} == {
        "00099.tar", "part-00099.parquet"}


def test_stage1_stream_counts_each_fault_once_across_a_restart(ray_session, faulty_shards, tmp_path):
    """Stage 1's path (decode to pixels, one row per record) through the training loop's BatchStream,
    stopped after a few batches and resumed from the saved state as a restarted worker is: every good
    COYO record trained once, the two unreadable shards counted once, the dropped placeholders marked
    done so that the resumed stream neither reads nor counts them again."""
    import copy

    from orchestration.data.pipeline import rank_dataset, torch_dtypes, training_plan, with_text_tokens
    from orchestration.data.stats import parse_skip_entry
    from orchestration.data.tower_data import tower_config
    from orchestration.train.batch_stream import BatchStream

    root, good, _ = faulty_shards
    config = load_config(None, [f"data.root={root}", f"output_dir={tmp_path}", "data.tower_sources={"
                                "coyo: {format: coyo_parquet, path: coyo/parquet, weight: 8}, "
                                "coyo_wds: {format: coyo_webdataset, path: coyo/webdataset, weight: 10}}",
                                # windows of two units, whose order (seed 2) ends the first one with a fault
                                "data.shuffle_window_shards=2", "data.shuffle_seed=2"])
    plan = training_plan(config, "tower")
    assert {u.source: u.repeat for u in plan.units} == {"coyo": 1.0, "coyo_wds": 1.0}
    trained: dict[int, Counter] = {}
    carried: dict[int, list[int]] = {}  # a row's part id -> the part ids its carried drops complete

    def host_batch(batch):
        for ids, entries in zip(batch["sample_ids"], batch["skipped"]):
            for pid in ids:
                carried[int(pid)] = [parse_skip_entry(e).done for e in entries]
        return with_text_tokens(tower_config(config), batch)

    def stream(state: dict | None):
        out = BatchStream(
            lambda epoch, position: rank_dataset(config, "tower", plan, epoch=epoch, rank=0, world=1, position=position,
                                                 fault_dir=str(tmp_path / "run")),
            0, 1, "tower", 1, torch_dtypes("tower"), torch.device("cpu"), sources=["coyo", "coyo_wds"],
            recorder=lambda epoch, keys: trained.setdefault(epoch, Counter()).update(keys),
            host_batch=host_batch)
        out.load_state_dict(state)
        return out

    # Stop right after a batch whose drops lie beyond the record it trained (a block's trailing drops
    # ride on its last row): only their marks in the position keep the resumed stream from counting them again.
    first = stream(None)

    def frontier() -> int:
        return first.state_dict()["position"]["frontier"]

    while not any(done > frontier() for done in carried.get(frontier(), ())):
        next(first)
        assert 1 not in trained, "no batch carried drops beyond its own record: the restart proves nothing"
    first.close()
    saved = copy.deepcopy(first.state_dict())  # what a checkpoint holds
    second = stream(saved)
    while 1 not in trained:
        next(second)
    second.close()
    assert trained[0] == Counter(f"{s}/{k}" for s in ("coyo", "coyo_wds") for k in good[s])
    assert second.state_dict()["skipped_by_epoch"][0] == {"unreadable_shard": 2}
    assert second.data_metrics()["rows_skipped/unreadable_shard"] >= 2
