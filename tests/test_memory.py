"""Memory stays flat: the engine streams shards (a bounded number in flight) and keeps nothing per
shard in memory, so ten times more shards must not raise the driver's or any worker's peak RSS.

Measured with psutil, sampling the driver (this process) and every Ray worker it started
(`ray::` processes; Ray's own daemons, whose task bookkeeping is Ray's, are left out) every 50 ms
through a run of N shards and one of 10N shards, after a warm-up run (imports, Ray Data's first
plan). Tolerance: the 10N run's peaks may exceed the N run's by 5% plus 32 MiB (about 45 MiB for
a 250 MiB driver). Measured here (2 cores, loaded): the driver 256 -> 259 MiB and the largest
worker 209 -> 209 MiB for 8 -> 80 shards, so the margin is allocator noise with room to spare,
while a leak of 1 MiB per shard in the driver (72 MiB over the 72 extra shards) fails, and one of
2 MiB per shard in a stage's workers did fail it (largest worker 242 -> 369 MiB, tried by hand)."""
import threading
import time

import pytest

from recap.pipeline.job import build_job
from recap.pipeline.runner import run_job

psutil = pytest.importorskip("psutil")

N = 8
MIB = 1 << 20


def _job(tmp_path, name: str, shards: int):
    rows = [f"http://example.invalid/{name}/{i}.jpg\tsample {name} {i} caption words" for i in range(shards * 4)]
    src = tmp_path / f"{name}.tsv"
    src.write_text("url\tcaption\n" + "\n".join(rows) + "\n")
    return build_job({"name": name, "seed": 1, "input": {"path": str(src)}, "output": str(tmp_path / name),
                      "download": {"samples_per_shard": 4}, "stages": [{"upper": {}}]},
                     f"{name}.yaml")


class Peaks:
    """Peak RSS of the driver and of each Ray worker process, sampled in a thread."""

    def __init__(self):
        self.driver = 0
        self.workers: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        me = psutil.Process()
        while not self._stop.is_set():
            self.driver = max(self.driver, me.memory_info().rss)
            for p in me.children(recursive=True):
                try:
                    if p.name().startswith("ray::"):
                        self.workers[p.pid] = max(self.workers.get(p.pid, 0), p.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_ten_times_more_shards_do_not_raise_peak_memory(tmp_path, ray_local, fake_stages):
    run_job(_job(tmp_path, "warmup", N), progress=False)
    with Peaks() as small:
        assert run_job(_job(tmp_path, "small", N), progress=False).n_shards == N
    with Peaks() as big:
        assert run_job(_job(tmp_path, "big", 10 * N), progress=False).n_shards == 10 * N
    assert small.workers and big.workers, "no Ray worker was sampled"

    def allowed(base: int) -> int:
        return int(base * 1.05) + 32 * MIB

    report = (f"driver {small.driver / MIB:.0f} -> {big.driver / MIB:.0f} MiB; "
              f"worker max {max(small.workers.values()) / MIB:.0f} -> {max(big.workers.values()) / MIB:.0f} MiB")
    assert big.driver <= allowed(small.driver), report
    assert max(big.workers.values()) <= allowed(max(small.workers.values())), report
    print(report)
