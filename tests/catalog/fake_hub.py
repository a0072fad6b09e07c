"""A stand-in for the Hugging Face Hub's file endpoints, on 127.0.0.1, for `hf_hub_download` to talk to.

What it answers is what huggingface_hub 2.4 asks for (file_download.py, utils/_http.py):
- HEAD /{repo}/resolve/{revision}/{file}: 302 to the file's blob on a "CDN" host (here `localhost`, a
  different host name, so the client stops there as it does for the real CDN) with X-Repo-Commit,
  X-Linked-Etag (the LFS sha256), X-Linked-Size and ETag. Errors carry X-Error-Code (RepoNotFound,
  RevisionNotFound, EntryNotFound) as the Hub's do.
- GET on the CDN location: the bytes, honouring `Range: bytes=N-` with 206 and Content-Range.
Test knobs: drop the connection part-way through the first GET (resume), or serve bytes that do not
match the announced sha256 (corruption).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubFile:
    content: bytes
    served: bytes | None = None  # what GET returns, when it should differ from `content` (corruption)
    drop_after: int | None = None  # close the first GET's connection after this many bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


@dataclass
class FakeHub:
    files: dict[tuple[str, str], HubFile] = field(default_factory=dict)  # (repo, filename) -> file
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)

    def __post_init__(self) -> None:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

            def do_GET(self) -> None:
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, repo: str, filename: str, content: bytes, **knobs) -> HubFile:
        file = HubFile(content, **knobs)
        self.files[repo, filename] = file
        return file

    def gets(self) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET"]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ---- request handling ------------------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, *, head: bool) -> None:
        self.requests.append((h.command, h.path, h.headers.get("Range")))
        parts = h.path.split("?")[0].strip("/").split("/")
        if parts[0] == "cdn" and len(parts) == 2:
            return self._blob(h, parts[1], head=head)
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(h, 404, "RepoNotFound", "not a resolve url")
        repo, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if not any(r == repo for r, _ in self.files):
            return self._error(h, 404, "RepoNotFound", f"Repository {repo} not found")
        if revision not in ("main", COMMIT):
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        file = self.files.get((repo, filename))
        if file is None:
            return self._error(h, 404, "EntryNotFound", f"{filename} does not exist on main", commit=True)
        h.send_response(302)
        h.send_header("Location", f"http://localhost:{self.port}/cdn/{file.sha256}")
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("X-Linked-Etag", f'"{file.sha256}"')
        h.send_header("X-Linked-Size", str(len(file.content)))
        h.send_header("ETag", '"not-the-lfs-etag"')
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _blob(self, h: BaseHTTPRequestHandler, sha: str, *, head: bool) -> None:
        file = next((f for f in self.files.values() if f.sha256 == sha), None)
        if file is None:
            return self._error(h, 404, "EntryNotFound", "no such blob")
        body = file.served if file.served is not None else file.content
        start = 0
        range_header = h.headers.get("Range")
        if range_header and range_header.startswith("bytes=") and range_header.endswith("-"):
            start = int(range_header[len("bytes="):-1])
        chunk = body[start:]
        h.send_response(206 if start else 200)
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        h.send_header("Content-Length", str(len(chunk)))
        h.send_header("Content-Type", "application/octet-stream")
        h.end_headers()
        if head:
            return
        if file.drop_after is not None and not start:
            h.wfile.write(chunk[: file.drop_after])
            h.wfile.flush()
            h.close_connection = True
            file.drop_after = None  # only the first transfer breaks
            return
        h.wfile.write(chunk)

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, status: int, code: str, message: str, *, commit: bool = False) -> None:
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        if commit:
            h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("Content-Length", "0")
        h.end_headers()
