"""A loopback http server of a directory for checkpoint-reading tests and benchmarks: threaded,
honours ``Range: bytes=a-b`` (python's SimpleHTTPRequestHandler does not), and counts the body
bytes it serves, per first path component (``/<client>/...``) when ``prefixed``, so that each
of several readers can be given its own URL and counted apart."""

from __future__ import annotations

import collections
import http.server
import re
import threading
from pathlib import Path


class RangeServer:
    """Serves ``root`` at ``self.url``; ``take()`` returns the bytes served since its last call
    (by client prefix when ``prefixed``: ``/<client>/<path under root>``)."""

    def __init__(self, root: Path, *, prefixed: bool = False):
        self.root, self.prefixed = Path(root), prefixed
        self.served: collections.Counter = collections.Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                client, path = "", self.path.lstrip("/")
                if server.prefixed:
                    client, _, path = path.partition("/")
                file = server.root / path
                if not file.is_file():
                    self.send_error(404)
                    return
                size = file.stat().st_size
                wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                begin, end, status = 0, size, 200
                if wanted is not None:
                    begin, status = int(wanted[1]), 206
                    end = min(int(wanted[2]) + 1 if wanted[2] else size, size)
                    if begin >= size:
                        self.send_error(416)
                        return
                with file.open("rb") as handle:
                    handle.seek(begin)
                    body = handle.read(end - begin)
                self.send_response(status)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {begin}-{end - 1}/{size}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with server.lock:  # counted before sending, so that a reader done sees it
                    server.served[client] += len(body)
                self.wfile.write(body)

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def take(self):
        """Bytes served since the last call: an int, or ``{client: bytes}`` when prefixed."""
        with self.lock:
            served, self.served = self.served, collections.Counter()
        return dict(served) if self.prefixed else served[""]

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
