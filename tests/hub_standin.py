"""A local stand-in for the Hugging Face Hub's HTTP API, so tests can drive the real huggingface_hub client.

Hand `hub.url` to the client as `endpoint=` (or HF_ENDPOINT). Each `Repo` is a local folder whose files are
the repository's files at one commit (`sha`, also reachable as "main"). It serves, with the JSON and headers
that huggingface_hub 2.x parses (plain HTTP downloads, no Xet):

- GET /api/models/{repo_id}[/revision/{rev}]: model info (`HfApi.model_info`, `repo_info`); siblings carry
  sizes, blob ids and LFS info with `files_metadata=True` (`?blobs=true`).
- GET /api/models/{repo_id}/tree/{rev}[/{path}]: the file tree (`HfApi.list_repo_tree`), in one page.
- GET /api/whoami-v2: the account of a token (any token a repo was given), else 401 (`HfApi.whoami`).
- HEAD and GET /{repo_id}/resolve/{rev}/{filename}: a file (`hf_hub_download`, `snapshot_download`).
  Regular files are served there, with their git blob id as ETag. LFS files (weights) answer 302, as on the
  Hub, to a second origin standing in for its CDN (`hub.cdn_url`, paths /repos/{repo_id}/{sha256}), with
  X-Linked-Etag and X-Linked-Size; the client sends no token there. Range requests are answered 206.

And for pushes (`HfApi.create_repo`, `HfApi.create_commit`), with a token in `write_tokens`:

- POST /api/repos/create: a new repository (409 if it exists); 401 without a known token, 403 with a
  read-only one.
- POST /api/validate-yaml: a model card's metadata, always valid.
- POST /api/models/{repo_id}/preupload/{rev}: every file "regular" (sent inline in the commit).
- POST /api/models/{repo_id}/commit/{rev}: the NDJSON commit; its files are kept in `hub.pushed[repo_id]`
  (name -> bytes) and `hub.created[repo_id]` says whether the repository was made private.

Refusals carry the Hub's X-Error-Code, which the client maps to its exceptions: RepoNotFound (401 without
a token, 404 with one), RevisionNotFound and EntryNotFound (404), GatedRepo (401 without a token, 403 with
a token other than the repo's). As on the Hub, a gated repo's model info and tree are public: only its
files are refused.

A third origin (`hub.modelscope_url`) stands in for ModelScope, serving the same repositories to its
client (`modelscope_hub`) at the revision "master" (or the repo's sha), in the JSON envelopes it parses:

- GET /openapi/v1/models/{owner}/{name}: a model's metadata (`HubApi.get_repo`; 404 for an unknown one,
  which the client then asks the legacy API for: GET /api/v1/models/{owner}/{name}, 404 too).
- GET /api/v1/models/{owner}/{name}/repo/files?Revision=&Recursive=: the file listing with sizes and
  SHA-256 (`HubApi.list_repo_files`, `download_repo`); 404 for an unknown revision.
- GET /api/v1/models/{owner}/{name}/repo?Revision=&FilePath=: a file; weights answer 302 to the CDN origin
  by another host name (localhost), as ModelScope's storage is on another host (a cookie is kept per host
  name, whatever the port); Range requests are answered 206. A gated repo's files need its token (as
  `Authorization: Bearer`, or the `m_session_id` cookie the client also sends): 401 without, 403 with
  another.
- GET /openapi/v1/users/me: the account of a known token, else 401 (`HubApi.whoami`).
- GET /api/v1/repos/internalAccelerationInfo: 404 (the client's probe for a cloud-internal route).
"""

