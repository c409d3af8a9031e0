"""A folder laid out like a hub mirror (``<root>/<owner>/<name>/<files>``) served over loopback HTTP with the
endpoints ``huggingface_hub`` reads (``HF_ENDPOINT`` points it here): repo info, the recursive tree, and
``resolve`` with the commit/etag/size headers. Only what ``snapshot_download`` of public model repos uses."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


def _sha(repo: str) -> str:
    return hashlib.sha1(repo.encode()).hexdigest()


def serve(root: Path) -> tuple[ThreadingHTTPServer, str]:
    """Start the mirror of ``root`` on a free loopback port; returns (server, endpoint URL)."""
    root = Path(root)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
            self.send_response(code)
            for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, obj):
            self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

        def _files(self, repo: str) -> list[Path]:
            base = root / repo
            return sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else []

        def _route(self, head: bool):
            parts = [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]
            if parts[:2] == ["api", "models"] and len(parts) >= 6:
                repo, kind = "/".join(parts[2:4]), parts[4]
                files = self._files(repo)
                if not files:
                    return self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
                rel = [p.relative_to(root / repo).as_posix() for p in files]
                if kind == "revision":
                    return self._json({"id": repo, "modelId": repo, "sha": _sha(repo), "private": False,
                                       "siblings": [{"rfilename": r} for r in rel]})
                if kind == "tree":
                    return self._json([{"type": "file", "path": r, "size": p.stat().st_size,
                                        "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for r, p in zip(rel, files)])
            if len(parts) >= 5 and parts[2] == "resolve":
                repo, path = "/".join(parts[:2]), root.joinpath(*parts[:2], *parts[4:])
                if path.is_file():
                    body = path.read_bytes()
                    etag = hashlib.sha1(body).hexdigest()
                    return self._send(200, body, {"X-Repo-Commit": _sha(repo), "ETag": f'"{etag}"',
                                                  "Content-Type": "application/octet-stream"}, head=head)
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": _sha(repo)}, head=head)
            return self._send(404, b"", head=head)

        def do_GET(self):
            self._route(False)

        def do_HEAD(self):
            self._route(True)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
