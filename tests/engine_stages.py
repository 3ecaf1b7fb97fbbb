"""Small stages that exercise the engine without a network (the real ones are tested elsewhere)."""
import hashlib

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute

from recap.pipeline import rng
from recap.pipeline.inputs import UrlListSource
from recap.pipeline.stage import GlobalStage, MapStage, StageConfig
from recap.pipeline.verdicts import DETAIL, DROP, NOTE, verdicts


class FakeSourceConfig(StageConfig):
    samples_per_shard: int = 4
    allow_hosts: list[str] = []
    timeout: float = 1.0


class FakeSource(UrlListSource):
    """'Downloads' by hashing the URL; URLs containing 'fail' fail with http_404."""
    name = "download"
    Config = FakeSourceConfig

    @classmethod
    def kept(cls, index):
        return pa.compute.equal(index.column("status"), "success")

    def process(self, batch):
        rows = batch.to_pylist()
        out = []
        for r in rows:
            bad = "fail" in r["url"] or r["dup_of"] is not None
            img = None if bad else hashlib.sha256(r["url"].encode()).digest()
            out.append({"uid": r["uid"], "key": r["key"], "url": r["url"], "caption": r["caption"],
                        "status": "failed_to_download" if bad else "success",
                        "sha256": None if bad else hashlib.sha256(img).hexdigest(), "jpg": img,
                        "original_width": 10, "original_height": 10,
                        DROP: ("duplicate_input" if r["dup_of"] else "http_404") if bad else None,
                        DETAIL: "404 Not Found" if bad else None, NOTE: r["input_note"]})
        return pa.Table.from_pylist(out, schema=pa.schema([
            ("uid", pa.string()), ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()),
            ("status", pa.string()), ("sha256", pa.string()), ("jpg", pa.binary()),
            ("original_width", pa.int32()), ("original_height", pa.int32()),
            (DROP, pa.string()), (DETAIL, pa.string()), (NOTE, pa.string())]))

    def shard_stats(self, out, duration):
        return {"count": out.num_rows, "duration": duration}


class UpperConfig(StageConfig):
    suffix: str = "!"


class Upper(MapStage):
    name = "upper"
    Config = UpperConfig

    def reads(self):
        return ("caption",)

    def writes(self):
        return ("caption_upper",)

    def process(self, batch):
        caps = batch.column("caption").to_pylist()
        return verdicts(batch.column("uid"), {"caption_upper": [c.upper() + self.config.suffix for c in caps]},
                        drop=[("caption_says_drop" if "drop" in c else None) for c in caps])


class CoinConfig(StageConfig):
    p: float = 0.5


class Coin(MapStage):
    """Keeps each sample with probability p, drawn from (seed, stage, uid)."""
    name = "coin"
    Config = CoinConfig
    default_batch_size = 3
    stateful = True

    def reads(self):
        return ("caption_upper", "jpg")

    def writes(self):
        return ("u", "nbytes")

    def setup(self):
        self.calls = 0

    def process(self, batch):
        u = rng.uniform(self.ctx.seed, self.ctx.stage, batch.column("uid").to_pylist())
        return verdicts(batch.column("uid"), {"u": u, "nbytes": [len(b) for b in batch.column("jpg").to_pylist()]},
                        drop=[None if x < self.config.p else "coin_flip" for x in u])


class FirstWordRare(GlobalStage):
    """Global: drops samples whose caption's first word appears fewer than 2 times overall."""
    name = "firstword"
    default_batch_size = 1024

    def reads(self):
        return ("caption",)

    def writes(self):
        return ("first_word_count",)

    def partial(self, batch):
        out = {}
        for c in batch.column("caption").to_pylist():
            w = (c.split() or [""])[0]
            out[w] = out.get(w, 0) + 1
        return out

    def reduce(self, partials):
        total = {}
        for p in partials:
            for w, n in p.items():
                total[w] = total.get(w, 0) + n
        return total

    def apply(self, batch, state):
        ws = [(c.split() or [""])[0] for c in batch.column("caption").to_pylist()]
        n = [state.get(w, 0) for w in ws]
        return verdicts(batch.column("uid"), {"first_word_count": pa.array(n, pa.int64())},
                        drop=[None if k >= 2 else "rare_first_word" for k in n])


class Boom(MapStage):
    name = "boom"

    def process(self, batch):
        raise ValueError("kaboom")


class LangTag(MapStage):
    """Writes `lang` from a `xx:` caption prefix (English when there is none)."""
    name = "langtag"

    def reads(self):
        return ("caption",)

    def writes(self):
        return ("lang",)

    def process(self, batch):
        caps = batch.column("caption").to_pylist()
        return verdicts(batch.column("uid"), {"lang": [c[:2] if len(c) > 2 and c[2] == ":" else "en" for c in caps]})


ALL = [FakeSource, Upper, Coin, FirstWordRare, Boom, LangTag]
