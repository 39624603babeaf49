"""A static COG server for tests: one directory over HTTP/1.1 on 127.0.0.1, with HEAD
and single byte ranges (what GDAL's /vsicurl/ asks of S3 or a blob store), injected
error statuses per request, headers it insists on (403 without them, as S3 answers an
unsigned request to a requester-pays bucket), and a JSON-lines log of every request.

``python -m tests.pipelines.cog_server DIR PREFIX FAULTS_JSON LOG [REQUIRED_JSON]``;
prints its URL.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def serve(
    directory: Path,
    prefix: str,
    faults: dict[str, dict[str, int]],
    log: Path,
    required: list[str] | None = None,
) -> None:
    counts: dict[str, int] = {}
    lock = threading.Lock()
    out = log.open("a", buffering=1)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_a: Any) -> None:
            pass

        def _reply(self, status: int, body: bytes, headers: dict[str, str], rng: str, name: str) -> None:  # fmt: skip
            with lock:
                out.write(json.dumps([name, rng, status, 0 if self.command == "HEAD" else len(body)]) + "\n")  # fmt: skip
            self.send_response(status)
            for k, v in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            name = path.removeprefix(prefix)
            rng = self.headers.get("Range", "")
            with lock:
                counts[name] = n = counts.get(name, 0) + 1
            status = faults.get(name, {}).get(str(n))
            if status is None and any(not self.headers.get(h) for h in required or ()):
                status = 403
            f = directory / name
            if status is None and (not path.startswith(prefix) or "/" in name or not f.is_file()):  # fmt: skip
                status = 404
            if status is not None:
                self._reply(status, b"<Error>injected</Error>", {"Content-Type": "application/xml"}, rng, name)  # fmt: skip
                return
            data = f.read_bytes()
            size = len(data)
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
            headers = {"Accept-Ranges": "bytes", "Content-Type": "image/tiff"}
            if m:
                a, b = int(m[1]), min(int(m[2] or size - 1), size - 1)
                self._reply(206, data[a : b + 1], {**headers, "Content-Range": f"bytes {a}-{b}/{size}"}, rng, name)  # fmt: skip
            else:
                self._reply(200, data, headers, rng, name)

        do_HEAD = do_GET

    # A parent that ignores or blocks SIGTERM passes that on to this process: restore
    # the default, so the test's terminate() always ends it.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    required = json.loads(sys.argv[5]) if len(sys.argv) > 5 else None
    serve(Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4]), required)