import base64
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from math import prod
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".onnx", ".h5", ".msgpack")
_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_INFO = re.compile(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?")
_TREE = re.compile(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?")
_RESOLVE = re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)")
_CDN = re.compile(rf"/repos/{_REPO}/(?P<sha256>[0-9a-f]{{64}})")
_PREUPLOAD = re.compile(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)")
_COMMIT = re.compile(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)")
_MS_INFO = re.compile(r"/(?:openapi/v1|api/v1)/models/(?P<repo>[^/]+/[^/]+)")
_MS_FILES = re.compile(r"/api/v1/models/(?P<repo>[^/]+/[^/]+)/repo/files")
_MS_FILE = re.compile(r"/api/v1/models/(?P<repo>[^/]+/[^/]+)/repo")


@dataclass
class Repo:
    folder: Path
    sha: str
    gated: bool = False
    token: str | None = None
    license: str | None = "apache-2.0"
    pipeline_tag: str | None = "text-generation"
    bytes_per_second: float | None = None
    interrupt_after: int | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{40}", self.sha):
            raise ValueError(f"a commit sha is 40 hex digits, not {self.sha!r}")


@dataclass(frozen=True)
class _File:
    path: str
    disk: Path
    size: int
    blob_id: str
    sha256: str
    lfs: bool

    def lfs_info(self, key: str) -> dict[str, Any]:
        return {"lfs": {key: self.sha256, "size": self.size, "pointerSize": 134}} if self.lfs else {}

    def tree_entry(self) -> dict[str, Any]:
        entry = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        return entry | self.lfs_info("oid")


def _scan(folder: Path) -> dict[str, _File]:
    files = {}
    for disk in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        data, path = disk.read_bytes(), disk.relative_to(folder).as_posix()
        blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        sha256 = hashlib.sha256(data).hexdigest()
        files[path] = _File(path, disk, len(data), blob_id, sha256, path.endswith(LFS_SUFFIXES))
    return files


def _safetensors(files: list[_File]) -> dict[str, Any] | None:
    """Parameter counts by dtype, read from the safetensors headers, as the Hub reports them."""
    counts: dict[str, int] = {}
    for file in files:
        with file.disk.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = f.read(length) if length < file.size else b""
        try:
            for tensor in (t for name, t in json.loads(header).items() if name != "__metadata__"):
                counts[tensor["dtype"]] = counts.get(tensor["dtype"], 0) + prod(tensor["shape"])
        except (ValueError, AttributeError, KeyError, TypeError):
            return None
    return {"parameters": counts, "total": sum(counts.values())} if counts else None


class Hub:
    """A running stand-in. `requests` records (method, path without query, Authorization or None) for every
    request to either origin; `ranges` records (path, Range header) for every request that had one."""

    def __init__(self, repos: dict[str, Repo], write_tokens: set[str] | frozenset[str] = frozenset()) -> None:
        self.repos = dict(repos)
        self.write_tokens = set(write_tokens)
        self.created: dict[str, bool] = {}  # repositories made by a push: repo id -> private
        self.pushed: dict[str, dict[str, bytes]] = {}
        self.files = {repo_id: _scan(repo.folder) for repo_id, repo in self.repos.items()}
        self.servers = [_Server(self, "hub"), _Server(self, "cdn"), _Server(self, "modelscope")]
        urls = [f"http://127.0.0.1:{server.server_port}" for server in self.servers]
        self.url, self.cdn_url, self.modelscope_url = urls
        self.requests: list[tuple[str, str, str | None]] = []
        self.ranges: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._downloaded: set[tuple[str, str]] = set()
        self._stopping = threading.Event()

    def model_info(self, repo_id: str, repo: Repo, blobs: bool) -> dict[str, Any]:
        files = self.files[repo_id]
        config = json.loads(files["config.json"].disk.read_text()) if "config.json" in files else {}
        weights = _safetensors([f for f in files.values() if f.path.endswith(".safetensors")])
        blob = {f.path: {"blobId": f.blob_id, "size": f.size} | f.lfs_info("sha256") for f in files.values()}
        licence = f"license:{repo.license}" if repo.license else None
        tags = ["transformers" if config else None, "safetensors" if weights else None]
        tags += [config.get("model_type"), repo.pipeline_tag, licence]
        info = {
            "id": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None,
            "sha": repo.sha,
            "lastModified": "2024-01-01T00:00:00.000Z",
            "private": False,
            "gated": "auto" if repo.gated else False,
            "library_name": "transformers" if config else None,
            "pipeline_tag": repo.pipeline_tag,
            "tags": [tag for tag in tags if tag],
            "siblings": [{"rfilename": path} | (blob[path] if blobs else {}) for path in files],
            "usedStorage": sum(f.size for f in files.values()),
            "cardData": {"license": repo.license} if repo.license else None,
            "config": {k: config.get(k) for k in ("architectures", "model_type")} if config else None,
            "safetensors": weights,
        }
        return {key: value for key, value in info.items() if value is not None}


class _Refusal(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class _Server(ThreadingHTTPServer):
    def __init__(self, hub: Hub, kind: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub, self.cdn, self.modelscope = hub, kind == "cdn", kind == "modelscope"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        hub, url, head = self.server.hub, urlsplit(self.path), self.command == "HEAD"
        with hub._lock:
            hub.requests.append((self.command, unquote(url.path), self._credentials()))
            if "Range" in self.headers:
                hub.ranges.append((unquote(url.path), self.headers["Range"]))
        try:
            if self.server.modelscope:
                self._modelscope(url.path, parse_qs(url.query), head)
            elif self.server.cdn:
                m = _CDN.fullmatch(url.path)
                repo_id = unquote(m["repo"]) if m else ""
                found = [f for f in hub.files.get(repo_id, {}).values() if m and f.sha256 == m["sha256"]]
                if not found:
                    raise _Refusal(404, "EntryNotFound", "Entry not found")
                self._file(repo_id, found[0], {"ETag": f'"{found[0].sha256}"'}, head)
            elif url.path == "/api/whoami-v2":  # `HfApi.whoami`: a token some repo was given is an account's
                auth = self.headers.get("Authorization") or ""
                known = {r.token for r in hub.repos.values() if r.token} | hub.write_tokens
                if not any(auth == f"Bearer {token}" for token in known):
                    raise _Refusal(401, "Unauthorized", "Invalid credentials in Authorization header")
                self._json(200, {"type": "user", "name": "standin-user", "auth": {}}, {}, head)
            elif m := _TREE.fullmatch(url.path):
                query = parse_qs(url.query)
                self._tree(unquote(m["repo"]), unquote(m["rev"]), unquote(m["sub"] or ""), query)
            elif m := _INFO.fullmatch(url.path):
                repo_id = unquote(m["repo"])
                repo = self._repo(repo_id, unquote(m["rev"] or "main"), content=False)
                self._json(200, hub.model_info(repo_id, repo, "blobs" in parse_qs(url.query)), {}, head)
            elif m := _RESOLVE.fullmatch(url.path):
                self._resolve(unquote(m["repo"]), unquote(m["rev"]), unquote(m["file"]), head)
            else:
                raise _Refusal(404, "NotFound", "Sorry, we can't find the page you are looking for.")
        except _Refusal as refusal:
            headers = {"X-Error-Code": refusal.code, "X-Error-Message": refusal.message, **refusal.headers}
            self._json(refusal.status, {"error": refusal.message}, headers, head)
        except (BrokenPipeError, ConnectionResetError):
            pass

    do_HEAD = do_GET

    def _credentials(self) -> str | None:
        """What a request carries that could be a token: its Authorization header, or a session cookie."""
        cookie = self.headers.get("Cookie") or ""
        session = f"Cookie: {cookie}" if "m_session_id" in cookie else None
        return self.headers.get("Authorization") or session

    def _modelscope(self, path: str, query: dict[str, list[str]], head: bool) -> None:
        hub = self.server.hub

        def envelope(data: Any, status: int = 200) -> None:
            ok, openapi = status < 400, path.startswith("/openapi/")
            body = {"success": ok, "data": data} if openapi else {"Code": status, "Data": data}
            self._json(status, body if ok else body | {"message": data, "Message": data}, {}, head)

        def repo_at(repo_id: str) -> Repo:
            repo = hub.repos.get(repo_id)
            if repo is None:
                raise _Refusal(404, "NotExist", f"model {repo_id} does not exist")
            revision = query.get("Revision", ["master"])[0]
            if revision not in ("master", repo.sha):
                raise _Refusal(404, "NotExist", f"revision {revision} does not exist")
            return repo

        try:
            if path == "/openapi/v1/users/me":
                known = {r.token for r in hub.repos.values() if r.token} | hub.write_tokens
                if not any(self._credentials() == f"Bearer {token}" for token in known):
                    raise _Refusal(401, "Unauthorized", "invalid token")
                envelope({"username": "standin-user", "id": 7})
            elif m := _MS_FILES.fullmatch(path):
                repo_at(unquote(m["repo"]))
                files = hub.files[unquote(m["repo"])].values()
                listing = [
                    {"Path": f.path, "Name": f.path.rsplit("/", 1)[-1], "Size": f.size, "Sha256": f.sha256,
                     "Type": "blob"}
                    for f in files
                ]  # fmt: skip
                envelope({"Files": listing})
            elif m := _MS_FILE.fullmatch(path):
                repo_id = unquote(m["repo"])
                repo = repo_at(repo_id)
                file = hub.files[repo_id].get(query.get("FilePath", [""])[0])
                if file is None:
                    raise _Refusal(404, "NotExist", "file does not exist")
                if repo.gated and not (repo.token and repo.token in (self._credentials() or "")):
                    raise _Refusal(403 if self._credentials() else 401, "Forbidden", "access denied")
                if file.lfs:
                    storage = hub.cdn_url.replace("127.0.0.1", "localhost")
                    location = f"{storage}/repos/{repo_id}/{file.sha256}"
                    self._start(302, {"Location": location, "Content-Length": "0"})
                else:
                    self._file(repo_id, file, {}, head)
            elif m := _MS_INFO.fullmatch(path):
                repo_id = unquote(m["repo"])
                repo = repo_at(repo_id)
                envelope({"id": repo_id, "license": repo.license, "gated": repo.gated, "private": False})
            else:
                raise _Refusal(404, "NotFound", "not found")
        except _Refusal as refusal:
            envelope(refusal.message, refusal.status)

    def do_POST(self) -> None:
        hub, url = self.server.hub, urlsplit(self.path)
        with hub._lock:
            hub.requests.append(("POST", unquote(url.path), self.headers.get("Authorization")))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            self._writer()
            if url.path == "/api/validate-yaml":  # a model card's metadata, checked before a commit
                self._json(200, {"errors": [], "warnings": []}, {}, head=False)
            elif url.path == "/api/repos/create":
                asked = json.loads(body)
                repo_id = "/".join(p for p in (asked.get("organization"), asked["name"]) if p)
                if repo_id in hub.created or repo_id in hub.repos:
                    raise _Refusal(409, "RepoExists", "You already created this model repo")
                hub.created[repo_id] = asked.get("visibility", "public") == "private"
                hub.pushed[repo_id] = {}
                self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id}, {}, head=False)
            elif m := _PREUPLOAD.fullmatch(url.path):
                self._pushable(unquote(m["repo"]))
                files = json.loads(body)["files"]
                modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                self._json(200, {"files": modes, "commitOid": "0" * 40}, {}, head=False)
            elif m := _COMMIT.fullmatch(url.path):
                repo_id = unquote(m["repo"])
                self._pushable(repo_id)
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                files = {
                    item["value"]["path"]: base64.b64decode(item["value"]["content"])
                    for item in lines
                    if item["key"] == "file"
                }
                with hub._lock:
                    hub.pushed[repo_id] |= files
                    oid = hashlib.sha1(json.dumps(sorted(hub.pushed[repo_id])).encode() + body).hexdigest()
                commit = {
                    "commitUrl": f"{hub.url}/{repo_id}/commit/{oid}",
                    "commitOid": oid,
                    "pullRequestUrl": None,
                }
                self._json(200, commit, {}, head=False)
            else:
                raise _Refusal(404, "NotFound", "Sorry, we can't find the page you are looking for.")
        except _Refusal as refusal:
            headers = {"X-Error-Code": refusal.code, "X-Error-Message": refusal.message, **refusal.headers}
            self._json(refusal.status, {"error": refusal.message}, headers, head=False)

    def _writer(self) -> None:
        """A push needs a token allowed to write: 401 without a known one, 403 with a read-only one."""
        hub, auth = self.server.hub, self.headers.get("Authorization") or ""
        if any(auth == f"Bearer {token}" for token in hub.write_tokens):
            return
        if any(auth == f"Bearer {r.token}" for r in hub.repos.values() if r.token):
            raise _Refusal(403, "Forbidden", "You don't have the rights to write to this namespace")
        raise _Refusal(401, "Unauthorized", "Invalid credentials in Authorization header")

    def _pushable(self, repo_id: str) -> None:
        if repo_id not in self.server.hub.created:
            raise _Refusal(404, "RepoNotFound", "Repository not found")

    def _repo(self, repo_id: str, revision: str, content: bool) -> Repo:
        repo, auth = self.server.hub.repos.get(repo_id), self.headers.get("Authorization")
        if repo is None:
            raise _Refusal(404 if auth else 401, "RepoNotFound", "Repository not found")
        if content and repo.gated and (repo.token is None or auth != f"Bearer {repo.token}"):
            refused = f"Access to model {repo_id} is restricted"
            if auth is None:
                login = "You must have access to it and be authenticated to access it. Please log in."
                raise _Refusal(401, "GatedRepo", f"{refused}. {login}")
            ask = f"Visit {self.server.hub.url}/{repo_id} to ask for access."
            raise _Refusal(403, "GatedRepo", f"{refused} and you are not in the authorized list. {ask}")
        if revision not in ("main", repo.sha):
            raise _Refusal(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo

    def _tree(self, repo_id: str, revision: str, sub: str, query: dict[str, list[str]]) -> None:
        self._repo(repo_id, revision, content=False)
        files = self.server.hub.files[repo_id]
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        folders = {path.rsplit("/", i)[0] for path in files for i in range(1, path.count("/") + 1)}
        if sub and sub not in folders:
            raise _Refusal(404, "EntryNotFound", f"{sub} does not exist on {revision}")
        prefix, entries = f"{sub}/" if sub else "", []
        for path in sorted(folders | set(files)):
            if path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :]):
                folder = {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0}
                entries.append(files[path].tree_entry() if path in files else folder | {"path": path})
        self._json(200, entries, {}, head=False)

    def _resolve(self, repo_id: str, revision: str, filename: str, head: bool) -> None:
        repo = self._repo(repo_id, revision, content=True)
        file, commit = self.server.hub.files[repo_id].get(filename), {"X-Repo-Commit": repo.sha}
        if file is None:
            raise _Refusal(404, "EntryNotFound", "Entry not found", commit)
        if not file.lfs:
            self._file(repo_id, file, commit | {"ETag": f'"{file.blob_id}"'}, head)
            return
        etag, location = f'"{file.sha256}"', f"{self.server.hub.cdn_url}/repos/{repo_id}/{file.sha256}"
        linked = {"ETag": etag, "X-Linked-Etag": etag, "X-Linked-Size": str(file.size), "Location": location}
        self._start(302, commit | linked | {"Content-Length": "0"})

    def _file(self, repo_id: str, file: _File, headers: dict[str, str], head: bool) -> None:
        hub, repo = self.server.hub, self.server.hub.repos[repo_id]
        start, end, status = 0, file.size - 1, 200
        if m := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "").strip()):
            start, end = int(m[1]), min(int(m[2]), end) if m[2] else end
            if start > end:
                unsatisfiable = {"Content-Range": f"bytes */{file.size}"}
                raise _Refusal(416, "RangeNotSatisfiable", "Range Not Satisfiable", unsatisfiable)
            status, headers = 206, headers | {"Content-Range": f"bytes {start}-{end}/{file.size}"}
        length = {"Accept-Ranges": "bytes", "Content-Length": str(end - start + 1)}
        self._start(status, headers | length | {"Content-Type": "application/octet-stream"})
        if head:
            return
        limit = end - start + 1
        with hub._lock:
            first = (repo_id, file.path) not in hub._downloaded
            hub._downloaded.add((repo_id, file.path))
        if repo.interrupt_after is not None and file.size > repo.interrupt_after and first:
            limit = min(limit, repo.interrupt_after)
        rate = repo.bytes_per_second
        chunk, sent, began = (max(1024, int(rate / 20)) if rate else 256 * 1024), 0, time.monotonic()
        with file.disk.open("rb") as f:
            f.seek(start)
            while sent < limit and not hub._stopping.is_set() and (data := f.read(min(chunk, limit - sent))):
                self.wfile.write(data)
                sent += len(data)
                if rate:
                    hub._stopping.wait(max(0.0, began + sent / rate - time.monotonic()))

    def _start(self, status: int, headers: dict[str, str], body: bytes = b"", head: bool = False) -> None:
        self.send_response(status)
        for name, value in (headers | ({"Content-Length": str(len(body))} if body else {})).items():
            self.send_header(name, value)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _json(self, status: int, body: Any, headers: dict[str, str], head: bool) -> None:
        self._start(status, headers | {"Content-Type": "application/json"}, json.dumps(body).encode(), head)


@contextmanager
def running_hub(
    repos: dict[str, Repo], write_tokens: set[str] | frozenset[str] = frozenset()
) -> Iterator[Hub]:
    """Serve `repos` (repo id -> Repo) on 127.0.0.1 on free ports, in background threads, until exit;
    `write_tokens` may push."""
    hub = Hub(repos, write_tokens)
    threads = [threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True) for s in hub.servers]
    for thread in threads:
        thread.start()
    try:
        yield hub
    finally:
        hub._stopping.set()
        for server, thread in zip(hub.servers, threads, strict=True):
            server.shutdown()
            server.server_close()
            thread.join()
