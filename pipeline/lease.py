"""One writer per dataset: a lease file (host, pid, heartbeat) at the dataset's root.

Object stores have no locks and no exclusive create, so the lease is a small JSON file that the
holder rewrites every ``stale_after / 4`` seconds; a lease whose heartbeat is older than
``stale_after`` belongs to a run that died. On the holder's own host a dead pid frees it at once
(kill -9, then a rerun, never waits). A racing writer is caught by reading the lease back after
a short pause: the one whose token is not there steps back.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from recap.pipeline.errors import DatasetLocked
from recap.pipeline.storage import Dataset

LEASE = "_lease.json"
STALE_AFTER = 120.0  # seconds without a heartbeat before a lease counts as abandoned
_SETTLE = 0.3  # seconds between writing the lease and reading it back


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


class Lease:
    def __init__(self, ds: Dataset, stale_after: float = STALE_AFTER):
        self.ds = ds
        self.stale_after = stale_after
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            return json.loads(self.ds.read_bytes(LEASE))
        except (FileNotFoundError, ValueError, OSError):
            return None

    def _write(self) -> None:
        self.ds.write_bytes(LEASE, json.dumps({"token": self.token, "host": self.host, "pid": os.getpid(),
                                               "heartbeat": time.time()}).encode())

    def holder(self) -> dict | None:
        """The live lease of another run, or None when the dataset is free."""
        held = self._read()
        if not held or held.get("token") == self.token:
            return None
        age = time.time() - float(held.get("heartbeat", 0))
        if age > self.stale_after:
            return None
        if held.get("host") == self.host and not _pid_alive(int(held.get("pid", -1))):
            return None
        return {**held, "age": age}

    def acquire(self) -> None:
        for _ in range(2):
            other = self.holder()
            if other:
                raise DatasetLocked(
                    f"{self.ds.url}: another recap run is writing this dataset (host {other['host']}, "
                    f"pid {other['pid']}, last heartbeat {other['age']:.0f}s ago). Wait for it to finish, or "
                    f"use another --output. A run that died frees it within {self.stale_after:.0f}s.")
            self._write()
            time.sleep(_SETTLE)
            if (self._read() or {}).get("token") == self.token:
                break
        else:
            raise DatasetLocked(f"{self.ds.url}: another recap run took this dataset at the same moment")
        self._thread = threading.Thread(target=self._beat, name="recap-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_after / 4):
            try:
                self._write()
            except OSError:
                pass  # a missed heartbeat is retried; only a long outage lets the lease go stale

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if (self._read() or {}).get("token") == self.token:
            self.ds.remove(LEASE)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
