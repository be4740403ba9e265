"""Planning cost vs the size of the media tree: driver time from start to the first batch of stage-2
decoded records, with N and with 10N media objects behind the same MMC4 index shards on an S3 server
(moto, on 127.0.0.1).

Planning lists only the index shards' directory (never images/) and reads no shard on the driver, so
the time should not grow with the media count (what little it does here is moto's: it answers a
delimited listing by scanning every key under the prefix; S3 does not). For reference, the run also times what the old
planning did first: a recursive listing (`find`) of the source, which does grow with it.

Run:  python benchmarks/bench_planning.py [--media 500] [--repeats 3] [--results benchmarks/RESULTS.md]
Last line: RESULT planning_ratio_10x=<t10N/tN>  (goal <= 1.3)
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BUCKET = "bench-planning"
KEY, SECRET = "bench-key", "bench-secret"  # moto accepts any; fake on purpose


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stage(client, local_mmc4: str, prefix: str, media: int) -> None:
    """The MMC4 index and its images under s3://BUCKET/prefix/mmc4, plus filler images up to ``media``."""
    files = []
    for root, _, names in os.walk(local_mmc4):
        for name in names:
            path = os.path.join(root, name)
            files.append((path, f"{prefix}/mmc4/{os.path.relpath(path, local_mmc4)}"))
    with open(next(p for p, k in files if k.endswith(".jpg")), "rb") as f:
        filler = f.read()
    existing = sum(1 for _, k in files if "/images/" in k)

    def put(item):
        path, key = item
        if path is None:
            client.put_object(Bucket=BUCKET, Key=key, Body=filler)
        else:
            client.upload_file(path, BUCKET, key)

    items = files + [(None, f"{prefix}/mmc4/images/filler_{i:07d}.jpg") for i in range(max(media - existing, 0))]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, items))


def time_to_first_batch(root: str, overrides: list[str], workdir: str) -> float:
    from orchestration.config import load_config
    from orchestration.data.lm_data import decoded_dataset
    from orchestration.data.pipeline import training_plan

    start = time.perf_counter()
    config = load_config(None, [f"data.root={root}", f"output_dir={workdir}", "data.lm_sources={mmc4: {format: mmc4, path: mmc4}}", *overrides])
    plan = training_plan(config, "lm")
    ds = decoded_dataset(config, None, plan=plan, epoch=0, rank=0, world=2)
    next(iter(ds.iter_batches(batch_size=4, batch_format="pyarrow")))
    return time.perf_counter() - start


def time_find(root: str, settings) -> float:
    from orchestration.storage import filesystem

    start = time.perf_counter()
    fs, path = filesystem(f"{root}/mmc4", settings)
    found = fs.find(path)
    assert found
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--media", type=int, default=500, help="N: media objects of the small tree")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", help="append a dated markdown section to this file")
    args = parser.parse_args()

    import boto3
    import ray
    from moto.server import ThreadedMotoServer

    from orchestration.data.synthetic import make_synthetic_dataset
    from orchestration.storage import S3Settings

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request log
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=KEY, aws_secret_access_key=SECRET)
    client.create_bucket(Bucket=BUCKET)
    settings = S3Settings(endpoint_url=endpoint, access_key_id=KEY, secret_access_key=SECRET)
    overrides = [f"data.s3.endpoint_url={endpoint}", f"data.s3.access_key_id={KEY}", f"data.s3.secret_access_key={SECRET}"]
    workdir = tempfile.mkdtemp(prefix="bench-planning-")
    local = os.path.join(workdir, "data")
    make_synthetic_dataset(local, samples=64, seed=0, eval_samples=4, video_samples=1)
    sizes = {"N": args.media, "10N": 10 * args.media}
    for name, media in sizes.items():
        start = time.perf_counter()
        stage(client, os.path.join(local, "mmc4"), name, media)
        print(f"staged {media} media objects under s3://{BUCKET}/{name} in {time.perf_counter() - start:.1f}s", flush=True)

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    times: dict[str, list[float]] = {n: [] for n in sizes}
    finds: dict[str, list[float]] = {n: [] for n in sizes}
    time_to_first_batch(f"s3://{BUCKET}/N", overrides, workdir)  # warm-up: workers, imports
    for _ in range(args.repeats):  # alternate, so that drift hits both alike
        for name in sizes:
            times[name].append(time_to_first_batch(f"s3://{BUCKET}/{name}", overrides, workdir))
            finds[name].append(time_find(f"s3://{BUCKET}/{name}", settings))
    ray.shutdown()
    server.stop()

    median = {n: statistics.median(v) for n, v in times.items()}
    find = {n: statistics.median(v) for n, v in finds.items()}
    ratio = median["10N"] / median["N"]
    lines = [
        f"MMC4 index (64 documents, 2 jsonl shards) with N={args.media} and 10N={10 * args.media} objects under "
        f"images/, on moto S3; medians of {args.repeats} alternating runs",
        "",
        "| media objects | driver: start -> first batch (s) | reference: recursive listing of the source (s) |",
        "| --- | --- | --- |",
    ]
    for name, media in sizes.items():
        lines.append(f"| {media} | {median[name]:.2f} | {find[name]:.2f} |")
    lines.append(f"\nplanning_ratio_10x = {ratio:.3f} (the listing the old planning did: {find['10N'] / find['N']:.1f}x)")
    report = "\n".join(lines)
    print(report)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n## bench_planning (2026-11-27, 2-core x86_64 CPU, shared with other sessions' work)\n\n")
            f.write("`python benchmarks/bench_planning.py` (goal: planning_ratio_10x <= 1.3)\n\n" + report + "\n")
    print(f"RESULT planning_ratio_10x={ratio:.3f}")


if __name__ == "__main__":
    main()
