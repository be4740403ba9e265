"""Planning at real shard counts: the driver's time to plan stage 1 over 1k and over 10k parquet shards
on an S3 server (moto, on 127.0.0.1), the way a COYO crawl lies on S3.

Two layouts, each at 1k and 10k shards:

- **stats**: img2dataset's layout, every ``<shard>.parquet`` with its ``<shard>_stats.json`` (the plan
  counts from the stats files);
- **footers**: the shards alone (the plan reads every parquet footer).

The time is ``plan_tower_data(config)``: the source listing, the counting, the units and the epoch plan,
exactly what a job's driver runs. Ray is started before (planning parquet sources needs none now; the
code before this change read footers in Ray tasks), and one warm-up plan runs first. The sizes alternate
over ``--repeats`` rounds so that drift on a shared machine hits both alike; medians.

The shards are small (``--rows`` rows of tiny images): what planning reads of a shard is its listing
entry and its footer or stats file, whatever the shard's size. moto is one Python process on this
2-core machine: every request costs its CPU, where S3's requests run side by side.

    python benchmarks/bench_planning.py [--shards 1000] [--rows 16] [--repeats 3] [--layouts stats,footers]

RESULT lines: ``planning_ratio_10x`` (the footers layout: t(10k) / t(1k), goal <= 3),
``planning_ratio_10x_stats``, and ``planning_s_per_10k_shards`` / ``planning_s_per_10k_shards_stats``
(absolute seconds to plan 10k shards).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
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


def shard_bytes(rows: int) -> bytes:
    """One img2dataset-style parquet shard: key, jpg, caption (its bytes are the same for every shard)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"key": [f"{i:09d}" for i in range(rows)], "jpg": [b"\xff\xd8\xff\xe0tiny" for _ in range(rows)],
                      "caption": [f"a photo number {i}" for i in range(rows)]})
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


def stage(client, prefix: str, shards: int, rows: int, with_stats: bool) -> None:
    body = shard_bytes(rows)
    stats = json.dumps({"count": rows, "successes": rows, "failed_to_download": 0, "failed_to_resize": 0,
                        "duration": 10.0, "status_dict": {"success": rows}}).encode()

    def put(i: int) -> None:
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/coyo/{i:06d}.parquet", Body=body)
        if with_stats:
            client.put_object(Bucket=BUCKET, Key=f"{prefix}/coyo/{i:06d}_stats.json", Body=stats)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(shards)))


def plan_seconds(root: str, overrides: list[str], workdir: str) -> tuple[float, object]:
    from orchestration.config import load_config
    from orchestration.data.tower_data import plan_tower_data

    config = load_config(None, [f"data.root={root}", f"output_dir={workdir}", "data.synthetic.make_if_missing=false",
                                "data.tower_sources={coyo: {format: coyo_parquet, path: coyo}}", *overrides])
    start = time.perf_counter()
    plan = plan_tower_data(config)
    return time.perf_counter() - start, plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=1000, help="the small count (the big one is 10x)")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layouts", default="stats,footers")
    args = parser.parse_args()

    import boto3
    import ray
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request log
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=KEY,
                          aws_secret_access_key=SECRET)
    client.create_bucket(Bucket=BUCKET)
    overrides = [f"data.s3.endpoint_url={endpoint}", f"data.s3.access_key_id={KEY}", f"data.s3.secret_access_key={SECRET}"]
    workdir = tempfile.mkdtemp(prefix="bench-planning-")
    layouts = args.layouts.split(",")
    sizes = {"1x": args.shards, "10x": 10 * args.shards}
    for layout in layouts:
        for name, shards in sizes.items():
            start = time.perf_counter()
            stage(client, f"{layout}-{name}", shards, args.rows, with_stats=layout == "stats")
            print(f"staged {shards} shards ({layout}) in {time.perf_counter() - start:.1f} s", flush=True)

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    plan_seconds(f"s3://{BUCKET}/{layouts[0]}-1x", overrides, workdir)  # warm-up: imports, clients, Ray workers
    times: dict[tuple[str, str], list[float]] = {(layout, name): [] for layout in layouts for name in sizes}
    counted_by: dict[str, str] = {}
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for layout in layouts:
            for name, shards in sizes.items():
                seconds, plan = plan_seconds(f"s3://{BUCKET}/{layout}-{name}", overrides, workdir)
                assert sum(u.size for u in plan.units) == shards * args.rows, "the plan must count every record"
                counted_by[layout] = getattr(plan, "counted_by", {}).get("coyo", "(not said: code before the change)")
                times[(layout, name)].append(seconds)
        load.append(os.getloadavg()[0])
    ray.shutdown()
    server.stop()

    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nplanning stage 1 over N={args.shards} and 10N={10 * args.shards} parquet shards of {args.rows} rows on moto S3; "
          f"medians of {args.repeats} alternating rounds; load average {min(load):.1f}-{max(load):.1f}\n")
    print(f"| layout | counted by | {sizes['1x']} shards (s) | {sizes['10x']} shards (s) | ratio |")
    print("| --- | --- | --- | --- | --- |")
    results = {}
    for layout in layouts:
        small, big = median[(layout, "1x")], median[(layout, "10x")]
        results[layout] = (big / small, big * 10_000 / sizes["10x"])
        print(f"| {layout} | {counted_by[layout]} | {small:.2f} | {big:.2f} | {big / small:.2f} |")
    print()
    for layout, (ratio, per_10k) in results.items():
        suffix = "" if layout == "footers" else f"_{layout}"
        print(f"RESULT planning_ratio_10x{suffix}={ratio:.3f}")
        print(f"RESULT planning_s_per_10k_shards{suffix}={per_10k:.2f}")


if __name__ == "__main__":
    main()
