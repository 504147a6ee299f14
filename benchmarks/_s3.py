"""A real S3-protocol server for tests and benchmarks (moto's standalone server, a separate
process on 127.0.0.1), and a fault proxy to put in front of it: HTTP-level 503 SlowDown replies,
connection resets and delays on a fixed schedule of request numbers, so a run is repeatable."""

from __future__ import annotations

import http.client
import http.server
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Credentials moto accepts (it checks none); the region its buckets live in.
KEY, SECRET, REGION = "testing", "testing", "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    """``python -m moto.server`` on a free port; ``stop()`` ends it."""

    def __init__(self, timeout: float = 60.0, authenticate: bool = False) -> None:
        """``authenticate``: check every request's credentials against moto's IAM (which holds no
        user), so that any key is refused as a real store refuses a wrong one."""
        self.port = free_port()
        env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if authenticate else {})}
        # Its log (a line per request) goes to a file: a pipe nobody reads fills up and blocks it.
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=self.log, env=env)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    break
            except OSError:
                if self.proc.poll() is not None:
                    self.log.seek(0)
                    raise RuntimeError(f"moto server exited: {self.log.read().decode()[-2000:]}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError("moto server did not answer within the deadline") from None
                time.sleep(0.1)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def storage_options(endpoint: str) -> dict[str, Any]:
    """What a source's ``storage_options`` (and s3fs) need to reach ``endpoint``."""
    return {"endpoint_url": endpoint, "key": KEY, "secret": SECRET, "client_kwargs": {"region_name": REGION}}


def client(endpoint: str) -> Any:
    """A boto3 S3 client of ``endpoint`` (synchronous: the test process runs no fsspec event loop)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                        region_name=REGION)


def split(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key


def upload(endpoint: str, local: Path, url: str) -> list[str]:
    """Copy the files under ``local`` to ``url`` (``s3://bucket/prefix``), creating the bucket."""
    s3 = client(endpoint)
    bucket, prefix = split(url)
    if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket=bucket)
    out = []
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        key = f"{prefix.rstrip('/')}/{path.relative_to(local).as_posix()}".lstrip("/")
        s3.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        out.append(f"s3://{bucket}/{key}")
    return out


def objects(endpoint: str, url: str) -> list[str]:
    """URLs of the objects under ``url`` (a prefix)."""
    bucket, prefix = split(url)
    pages = client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [f"s3://{bucket}/{o['Key']}" for page in pages for o in page.get("Contents", [])]


# ---- faults ---------------------------------------------------------------------------------------
@dataclass
class Schedule:
    """Which request numbers (1, 2, ...) get which fault: every ``slow_down``-th a 503 SlowDown,
    every ``reset``-th a reset connection, every ``delay``-th ``delay_s`` of latency first. The
    first ``clean`` requests pass untouched (start-up listing), 0 turns a fault off."""

    slow_down: int = 0
    reset: int = 0
    delay: int = 0
    delay_s: float = 0.05
    clean: int = 0

    def fault(self, n: int) -> str | None:
        if n <= self.clean:
            return None
        for name, every in (("slow_down", self.slow_down), ("reset", self.reset)):
            if every and n % every == 0:
                return name
        return "delay" if self.delay and n % self.delay == 0 else None


@dataclass
class FaultProxy:
    """An HTTP proxy on 127.0.0.1 that forwards to ``upstream`` and injects ``schedule``'s faults.
    ``counts`` tells how many of each were injected."""

    upstream: str
    schedule: Schedule
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._n = 0
        proxy = self
        host, port = self.upstream.removeprefix("http://").split(":")

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy._next_fault()
                if fault == "reset":  # RST, not FIN: the client sees "connection reset by peer"
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                if fault == "slow_down":
                    reply = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                             b"<Message>Please reduce your request rate.</Message></Error>")
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                    return
                if fault == "delay":
                    time.sleep(proxy.schedule.delay_s)
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(key, value)
                # (a HEAD reply has no body but the object's length)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True, name="s3-fault-proxy").start()

    def _next_fault(self) -> str | None:
        with self._lock:
            self._n += 1
            fault = self.schedule.fault(self._n)
            if fault is not None:
                self.counts[fault] = self.counts.get(fault, 0) + 1
            return fault

    @property
    def requests(self) -> int:
        return self._n

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
