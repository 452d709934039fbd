"""A local stand-in for the Hugging Face Hub's file API, enough for ``hf_hub_download``.

``HEAD`` / ``GET /{org}/{name}/resolve/{revision}/{filename}`` answer as the Hub does:
``X-Repo-Commit`` (the commit the revision points to), ``ETag`` (the file's sha256, as
for LFS files), ``Content-Length``; errors carry the Hub's ``X-Error-Code``
(``RepoNotFound`` 401 as for a missing or private repo seen without a token,
``GatedRepo`` 401, ``RevisionNotFound`` / ``EntryNotFound`` 404). Every request is
recorded, so a test can say exactly which files were downloaded.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    commit: str
    token: str | None = None  # a gated repo: requests must send ``Bearer <token>``


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, repo, file)

    def add_repo(self, repo_id: str, directory: Path, token: str | None = None) -> FakeRepo:
        files = {p.relative_to(directory).as_posix(): p.read_bytes()
                 for p in sorted(directory.rglob("*")) if p.is_file()}
        commit = hashlib.sha1(repo_id.encode()).hexdigest()  # 40 hex digits, like git's
        self.repos[repo_id] = FakeRepo(files, commit, token)
        return self.repos[repo_id]

    def downloaded(self, repo_id: str) -> set[str]:
        """Files whose bytes were sent (GET) for ``repo_id``."""
        return {file for method, repo, file in self.requests
                if method == "GET" and repo == repo_id}

    def start(self) -> tuple[str, ThreadingHTTPServer]:
        """Serve on 127.0.0.1, any free port; returns the endpoint URL and the server."""
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}", server


class _Handler(BaseHTTPRequestHandler):
    fake_hub: FakeHub

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def log_message(self, *args) -> None:  # quiet
        pass

    def _answer(self, send_body: bool) -> None:
        parts = unquote(self.path.split("?")[0]).lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(404, "RepoNotFound")
        repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        self.fake_hub.requests.append((self.command, repo_id, filename))
        repo = self.fake_hub.repos.get(repo_id)
        if repo is None:
            return self._error(401, "RepoNotFound")
        if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
            return self._error(401, "GatedRepo")
        if revision not in ("main", repo.commit):
            return self._error(404, "RevisionNotFound")
        if filename not in repo.files:
            return self._error(404, "EntryNotFound", repo.commit)
        body = repo.files[filename]
        self.send_response(200)
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)
        return None

    def _error(self, status: int, code: str, commit: str | None = None) -> None:
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Length", "0")
        self.end_headers()
