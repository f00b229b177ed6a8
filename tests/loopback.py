"""A base for fake JSON API servers on loopback (tests/kfp_fake.py, tests/k8s_fake.py).

A subclass implements `respond(request) -> (status, payload[, headers])`; the base runs a threaded HTTP
server on 127.0.0.1:<free port>, parses each request into a `Request`, records it, calls `respond`
under one lock (so subclasses keep plain dicts as state) and answers JSON.

    class Fake(LoopbackAPI):
        def respond(self, r):
            return 200, {"ok": True}

    with Fake() as api:
        requests.get(f"{api.url}/x")
        assert api.calls() == [("GET", "/x")]
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit


@dataclass
class Request:
    """One request as the server saw it. Header names are lower-case."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any = None
    fields: dict[str, str] = field(default_factory=dict)  # multipart text fields
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # multipart name -> (filename, content)


class LoopbackAPI:
    """Start with `start()` or `with`; `url` is http://127.0.0.1:<free port>."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def respond(self, r: Request) -> tuple:
        """(status, JSON payload) or (status, payload, extra headers); called with `self.lock` held."""
        raise NotImplementedError

    # --- lifecycle

    def start(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as urllib3 expects
            disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms delayed-ACK stall

            def do_GET(self) -> None:
                fake._handle(self)

            do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

            def log_message(self, format: str, *args: Any) -> None:  # no access log on stderr
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                         daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # --- assertion helpers

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.requests]

    def find(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path == path]

    # --- request handling

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        req = Request(h.command, parts.path, dict(parse_qsl(parts.query, keep_blank_values=True)),
                      {k.lower(): v for k, v in h.headers.items()})
        ctype = h.headers.get("Content-Type") or ""
        if ctype.startswith("multipart/form-data"):
            req.fields, req.files = multipart(ctype, body)
        elif body:
            req.json = json.loads(body)
        with self.lock:
            self.requests.append(req)
            status, payload, *extra = self.respond(req)
        headers = {"Content-Type": "application/json", **(extra[0] if extra else {})}
        data = json.dumps(payload).encode()
        h.send_response(status)
        for name, value in headers.items():
            h.send_header(name, value)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


def multipart(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    fields, files = {}, {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        content = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            files[name] = (part.get_filename(), content)
        else:
            fields[name] = content.decode()
    return fields, files
