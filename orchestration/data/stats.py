"""Counts that leave the Ray Data workers: records skipped by reason, samples and tokens per source.

Decode and tokenization UDFs run in many processes; they count into a local `Tally` per batch and
send it, once per batch, to one named actor (`DataStats`) that the training loop (any rank, or the
driver) reads with `skip_counts()` / `data_stats()` for MLflow. Counts are kept per *group*
("tower", "lm", or a name a test picks) and grow with every pass over the data: a second epoch
counts its skipped rows again.

The actor is named in the job's namespace, so the driver, Ray Data workers and Ray Train workers of
one job all reach the same one. The builders create it from the driver (so it lives as long as the
driver); a UDF that runs without it creates it itself.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import ray

ACTOR_NAME = "vilau-data-stats"
MAX_KEYS_PER_REASON = 10_000  # skipped record keys kept for inspection (counts are never capped)


# Restartable: if the node it runs on is lost, the counts start again rather than every later
# call failing (the driver pins it to its own node, which a cluster never loses mid-job).
@ray.remote(num_cpus=0, max_restarts=-1)
class DataStats:
    def __init__(self) -> None:
        self._groups: dict[str, dict] = {}

    def _group(self, group: str) -> dict:
        if group not in self._groups:
            self._groups[group] = {
                "skipped": Counter(),
                "skipped_keys": defaultdict(list),
                "samples": Counter(),
                "tokens": Counter(),
            }
        return self._groups[group]

    def add(self, group: str, skipped: dict[str, list[str]], samples: dict[str, int], tokens: dict[str, int]) -> None:
        g = self._group(group)
        for reason, keys in skipped.items():
            g["skipped"][reason] += len(keys)
            room = MAX_KEYS_PER_REASON - len(g["skipped_keys"][reason])
            g["skipped_keys"][reason].extend(keys[: max(room, 0)])
        g["samples"].update(samples)
        g["tokens"].update(tokens)

    def get(self, group: str | None = None) -> dict:
        """{"skipped": {reason: n}, "skipped_keys": {reason: [key]}, "samples": {source: n}, "tokens": {source: n}}."""
        groups = [self._groups[group]] if group is not None and group in self._groups else (
            [] if group is not None else list(self._groups.values())
        )
        out = {"skipped": Counter(), "skipped_keys": defaultdict(list), "samples": Counter(), "tokens": Counter()}
        for g in groups:
            for name in ("skipped", "samples", "tokens"):
                out[name].update(g[name])
            for reason, keys in g["skipped_keys"].items():
                out["skipped_keys"][reason].extend(keys)
        return {name: dict(value) for name, value in out.items()}

    def reset(self, group: str | None = None) -> None:
        if group is None:
            self._groups.clear()
        else:
            self._groups.pop(group, None)


_handles: dict[str, object] = {}  # job id -> handle; holding it keeps the actor alive (named actors
# are still reference counted), so the process that creates it (the driver) keeps it.


def stats_actor():
    """The job's DataStats actor, created on first use."""
    job = ray.get_runtime_context().get_job_id()
    if job not in _handles:
        try:
            _handles[job] = ray.get_actor(ACTOR_NAME)
        except ValueError:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # On the creator's node (the driver's: the head on a cluster), not on a worker node that
            # a spot reclaim may take away. Soft: a UDF creating it runs wherever it can.
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
            _handles[job] = DataStats.options(name=ACTOR_NAME, get_if_exists=True, scheduling_strategy=here).remote()
    return _handles[job]


def data_stats(group: str | None = None) -> dict:
    """Everything counted for ``group`` (None: all groups summed)."""
    return ray.get(stats_actor().get.remote(group))


def skip_counts(group: str | None = None) -> dict[str, int]:
    """Records dropped so far, by reason, e.g. {"truncated_image": 3, "missing_file": 1}."""
    return data_stats(group)["skipped"]


def reset_stats(group: str | None = None) -> None:
    ray.get(stats_actor().reset.remote(group))


class Tally:
    """Counts of one batch, sent to the DataStats actor in one call by `flush`."""

    def __init__(self, group: str):
        self.group = group
        self.skipped: dict[str, list[str]] = defaultdict(list)
        self.samples: Counter = Counter()
        self.tokens: Counter = Counter()

    def skip(self, reason: str, key: str) -> None:
        self.skipped[reason].append(key)

    def flush(self) -> None:
        if not (self.skipped or self.samples or self.tokens):
            return
        # Waited on, so that counts are in when the consumer has seen the batch's rows.
        ray.get(stats_actor().add.remote(self.group, dict(self.skipped), dict(self.samples), dict(self.tokens)))
        self.skipped, self.samples, self.tokens = defaultdict(list), Counter(), Counter()


def in_chunks(table, rows: int, decode_chunk, group: str):
    """Run ``decode_chunk(table_slice, tally)`` over a block in slices of ``rows`` records and yield
    its non-empty outputs. Counts are sent once per block, before the block's last output, so that
    when a consumer has seen every row, every count is in."""
    tally = Tally(group)
    pending = None
    for start in range(0, table.num_rows, rows):
        out = decode_chunk(table.slice(start, rows), tally)
        if out is None:
            continue
        if pending is not None:
            yield pending
        pending = out
    tally.flush()
    if pending is not None:
        yield pending
