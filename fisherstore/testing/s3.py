"""A real S3-compatible server on loopback for tests and benchmarks: moto in server mode behind a counting proxy.

:class:`S3Server` starts ``python -m moto.server`` as a child process on a
free 127.0.0.1 port, with authentication enforced (an IAM user that may do
anything in S3, and one that may do nothing, are made first), and puts a
small HTTP proxy in front of it that forwards every request and records it
on the server side of the wire: method, object path, ``Range`` header and the
bytes of the request and response bodies (:class:`Request`).  Clients talk to
:attr:`S3Server.endpoint` with s3fs like to any S3 endpoint; nothing is
mocked in the client.

Needs ``moto[server]`` (the ``dev`` extra); nothing here is imported by
fisherstore itself.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["Request", "S3Server"]

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


@dataclass(frozen=True)
class Request:
    """One request as the server saw it."""

    method: str
    path: str  # /bucket/key, unquoted, without the query
    query: str
    range: str | None
    sent: int  # request body bytes (uploads)
    received: int  # response body bytes (downloads)
    status: int
    body: bytes = b""  # the request body of a PUT of a small JSON object (manifests), else empty


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Proxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.target = target
        self.log: list[Request] = []
        self.lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client killed mid-request (the kill trials do that) is expected; report anything else."""
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue answered for large uploads
    server: _Proxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP and k.lower() != "expect"}
        conn = http.client.HTTPConnection(*self.server.target, timeout=120)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        parts = urlsplit(self.path)
        with self.server.lock:  # logged before the client has its answer, so the log is complete when it does
            self.server.log.append(
                Request(
                    self.command,
                    unquote(parts.path),
                    parts.query,
                    self.headers.get("Range"),
                    len(body),
                    len(data) if self.command != "HEAD" else 0,
                    resp.status,
                    body if self.command == "PUT" and parts.path.endswith(".json") and len(body) < 1 << 20 else b"",
                )
            )
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP and k.lower() != "content-length":
                self.send_header(k, v)
        # a HEAD answer's Content-Length is the object's size, not its (empty) body's
        self.send_header(
            "Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
        )
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


class S3Server:
    """moto's S3 server as a child process on loopback, behind a counting proxy (see the module docstring).

    Use as a context manager; :attr:`options` are the s3fs ``storage_options``
    of the user allowed everything, :meth:`options_of` those of another key
    pair, :attr:`requests` what the server received.
    """

    def __init__(self) -> None:
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.proxy: _Proxy | None = None
        self.key = self.secret = self.denied_key = self.denied_secret = ""

    @property
    def endpoint(self) -> str:
        """The URL clients use (the proxy)."""
        assert self.proxy is not None
        return f"http://127.0.0.1:{self.proxy.server_address[1]}"

    @property
    def direct_endpoint(self) -> str:
        """moto itself, bypassing the proxy (setup and corruption of objects in tests)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def options(self) -> dict[str, Any]:
        """s3fs storage options of the user allowed everything in S3."""
        return self.options_of(self.key, self.secret)

    def options_of(self, key: str, secret: str) -> dict[str, Any]:
        """s3fs storage options for a key pair, against :attr:`endpoint`."""
        return {
            "endpoint_url": self.endpoint,
            "key": key,
            "secret": secret,
            "client_kwargs": {"region_name": "us-east-1"},
        }

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point s3fs at this server with the allowed user (the "usual way")."""
        return {
            "FSSPEC_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    @property
    def requests(self) -> list[Request]:
        """Every request received so far, oldest first."""
        assert self.proxy is not None
        with self.proxy.lock:
            return list(self.proxy.log)

    def clear(self) -> None:
        """Forget the requests received so far."""
        assert self.proxy is not None
        with self.proxy.lock:
            self.proxy.log.clear()

    def start(self) -> S3Server:
        """Start moto, make the two IAM users, start the proxy."""
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "5", "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 180  # moto's imports take a while on a loaded machine
        while True:  # a TCP connect, not a request: the first 5 requests are the unauthenticated ones
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.process.kill()
                    self.process.wait()
                    raise RuntimeError("moto server did not start (is moto[server] installed?)") from None
                time.sleep(0.1)
        import boto3

        iam = boto3.client(
            "iam",
            endpoint_url=self.direct_endpoint,
            region_name="us-east-1",
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName="writer")  # 1
        iam.put_user_policy(  # 2
            UserName="writer",
            PolicyName="s3-all",
            PolicyDocument='{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", '
            '"Resource": "*"}]}',
        )
        key = iam.create_access_key(UserName="writer")["AccessKey"]  # 3
        self.key, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        iam.create_user(UserName="nobody")  # 4: no policy, so every S3 request is denied
        key = iam.create_access_key(UserName="nobody")["AccessKey"]  # 5
        self.denied_key, self.denied_secret = key["AccessKeyId"], key["SecretAccessKey"]
        self.proxy = _Proxy(("127.0.0.1", self.port))
        threading.Thread(target=self.proxy.serve_forever, daemon=True, name="s3-proxy").start()
        return self

    def make_bucket(self, name: str) -> None:
        """Create a bucket (as the allowed user)."""
        self.client().create_bucket(Bucket=name)

    def client(self) -> Any:
        """A boto3 S3 client of the allowed user, straight to moto (test setup, corrupting objects)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.direct_endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
        )

    def stop(self) -> None:
        """Stop the proxy and the server."""
        if self.proxy is not None:
            self.proxy.shutdown()
            self.proxy.server_close()
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
