"""A small Hugging Face Hub-compatible server on loopback, for the real `huggingface_hub` client.

It implements what the client was seen to send (every request is recorded in `FakeHub.requests`):

- `POST /api/validate-yaml` (the card's metadata, checked before a commit: license ids, relation, tags)
- `POST /api/repos/create` (JSON `{name, organization, visibility|private, type}`; 409 when it exists)
- `POST /api/models/{repo}/preupload/{rev}` (every file `regular`: the content goes inline in the commit)
- `POST /api/models/{repo}/commit/{rev}` (NDJSON: a `header` line, then `file` lines with base64 content)
- `GET /api/models/{repo}[/revision/{rev}]` (model info: sha, siblings, tags, cardData)
- `GET /api/models?filter=...&search=...` (list models; each `filter` value is a tag the repo must have)
- `HEAD|GET /{repo}/resolve/{rev}/{path}` (X-Repo-Commit, ETag, Content-Length; Range on GET)
- `DELETE /api/repos/delete`

Tags are derived from the card as the Hub derives them: the card's `tags`, `license:<id>`, and
`base_model:<id>` / `base_model:adapter:<id>` for an adapter of a known base model. Writes need a token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

HUB_LICENSES = {
    "apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc0-1.0", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0",
    "cc-by-nc-sa-4.0", "gpl-3.0", "lgpl-3.0", "agpl-3.0", "mpl-2.0", "openrail", "unlicense", "gemma", "llama3.1",
    "llama3.2", "other",
}
"""Some of the Hub's license ids (it accepts only its own, lower case; `other` goes with `license_name`)."""


def card_errors(readme: str) -> list[str]:
    """What the Hub's metadata check would object to in a README.md (the parts turnflow writes)."""
    if not readme.startswith("---"):
        return []
    try:
        data = yaml.safe_load(readme.split("---", 2)[1]) or {}
    except yaml.YAMLError as exc:
        return [f"invalid YAML: {exc}"]
    errors = []
    license = data.get("license")
    if license is not None and license not in HUB_LICENSES:
        errors.append(f'"license" must be one of [{", ".join(sorted(HUB_LICENSES))}]')
    if license == "other" and not data.get("license_name"):
        errors.append('"license_name" is required when "license" is "other"')
    if data.get("base_model_relation") not in (None, "adapter", "merge", "quantized", "finetune"):
        errors.append('"base_model_relation" must be one of [adapter, merge, quantized, finetune]')
    if data.get("base_model_relation") and not data.get("base_model"):
        errors.append('"base_model_relation" needs "base_model"')
    tags = data.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        errors.append('"tags" must be a list of strings')
    return errors


@dataclass
class Repo:
    """One model repo: its commits (each a full tree), branches, and download count."""

    id: str
    private: bool = False
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)
    refs: dict[str, str] = field(default_factory=dict)
    downloads: int = 0

    def tree(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """(commit sha, files) at a branch name or a commit sha (or a prefix of at least 7 characters)."""
        sha = self.refs.get(revision, revision)
        for commit, files in reversed(self.commits):
            if commit == sha or (len(sha) >= 7 and commit.startswith(sha)):
                return commit, files
        return None

    def card(self, files: dict[str, bytes]) -> dict[str, Any]:
        """The YAML header of the repo's README.md."""
        text = files.get("README.md", b"").decode("utf-8", "replace")
        if not text.startswith("---"):
            return {}
        header = text.split("---", 2)[1]
        data = yaml.safe_load(header)
        return data if isinstance(data, dict) else {}

    def tags(self, files: dict[str, bytes]) -> list[str]:
        """Tags the Hub would show for the repo at this tree."""
        card = self.card(files)
        tags = list(card.get("tags") or [])
        if card.get("license"):
            tags.append(f"license:{card['license']}")
        base = card.get("base_model")
        for model in [base] if isinstance(base, str) else base or []:
            tags.append(f"base_model:{model}")
            if card.get("base_model_relation"):
                tags.append(f"base_model:{card['base_model_relation']}:{model}")
        return tags

    def info(self, sha: str, files: dict[str, bytes]) -> dict[str, Any]:
        """The model info JSON the Hub answers."""
        return {
            "_id": hashlib.sha1(self.id.encode()).hexdigest()[:24], "id": self.id, "modelId": self.id,
            "author": self.id.split("/")[0], "sha": sha, "private": self.private, "disabled": False, "gated": False,
            "downloads": self.downloads, "likes": 0, "tags": self.tags(files), "cardData": self.card(files),
            "library_name": self.card(files).get("library_name"), "lastModified": "2026-01-01T00:00:00.000Z",
            "createdAt": "2026-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": name} for name in sorted(files)],
        }


