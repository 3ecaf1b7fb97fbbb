"""One live progress line per stage: shards done, samples/s, kept %. It reads the commit markers,
so it sees every worker's progress without any channel to them."""
from __future__ import annotations

import threading
import time
from typing import TextIO

from recap.pipeline.manifest import merge_counts, step_markers
from recap.pipeline.storage import Dataset


class Progress:
    def __init__(self, ds: Dataset, steps, n_shards: int, enabled: bool, stream: TextIO, interval: float = 2.0):
        self.ds, self.n = ds, n_shards
        self.steps = [s for s in steps if s.phase != "partial"]
        self.enabled, self.stream, self.interval = enabled, stream, interval
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: list[tuple[int, str]] = []
        self._t0 = time.time()
        self._base: dict[str, int] = {}

    def start(self) -> None:
        if not self.enabled:
            return
        self._base = {s.step: self._counts(s)["in"] for s in self.steps}  # resumed work is not speed
        self._thread = threading.Thread(target=self._loop, daemon=True, name="recap-progress")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            self._render(final=True)

    def _counts(self, spec) -> dict:
        return merge_counts([m for m in step_markers(self.ds, spec.step) if m.get("config_hash") == spec.config_hash])

    def lines(self) -> list[tuple[int, str]]:
        """(shards done, line) per stage."""
        out = []
        elapsed = max(time.time() - self._t0, 1e-6)
        width = max(len(s.name) for s in self.steps) if self.steps else 8
        for spec in self.steps:
            c = self._counts(spec)
            rate = (c["in"] - self._base.get(spec.step, 0)) / elapsed
            kept = 100.0 * c["kept"] / c["in"] if c["in"] else 0.0
            out.append((c["shards"], f"{spec.name:<{width}}  shards {c['shards']:>5}/{self.n:<5}  {c['in']:>8} samples  "
                                     f"{rate:8.1f}/s  kept {kept:5.1f}%"))
        return out

    def _render(self, final: bool = False) -> None:
        try:
            lines = self.lines()
        except Exception:
            return
        if self.tty:  # redraw the block in place
            if self._last:
                self.stream.write(f"\x1b[{len(self._last)}F")
            self.stream.write("".join(f"{ln}\x1b[K\n" for _, ln in lines))
        else:  # a log: a stage's line only when it finished more shards
            done = [n for n, _ in self._last] if self._last else [-1] * len(lines)
            self.stream.write("".join(f"{ln}\n" for (n, ln), before in zip(lines, done) if n != before))
        self.stream.flush()
        self._last = lines

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._render()
