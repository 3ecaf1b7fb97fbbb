"""Text backends' throughput, each against its own baseline measured in the same run.

1. The OpenAI-compatible client: requests/s at the configured concurrency vs one request at a
   time, against the same local server (tests/llm_server.py, a protocol test double on 127.0.0.1)
   with a fixed service delay per request. With the server's delay dominating, the ratio should
   approach the concurrency; the client's own cost (JSON, threads, a connection per request) is
   what keeps it below.
2. CoCa captions/s through the recaption stage's ``process()`` (image check, preprocessing, the
   per-request seeds, verdicts) vs ``recap.trainer.generate`` called directly on the same images
   already decoded, same batch size and decoding. The model is a random-init recap-tiny-coca saved
   as a `recap train` checkpoint: a forward costs the same whatever the weights.

    PYTHONPATH=. .venv/bin/python bench/llm_client.py [--requests 200] [--concurrency 16] [--delay 0.05]
                                                      [--images 64] [--batch-size 32] [--only http|coca]

Figures on a shared machine vary with the other load on it: say so with any number quoted.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/llm_server.py
from bench.report import record  # noqa: E402


def bench_http(n: int, concurrency: int, delay: float) -> dict:
    import subprocess

    from recap.models.textgen.base import BackendConfig, Request
    from recap.models.textgen.openai_compat import OpenAIBackend
    from tests.llm_server import MODEL

    # the server in a process of its own: in this one its threads would share the client's GIL
    server = subprocess.Popen([sys.executable, "-m", "tests.llm_server", "--delay", str(delay)],
                              cwd=Path(__file__).resolve().parent.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    base_url = server.stdout.readline().strip()

    def rate(conc: int, count: int) -> float:
        cfg = BackendConfig(kind="openai", model=MODEL, base_url=base_url, concurrency=conc, max_retries=0)
        backend = OpenAIBackend(cfg)
        reqs = [Request(uid=f"u{i}", index=0, seed=i, system="Rewrite.", user=f"<caption>a red circle {i}</caption> =>")
                for i in range(count)]
        t0 = time.perf_counter()
        out = backend.generate(reqs)
        took = time.perf_counter() - t0
        assert all(r.ok for r in out), [r.reason for r in out if not r.ok][:3]
        return count / took

    try:
        serial = rate(1, max(10, n // max(1, concurrency)))  # fewer: one at a time is slow by design
        parallel = rate(concurrency, n)
    finally:
        server.stdin.close()
        server.wait(timeout=10)
    return {"serial_rps": serial, "concurrent_rps": parallel, "ratio": parallel / serial,
            "ideal": min(concurrency, n), "server_delay_s": delay}


def bench_coca(n_images: int, batch_size: int, greedy: bool) -> dict:
    import numpy as np
    import pyarrow as pa
    import torch
    from PIL import Image

    from recap.pipeline.stage import StageContext
    from recap.stages.recaption import RecaptionConfig, RecaptionStage
    from recap.trainer.checkpoint import save_checkpoint
    from recap.trainer.generate import generate
    from recap.trainer.models import create_model

    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp()
    torch.manual_seed(0)
    model, *_ = create_model("recap-tiny-coca")
    ckpt = save_checkpoint(os.path.join(tmp, "coca.pt"), model=model, step=0, epoch=0, name="recap-tiny-coca",
                           rng_states=False)
    rng = np.random.default_rng(0)
    images = []
    for _ in range(n_images):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(buf, "JPEG")
        images.append(buf.getvalue())
    cfg = RecaptionConfig.model_validate({"k": 1, "batch_size": batch_size, "backend": {
        "kind": "coca", "model": ckpt, "greedy": greedy, "max_len": 16}})
    stage = RecaptionStage(cfg, StageContext("bench", 0, "recaption", tmp))
    stage.setup()
    stage.backend.batch_size = batch_size
    batch = pa.table({"uid": [f"{i:032x}" for i in range(n_images)], "jpg": pa.array(images, pa.binary())})

    m, pre = stage.backend.model, stage.backend.preprocess
    pixels = [pre(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]  # decoded once, outside the clock

    def direct() -> float:
        t0 = time.perf_counter()
        for s in range(0, n_images, batch_size):
            x = torch.stack(pixels[s:s + batch_size])
            if greedy:
                generate(m, x, max_len=16, min_len=5)
            else:  # the same seeded generator per image the stage makes
                gens = [torch.Generator().manual_seed(i) for i in range(s, s + len(x))]
                generate(m, x, max_len=16, min_len=5, top_p=0.9, generators=gens)
        return n_images / (time.perf_counter() - t0)

    def through_stage() -> float:
        t0 = time.perf_counter()
        out = stage.process(batch)
        took = time.perf_counter() - t0
        assert all(len(v) == 1 for v in out.column("syn_text_caption").to_pylist())
        return n_images / took

    direct(), through_stage()  # warm-up
    d = max(direct() for _ in range(2))
    s = max(through_stage() for _ in range(2))
    return {"direct_captions_per_s": d, "stage_captions_per_s": s, "ratio": s / d, "goal": 0.8}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--delay", type=float, default=0.05)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--only", choices=["http", "coca"])
    a = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other work on it slows both sides)")
    if a.only in (None, "http"):
        r = bench_http(a.requests, a.concurrency, a.delay)
        print(f"openai client: {r['concurrent_rps']:.1f} req/s at concurrency {a.concurrency} vs {r['serial_rps']:.1f} "
              f"one at a time (server delay {a.delay * 1000:.0f} ms): ratio {r['ratio']:.2f} (ideal {r['ideal']})")
        record("LLM client requests/s", r["ratio"], goal=f">= {0.8 * r['ideal']:g}", value=r["concurrent_rps"],
               baseline=r["serial_rps"], unit="requests/s", against="one request at a time, same server",
               concurrency=a.concurrency)
    if a.only in (None, "coca"):
        for greedy in (True, False):
            r = bench_coca(a.images, a.batch_size, greedy)
            print(f"coca ({'greedy' if greedy else 'top-p 0.9'}): {r['stage_captions_per_s']:.1f} captions/s through the "
                  f"recaption stage vs {r['direct_captions_per_s']:.1f} from trainer.generate directly: "
                  f"ratio {r['ratio']:.2f} (goal >= 0.8)")
            record(f"CoCa captions/s ({'greedy' if greedy else 'top-p'})", r["ratio"], goal=">= 0.8",
                   value=r["stage_captions_per_s"], baseline=r["direct_captions_per_s"], unit="captions/s",
                   against="trainer.generate directly")


if __name__ == "__main__":
    main()
