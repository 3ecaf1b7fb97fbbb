"""A replay cache of finished requests, so a job killed in the middle of a long LLM shard does
not ask again for what it already has when it resumes.

Each finished request (a text or a final failure) is appended as one JSON line to a file of the
stage's own folder and flushed at once; a resumed run reads the file back and sends only the
requests it lacks. A line torn by the kill is skipped. Keys cover everything that decides a reply
(``base.request_key``: model, prompt hash, sampling params, uid, sample index, attempt, seed), so a
changed prompt or temperature never replays a stale answer. One file per batch of the stage (named
by its first uid), so workers never write the same file. Datasets on object stores, which cannot
append, run without the cache.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from recap.models.textgen.base import OnReply, Reply, Request, request_key

log = logging.getLogger("recap")


def local_dir(url: str) -> str | None:
    """The local path of a dataset folder, or None for an object store."""
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url else url


class RequestCache:
    def __init__(self, directory: str | None):
        self.directory = Path(directory) if directory else None
        self._lock = threading.Lock()

    def _file(self, name: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{name}.jsonl"

    def load(self, name: str) -> dict[str, Reply]:
        if self.directory is None:
            return {}
        path = self._file(name)
        out: dict[str, Reply] = {}
        try:
            lines = path.read_bytes().splitlines()
        except FileNotFoundError:
            return out
        for line in lines:
            try:
                rec = json.loads(line)
                out[rec["key"]] = Reply.from_json(rec["reply"])
            except (ValueError, KeyError, TypeError):
                continue  # the line a kill cut short
        return out

    def append(self, name: str, records: list[dict]) -> None:
        if self.directory is None or not records:
            return
        data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode()
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self._file(name)
            with open(path, "ab") as f:
                # a line cut by an earlier kill gets a newline first, so the next one parses
                if f.tell() and not _ends_with_newline(path):
                    f.write(b"\n")
                f.write(data)
                f.flush()  # in the OS once written: a killed process loses nothing it flushed


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


Call = Callable[[Sequence[Request], OnReply | None], list[Reply]]


def run_cached(call: Call, requests: Sequence[Request], *, model_id: str, sampling: dict,
               cache: RequestCache, name: str) -> tuple[list[Reply], int]:
    """Replies for ``requests``: from the cache where it has them, else from ``call`` (each
    finished one appended to the cache as it arrives). Returns (replies, how many were sent)."""
    keys = [request_key(model_id, sampling, r) for r in requests]
    known = cache.load(name)
    replies: list[Reply | None] = [known.get(k) for k in keys]
    todo = [i for i, r in enumerate(replies) if r is None]
    if not todo:
        return replies, 0  # type: ignore[return-value]

    def finished(j: int, reply: Reply) -> None:
        i = todo[j]
        r = requests[i]
        cache.append(name, [{"key": keys[i], "uid": r.uid, "index": r.index, "attempt": r.attempt,
                             "seed": r.seed, "reply": reply.to_json()}])

    fresh = call([requests[i] for i in todo], finished)
    for i, reply in zip(todo, fresh):
        replies[i] = reply
    return replies, len(todo)  # type: ignore[return-value]