class FakeHub:
    """The server; `url` is its endpoint (HF_ENDPOINT)."""

    def __init__(self, token: str = "hf_fake_token") -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        """(method, path with query) of every request, in order."""
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, "HEAD")

            def do_GET(self) -> None:
                hub._handle(self, "GET")

            def do_POST(self) -> None:
                hub._handle(self, "POST")

            def do_DELETE(self) -> None:
                hub._handle(self, "DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- helpers for tests

    def paths(self, method: str | None = None) -> list[str]:
        """Paths (without query) of the recorded requests, of one method or all."""
        return [urlsplit(p).path for m, p in self.requests if method is None or m == method]

    def commit(self, repo_id: str, changes: dict[str, bytes | None]) -> str:
        """A commit made on the server's side (adding, replacing or deleting files); returns its sha."""
        with self.lock:
            repo = self.repos[repo_id]
            base = dict(repo.tree("main")[1]) if repo.tree("main") else {}
            for path, data in changes.items():
                if data is None:
                    base.pop(path, None)
                else:
                    base[path] = data
            return self._add_commit(repo, base)

    # -- the protocol

    def _add_commit(self, repo: Repo, files: dict[str, bytes]) -> str:
        parent = repo.refs.get("main", "")
        digest = hashlib.sha1(parent.encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        sha = digest.hexdigest()
        repo.commits.append((sha, files))
        repo.refs["main"] = sha
        return sha

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        split = urlsplit(handler.path)
        path, query = unquote(split.path), parse_qs(split.query)
        with self.lock:
            self.requests.append((method, handler.path))
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        authorised = handler.headers.get("Authorization") == f"Bearer {self.token}"
        try:
            status, headers, payload = self._route(method, path, query, body, authorised, handler.headers)
        except Exception as exc:  # a bug in the fake shows up as a 500 with its message
            status, headers, payload = 500, {}, json.dumps({"error": repr(exc)}).encode()
        handler.send_response(status)
        headers.setdefault("Content-Type", "application/json")
        headers["Content-Length"] = str(len(payload))
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(payload)

    def _route(
        self, method: str, path: str, query: dict[str, list[str]], body: bytes, authorised: bool, request: Any
    ) -> tuple[int, dict[str, str], bytes]:
        def answer(status: int, data: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
            return status, headers or {}, json.dumps(data).encode()

        def not_found(what: str, code: str = "RepoNotFound") -> tuple[int, dict[str, str], bytes]:
            return answer(404, {"error": what}, {"X-Error-Code": code, "X-Error-Message": what})

        if method == "POST" and path == "/api/repos/create":
            if not authorised:
                return answer(401, {"error": "Invalid credentials in Authorization header"})
            data = json.loads(body)
            repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
            with self.lock:
                if repo_id in self.repos:
                    return answer(409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
                private = data.get("private") or data.get("visibility") == "private"
                self.repos[repo_id] = Repo(repo_id, private=bool(private))
            return answer(200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})
        if method == "DELETE" and path == "/api/repos/delete":
            if not authorised:
                return answer(401, {"error": "Invalid credentials in Authorization header"})
            data = json.loads(body)
            repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
            with self.lock:
                self.repos.pop(repo_id, None)
            return answer(200, {})
        if method == "POST" and path == "/api/validate-yaml":
            errors = card_errors(json.loads(body)["content"])
            return answer(400 if errors else 200, {"errors": [{"message": e} for e in errors], "warnings": []})
        if method == "GET" and path == "/api/models":
            return answer(200, self._list(query))
        if path.startswith("/api/models/"):
            return self._api_model(method, path.removeprefix("/api/models/"), body, authorised, answer, not_found)
        if "/resolve/" in path:
            return self._resolve(method, path, request, not_found)
        return not_found(f"no route {method} {path}", "EntryNotFound")

    def _visible(self, repo: Repo, authorised: bool) -> bool:
        return not repo.private or authorised

    def _list(self, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        wanted = [tag for value in query.get("filter", []) for tag in value.split(",") if tag]
        search = (query.get("search") or [""])[0].lower()
        found = []
        with self.lock:
            for repo in self.repos.values():
                tree = repo.tree("main")
                if tree is None or repo.private:
                    continue
                info = repo.info(*tree)
                if all(tag in info["tags"] for tag in wanted) and search in repo.id.lower():
                    if not any(k in query for k in ("cardData", "full")):
                        info.pop("cardData")
                    found.append(info)
        return found

    def _api_model(self, method: str, rest: str, body: bytes, authorised: bool, answer: Any, not_found: Any) -> Any:
        owner, name, *tail = rest.split("/", 3)
        repo = self.repos.get(f"{owner}/{name}")
        if repo is None or not self._visible(repo, authorised):
            return not_found(f"Repository {owner}/{name} not found")
        if method == "GET" and (not tail or tail[0] == "revision"):
            revision = tail[1] if len(tail) > 1 else "main"
            tree = repo.tree(revision)
            if tree is None:
                return not_found(f"Invalid rev id: {revision}", "RevisionNotFound")
            return answer(200, repo.info(*tree))
        if method == "POST" and tail and tail[0] == "preupload":
            if not authorised:
                return answer(401, {"error": "Invalid credentials in Authorization header"})
            files = json.loads(body)["files"]
            return answer(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                          for f in files]})
        if method == "POST" and tail and tail[0] == "commit":
            if not authorised:
                return answer(401, {"error": "Invalid credentials in Authorization header"})
            with self.lock:
                tree = repo.tree("main")
                files = dict(tree[1]) if tree else {}
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        value = item["value"]
                        assert value.get("encoding") == "base64", value
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "deletedFile":
                        files.pop(item["value"]["path"], None)
                    elif item["key"] != "header":
                        return answer(400, {"error": f"unsupported commit operation {item['key']}"})
                sha = self._add_commit(repo, files)
            return answer(200, {"commitUrl": f"{self.url}/{repo.id}/commit/{sha}", "commitOid": sha,
                                "pullRequestUrl": None})
        return not_found(f"no route {method} /api/models/{rest}", "EntryNotFound")

    def _resolve(self, method: str, path: str, request: Any, not_found: Any) -> Any:
        repo_part, _, rest = path.lstrip("/").partition("/resolve/")
        revision, _, filename = rest.partition("/")
        repo = self.repos.get(repo_part)
        if repo is None or not self._visible(repo, request.get("Authorization") == f"Bearer {self.token}"):
            return not_found(f"Repository {repo_part} not found")
        tree = repo.tree(revision)
        if tree is None:
            return not_found(f"Invalid rev id: {revision}", "RevisionNotFound")
        sha, files = tree
        if filename not in files:
            return not_found(f"Entry {filename} not found", "EntryNotFound")
        data = files[filename]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        status = 200
        ranged = request.get("Range")
        if method == "GET" and ranged and ranged.startswith("bytes="):
            start = int(ranged[6:].split("-")[0] or 0)
            data, status = data[start:], 206
            headers["Content-Range"] = f"bytes {start}-{start + len(data) - 1}/{len(files[filename])}"
        if method == "GET" and not filename.endswith((".md", ".json", ".wav")):
            with self.lock:
                repo.downloads += 1
        return status, headers, data
