"""A flaky store on loopback, for the retried-read tests and the fault matrix: a static HTTP server
that honours Range requests (``serve_folder``), a local S3 server (``moto_s3``: moto's, in this
process) and, in front of either, ``FlakyProxy``: a TCP proxy on 127.0.0.1 that reads each HTTP
request, forwards it, and by a fixed schedule cuts the response's body after some bytes (half the
time with a reset, half with a plain close) or answers 500/503 itself. Everything it did is in
``proxy.log`` (one ``Request`` per request, with the fault injected, if any).

Only 127.0.0.1 is ever contacted. Each connection carries one request (responses go out with
``Connection: close``), which keeps the proxy a few dozen lines and changes nothing for the clients
(urllib, aiohttp) beyond a connection per request.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import socketserver
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Optional

from pretrain.distributed import free_port

# dummy credentials for moto: nothing read from this machine's AWS files, no metadata lookup, no proxy
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
    "NO_PROXY": "127.0.0.1",
    "no_proxy": "127.0.0.1",
}


# ------------------------------------------------------------------------- a static HTTP server


class RangeHandler(BaseHTTPRequestHandler):
    """GET/HEAD of the files in ``directory`` (no listing, no subfolders above it), with single
    ``Range: bytes=a-[b]`` requests answered 206 (or 416 past the end)."""

    protocol_version = "HTTP/1.1"
    directory = "."

    def log_message(self, *args) -> None:  # quiet
        pass

    def _file(self) -> Optional[Path]:
        root = Path(self.directory).resolve()
        path = (root / self.path.split("?", 1)[0].lstrip("/")).resolve()
        return path if path.is_file() and root in path.parents else None

    def _send(self, body: bool) -> None:
        path = self._file()
        if path is None:
            self.send_error(404)
            return
        data = path.read_bytes()
        start, end, status = 0, len(data), 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "").strip())
        if m:
            start = int(m.group(1))
            end = min(len(data), int(m.group(2)) + 1) if m.group(2) else len(data)
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if body:
            self.wfile.write(data[start:end])

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._send(True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._send(False)


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` serving ``folder`` (Range requests honoured) from a thread."""
    handler = type("Handler", (RangeHandler,), {"directory": str(folder)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def moto_s3(bucket: str, folders: dict[str, Path]) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with ``bucket`` holding each folder under its prefix; yields
    its endpoint URL."""
    from moto.server import ThreadedMotoServer
    import s3fs

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        fs = s3fs.S3FileSystem(endpoint_url=url, key="testing", secret="testing", skip_instance_cache=True)
        fs.mkdir(bucket)
        for prefix, folder in folders.items():
            fs.put(str(folder), f"{bucket}/{prefix}", recursive=True)
        yield url
    finally:
        server.stop()


# ------------------------------------------------------------------------------ the flaky proxy


@dataclass
class Request:
    number: int  # 1, 2, ... in arrival order
    method: str
    path: str
    range: Optional[str]  # the Range header sent, if any
    fault: Optional[str] = None  # "cut" (body cut after cut_after bytes), "500", "503"; None: forwarded whole
    sent: int = 0  # body bytes passed to the client


@dataclass
class FlakyProxy:
    """Forwards HTTP requests on 127.0.0.1 to ``upstream`` (``http://127.0.0.1:PORT``), injecting
    faults by request number n (1, 2, ...): ``error_every`` k: requests n % k == 0 are answered with
    503 and 500 in turn, without reaching the upstream; ``cut_every`` k: a response to request
    n % k == 0 whose body is longer than ``cut_after`` bytes is cut after that many (the connection
    reset or closed, in turn); ``always``: every request is answered with that status. A request
    due for a cut whose body is too short goes through whole (and counts as no fault)."""

    upstream: str
    cut_every: int = 0
    cut_after: int = 7000
    error_every: int = 0
    always: Optional[int] = None
    log: list[Request] = field(default_factory=list)

    def __post_init__(self):
        m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)", self.upstream)
        if not m:
            raise ValueError(f"upstream must be http://127.0.0.1:PORT, got {self.upstream}")
        self._port = int(m.group(1))
        self._lock = threading.Lock()
        self._errors = 0
        self._cuts = 0
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._handle(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler, bind_and_activate=True)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def faults(self, kind: Optional[str] = None) -> list[Request]:
        with self._lock:
            return [r for r in self.log if r.fault is not None and (kind is None or r.fault == kind)]

    # -- one connection, one request
    def _handle(self, client: socket.socket) -> None:
        head, rest = _read_head(client)
        if head is None:
            return
        lines = head.decode("latin-1").split("\r\n")
        method, path = lines[0].split(" ")[:2]
        headers = _headers(lines[1:])
        with self._lock:
            req = Request(len(self.log) + 1, method, path, headers.get("range"))
            self.log.append(req)
            error = self.always
            if error is None and self.error_every and req.number % self.error_every == 0:
                error = 503 if self._errors % 2 == 0 else 500
                self._errors += 1
            cut = error is None and self.cut_every and req.number % self.cut_every == 0
        body = rest + _read_exact(client, int(headers.get("content-length", 0)) - len(rest))
        if error is not None:
            req.fault = str(error)
            text = b"<Error><Code>ServiceUnavailable</Code><Message>flaky proxy</Message></Error>"
            client.sendall(f"HTTP/1.1 {error} Flaky\r\nContent-Type: application/xml\r\nContent-Length: {len(text)}\r\n"
                           f"Connection: close\r\n\r\n".encode() + (text if method != "HEAD" else b""))
            client.close()
            return
        up = socket.create_connection(("127.0.0.1", self._port))
        try:
            up.sendall(_close_header(lines).encode("latin-1") + body)
            rhead, rrest = _read_head(up)
            if rhead is None:
                client.close()
                return
            rlines = rhead.decode("latin-1").split("\r\n")
            length = _headers(rlines[1:]).get("content-length")
            client.sendall(_close_header(rlines).encode("latin-1"))
            total = int(length) if length is not None else None
            limit = self.cut_after if cut and method != "HEAD" and total is not None and total > self.cut_after else None
            sent, chunk = 0, rrest
            while True:
                if total is not None:
                    chunk = chunk[:total - sent]
                if limit is not None and sent + len(chunk) >= limit:
                    client.sendall(chunk[:limit - sent])
                    req.sent, req.fault = limit, "cut"
                    with self._lock:
                        reset = self._cuts % 2 == 0
                        self._cuts += 1
                    if reset:  # an RST: the client sees a reset connection
                        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    client.close()
                    return
                client.sendall(chunk)
                sent += len(chunk)
                if (total is not None and sent >= total) or method == "HEAD":
                    break
                chunk = up.recv(65536)
                if not chunk:
                    break
            req.sent = sent
            client.close()
        finally:
            up.close()


def _read_head(sock: socket.socket) -> tuple[Optional[bytes], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            return None, b""
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            break
        data += more
    return data


def _headers(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        k, sep, v = line.partition(":")
        if sep:
            out[k.strip().lower()] = v.strip()
    return out


def _close_header(lines: list[str]) -> str:
    """The head with ``Connection: close`` in place of any Connection/Keep-Alive header."""
    kept = [line for line in lines if line.partition(":")[0].strip().lower() not in ("connection", "keep-alive")]
    return "\r\n".join(kept[:1] + ["Connection: close"] + kept[1:]) + "\r\n\r\n"
