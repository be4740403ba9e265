"""Transient S3 failures mid-read: a fault-injecting HTTP proxy on 127.0.0.1 in front of the S3 server
cuts a set number of object responses off half-way through their body (the connection closed after
half the bytes promised) and answers others with 503 SlowDown. Reading every format through it gives
exactly the rows of a clean read: nothing lost, nothing twice."""

from __future__ import annotations

import hashlib
import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from orchestration.config import load_config
from orchestration.data.lm_data import decoded_dataset

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    """Forwards to ``upstream``; every ``every``-th object GET is broken (cut mid-body first, then
    503 SlowDown) until ``cuts`` and ``slowdowns`` are used up."""

    def __init__(self, upstream: str, cuts: int, slowdowns: int, every: int = 3):
        self.upstream = urlsplit(upstream).netloc
        self.budget = {"cut": cuts, "slowdown": slowdowns}
        self.done = {"cut": 0, "slowdown": 0}
        self.every, self.gets, self.lock = every, 0, threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = proxy.upstream
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                upstream.close()
                fault = proxy.fault(self.command, response.status, len(data))
                if fault == "slowdown":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    self.wfile.write(SLOWDOWN)
                    return
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                promised = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", promised or "0")
                self.end_headers()
                if fault == "cut":  # half the promised bytes, then the connection drops
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fault(self, method: str, status: int, size: int) -> str | None:
        if method != "GET" or status not in (200, 206) or size < 256:  # object bodies, not listings
            return None
        with self.lock:
            self.gets += 1
            if self.gets % self.every:
                return None
            for kind in ("cut", "slowdown"):
                if self.done[kind] < self.budget[kind]:
                    self.done[kind] += 1
                    return kind
        return None

    def close(self) -> None:
        self.server.shutdown()


# Weights are shares of trained samples and a COYO pair gives two: these weights read every record once.
SOURCES = "{coyo: {format: coyo_parquet, path: coyo/parquet, weight: 2}, mmc4: {format: mmc4, path: mmc4}, share: {format: sharegpt4v, path: sharegpt4v}}"


def _rows(root: str, endpoint: str, s3, tmp_path) -> list[tuple]:
    config = load_config(None, [
        f"data.root={root}", f"output_dir={tmp_path}", f"data.lm_sources={SOURCES}",
        f"data.s3.endpoint_url={endpoint}", f"data.s3.access_key_id={s3.access_key_id}",
        f"data.s3.secret_access_key={s3.secret_access_key}", "data.s3.max_retries=4",
    ])
    rows = decoded_dataset(config, stats_group=None).take_all()
    return sorted((r["source"], r["key"], r["text"], hashlib.sha256(r["pixels"]).hexdigest()) for r in rows)


def test_reads_through_broken_responses_give_exactly_the_clean_rows(ray_session, s3_synthetic_data, s3_server, tmp_path):
    root, manifest = s3_synthetic_data
    clean = _rows(root, s3_server.endpoint_url, s3_server, tmp_path)
    assert len(clean) == 3 * manifest["samples"] and len(set(clean)) == len(clean)

    proxy = FaultProxy(s3_server.endpoint_url, cuts=6, slowdowns=4)
    try:
        faulty = _rows(root, proxy.url, s3_server, tmp_path)
    finally:
        proxy.close()
    assert proxy.done == {"cut": 6, "slowdown": 4}  # every planned fault happened
    assert faulty == clean


def test_a_read_failing_past_its_retries_is_read_again_where_it_stopped(s3_synthetic_data, s3_server, monkeypatch):
    """Throttled past its retries, a shard read is queued again and resumes: the same records, each
    once, and a ``retried`` note per re-read (not counted as bad data: it marks nothing done)."""
    from dataclasses import replace

    from orchestration.data import records
    from orchestration.data.records import ReadUnit, iter_records
    from orchestration.data.stats import RETRIED, parse_skip_entry

    root, manifest = s3_synthetic_data
    unit = ReadUnit("mmc4", "mmc4", f"{root}/{manifest['formats']['mmc4']['files'][0]}", f"{root}/mmc4/images")
    clean = [(r["key"], r["origin"]) for r in iter_records(unit, s3_server)]
    monkeypatch.setattr(records, "REQUEUE_DELAY_S", 0.01)
    proxy = FaultProxy(s3_server.endpoint_url, cuts=0, slowdowns=10, every=1)  # more than one open's retries
    try:
        got = list(iter_records(unit, replace(s3_server, endpoint_url=proxy.url, max_retries=0)))
    finally:
        proxy.close()
    assert proxy.done["slowdown"] == 10
    assert [(r["key"], r["origin"]) for r in got] == clean
    notes = [parse_skip_entry(n) for r in got for n in r["notes"]]
    assert notes and all(n.reason == RETRIED and n.done == -1 for n in notes), notes
