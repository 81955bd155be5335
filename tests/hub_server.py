"""A small in-memory Hugging Face Hub for tests: a real HTTP server on 127.0.0.1 in a thread.

It implements the endpoints huggingface_hub uses to create a repo, commit files (preupload,
validate-yaml, commit), list them (tree, paths-info, repo info) and download them (resolve),
with git semantics that matter to us: a commit is applied whole or not at all, ``parentCommit``
must match the branch head, and every file gets its git blob id. Files are answered as "regular" uploads (inline base64 in the
commit) unless ``hub.lfs_threshold_bytes`` is set: files at least that large are then "lfs" and go
through the LFS batch API and a basic PUT transfer, as huggingface_hub does when Xet is disabled.

Failure injection: ``hub.fail_commit = 500`` makes the next commit request (to
``hub.fail_commit_repo`` when set) fail with that status after its body has been read, leaving the
repository untouched.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import yaml


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    # commit oid -> {path: bytes}; head of "main"
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)

    @property
    def head(self) -> str:
        return self.history[-1]

    def files(self, revision: str) -> dict[str, bytes]:
        if revision in ("main", "HEAD"):
            return self.commits[self.head]
        matches = [oid for oid in self.commits if oid.startswith(revision)]
        if len(matches) != 1:
            raise KeyError(revision)
        return self.commits[matches[0]]

    def add_commit(self, files: dict[str, bytes]) -> str:
        """A commit on top of the head that adds ``files`` (as a test sets up a dataset); its oid."""
        oid = hashlib.sha1(repr((self.head, sorted(files.items()))).encode()).hexdigest()
        self.commits[oid] = {**self.commits[self.head], **files}
        self.history.append(oid)
        return oid

    def resolve(self, revision: str) -> str:
        if revision in ("main", "HEAD"):
            return self.head
        return next(oid for oid in self.commits if oid.startswith(revision))


class FakeHub:
    """State of the fake Hub plus the server thread. Use as a context manager."""

    def __init__(self, token: str = "hf_testtoken_0123456789abcdefghij") -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.fail_commit: int | None = None
        self.fail_commit_repo: str | None = None  # only fail commits to this repo
        self.lfs_threshold_bytes: int | None = None
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content uploaded through LFS
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def create(self, repo_id: str, private: bool = False) -> Repo:
        repo = Repo(repo_id, private)
        initial = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        oid = hashlib.sha1(f"init {repo_id}".encode()).hexdigest()
        repo.commits[oid] = initial
        repo.history.append(oid)
        self.repos[repo_id] = repo
        return repo


_REPO = r"(?P<repo>[^/]+/[^/.]+(?:\.(?!git/)[^/.]+)*)"


def _file_entry(path: str, data: bytes, hub: FakeHub) -> dict[str, Any]:
    """A tree/paths-info entry; LFS files carry the sha256 of their content, like the Hub's."""
    sha256 = hashlib.sha256(data).hexdigest()
    if sha256 in hub.lfs_objects:
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
        return {"type": "file", "oid": git_blob_id(pointer), "size": len(data), "path": path,
                "lfs": {"oid": sha256, "size": len(data), "pointerSize": len(pointer)}}
    return {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        # --- helpers --------------------------------------------------------------------
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None,
                  raw: bytes | None = None, head: bool = False) -> None:
            data = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if not head:
                self.wfile.write(data)

        def _error(self, status: int, message: str, code: str | None = None) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers=headers)

        def _authorized(self) -> bool:
            return self.headers.get("Authorization") == f"Bearer {hub.token}"

        def _repo(self, repo_id: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not self._authorized()):
                self._error(404, "Repository not found", "RepoNotFound")
                return None
            return repo

        @staticmethod
        def _entries(files: dict[str, bytes], prefix: str, recursive: bool) -> list[dict[str, Any]]:
            entries: dict[str, dict[str, Any]] = {}
            prefix = prefix.strip("/")
            for path, data in sorted(files.items()):
                if prefix and not path.startswith(prefix + "/"):
                    continue
                rest = path[len(prefix) + 1:] if prefix else path
                parts = rest.split("/")
                if len(parts) > 1:
                    folders = range(1, len(parts)) if recursive else range(1, 2)
                    for depth in folders:
                        folder = "/".join(([prefix] if prefix else []) + parts[:depth])
                        entries.setdefault(folder, {"type": "directory", "oid": "0" * 40, "size": 0, "path": folder})
                    if not recursive:
                        continue
                entries[path] = _file_entry(path, data, hub)
            return list(entries.values())

        # --- routes ---------------------------------------------------------------------
        def do_PUT(self) -> None:
            path = unquote(urlparse(self.path).path)
            hub.requests.append(("PUT", path))
            body = self._body()
            m = re.fullmatch(r"/lfs-upload/(?P<oid>[0-9a-f]{64})", path)
            if not m:
                return self._error(404, f"no route {path}")
            if hashlib.sha256(body).hexdigest() != m["oid"]:
                return self._error(400, "uploaded content does not match its sha256")
            hub.lfs_objects[m["oid"]] = body
            self._send(200, {})

        def do_HEAD(self) -> None:
            self._resolve(head=True)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            path = unquote(url.path)
            query = parse_qs(url.query)
            hub.requests.append(("GET", path))
            if m := re.fullmatch(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", path):
                repo = self._repo(m["repo"])
                if repo is None:
                    return
                try:
                    sha = repo.resolve(m["rev"] or "main")
                except (KeyError, StopIteration):
                    return self._error(404, "Revision not found", "RevisionNotFound")
                siblings = [{"rfilename": p} for p in sorted(repo.commits[sha])]
                return self._send(200, {"id": repo.repo_id, "sha": sha, "private": repo.private,
                                        "siblings": siblings, "tags": []})
            if m := re.fullmatch(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?P<sub>/.*)?", path):
                repo = self._repo(m["repo"])
                if repo is None:
                    return
                try:
                    files = repo.files(m["rev"])
                except (KeyError, StopIteration):
                    return self._error(404, "Revision not found", "RevisionNotFound")
                recursive = query.get("recursive", ["False"])[0].lower() == "true"
                return self._send(200, self._entries(files, m["sub"] or "", recursive))
            self._resolve(head=False)

        def _resolve(self, head: bool) -> None:
            path = unquote(urlparse(self.path).path)
            if head:
                hub.requests.append(("HEAD", path))
            # Model and dataset repos share one namespace here; datasets resolve under /datasets/.
            m = re.fullmatch(rf"/(?:datasets/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
            if not m:
                return self._error(404, f"no route {path}")
            repo = self._repo(m["repo"])
            if repo is None:
                return
            try:
                sha = repo.resolve(m["rev"])
            except (KeyError, StopIteration):
                return self._error(404, "Revision not found", "RevisionNotFound")
            data = repo.commits[sha].get(m["file"])
            if data is None:
                return self._error(404, "Entry not found", "EntryNotFound")
            sha256 = hashlib.sha256(data).hexdigest()
            etag = sha256 if sha256 in hub.lfs_objects else git_blob_id(data)
            headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"'}
            self._send(200, raw=data, headers=headers, head=head)

        def do_POST(self) -> None:
            url = urlparse(self.path)
            path = unquote(url.path)
            hub.requests.append(("POST", path))
            body = self._body()
            if path == "/api/repos/create":
                if not self._authorized():
                    return self._error(401, "Invalid credentials in Authorization header")
                payload = json.loads(body)
                repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
                with hub._lock:
                    if repo_id in hub.repos:  # the Hub's 409 body still carries the url
                        return self._send(409, {"error": "You already created this model repo",
                                                "url": f"{hub.endpoint}/{repo_id}"},
                                          headers={"X-Error-Message": "You already created this model repo"})
                    hub.create(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
                return self._send(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
            if path == "/api/validate-yaml":
                content = json.loads(body)["content"]
                match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
                if not match:
                    return self._send(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
                try:
                    meta = yaml.safe_load(match.group(1))
                except yaml.YAMLError as exc:
                    return self._send(400, {"errors": [{"message": f"invalid YAML: {exc}"}]})
                if not isinstance(meta, dict):
                    return self._send(400, {"errors": [{"message": "metadata must be a mapping"}]})
                return self._send(200, {"errors": [], "warnings": []})
            if m := re.fullmatch(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", path):
                repo = self._repo(m["repo"])
                if repo is None:
                    return
                if not self._authorized():
                    return self._error(401, "Invalid credentials in Authorization header")
                files = repo.files(m["rev"])
                answer = []
                for item in json.loads(body)["files"]:
                    existing = files.get(item["path"])
                    lfs = hub.lfs_threshold_bytes is not None and item["size"] >= hub.lfs_threshold_bytes
                    answer.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                                   "oid": git_blob_id(existing) if existing is not None else None})
                return self._send(200, {"files": answer, "commitOid": repo.resolve(m["rev"])})
            if m := re.fullmatch(rf"/{_REPO}\.git/info/lfs/objects/batch", path):
                if not self._authorized():
                    return self._error(401, "Invalid credentials in Authorization header")
                objects = []
                for obj in json.loads(body)["objects"]:
                    entry = {"oid": obj["oid"], "size": obj["size"]}
                    if obj["oid"] not in hub.lfs_objects:
                        entry["actions"] = {"upload": {"href": f"{hub.endpoint}/lfs-upload/{obj['oid']}"}}
                    objects.append(entry)
                return self._send(200, {"transfer": "basic", "objects": objects})
            if m := re.fullmatch(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", path):
                return self._commit(m["repo"], m["rev"], body)
            if m := re.fullmatch(rf"/api/models/{_REPO}/paths-info/(?P<rev>[^/]+)", path):
                repo = self._repo(m["repo"])
                if repo is None:
                    return
                files = repo.files(m["rev"])
                wanted = parse_qs(body.decode()).get("paths", [])
                answer = [_file_entry(p, files[p], hub) for p in wanted if p in files]
                return self._send(200, answer)
            self._error(404, f"no route {path}")

        def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
            if not self._authorized():
                return self._error(401, "Invalid credentials in Authorization header")
            repo = self._repo(repo_id)
            if repo is None:
                return
            if hub.fail_commit is not None and hub.fail_commit_repo in (None, repo_id):
                status, hub.fail_commit = hub.fail_commit, None
                return self._error(status, "Internal Error - injected commit failure")
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = lines[0]["value"]
            with hub._lock:
                parent = header.get("parentCommit")
                if parent is not None and not repo.head.startswith(parent):
                    return self._error(412, "A commit has happened since. Please refresh and try again.")
                files = dict(repo.files(revision))
                for line in lines[1:]:
                    key, value = line["key"], line["value"]
                    if key == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif key == "lfsFile":
                        data = hub.lfs_objects.get(value["oid"])
                        if data is None or len(data) != value["size"]:
                            return self._error(422, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                        files[value["path"]] = data
                    elif key == "deletedFile":
                        if value["path"] not in files:
                            return self._error(404, "A file with this name doesn't exist")
                        del files[value["path"]]
                    elif key == "deletedFolder":
                        prefix = value["path"].rstrip("/") + "/"
                        files = {p: d for p, d in files.items() if not p.startswith(prefix)}
                    else:
                        return self._error(400, f"unsupported commit operation {key!r} in the fake hub")
                oid = hashlib.sha1(repo.head.encode() + body).hexdigest()
                repo.commits[oid] = files
                repo.history.append(oid)
            self._send(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                             "pullRequestUrl": None})

    return Handler
