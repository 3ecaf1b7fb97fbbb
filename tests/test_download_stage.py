"""The download stage and pipeline.imaging: bad images by reason, and process() end to end over
real HTTP on 127.0.0.1."""
import hashlib
import io
import math
import re
import struct
import zlib

import pyarrow as pa
import pytest
from PIL import Image
from pydantic import ValidationError

from recap.pipeline.imaging import ImageProcessor, check_and_prepare, resizer_reason, sniff
from recap.pipeline.stage import DETAIL, DROP, NOTE, StageContext
from recap.stages.download import DownloadConfig, DownloadStage
from tests.httpd import TestServer, redirect, static

CTX = StageContext(job_name="t", seed=0, stage="download", dataset="mem://")


def _jpeg(w: int = 64, h: int = 48, exif: bytes | None = None) -> bytes:
    img = Image.radial_gradient("L").resize((w, h)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **({"exif": exif} if exif else {}))
    return buf.getvalue()


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header_only(w: int, h: int) -> bytes:
    """A few hundred bytes announcing a w x h RGB PNG: what a decompression bomb looks like up front."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    return _jpeg(80, 40, exif=exif.tobytes())


JPEG = _jpeg()
HTML = b"<!DOCTYPE html><html><head><title>Not found</title></head><body>gone</body></html>"


# -- imaging -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data,content_type,reason", [
    (JPEG[: len(JPEG) // 2], "image/jpeg", "decode_error"),            # truncated
    (JPEG[:20] + b"\0" * 400, "image/jpeg", "decode_error"),            # JPEG magic, corrupt inside
    (HTML, "image/jpeg", "not_an_image"),                              # HTML served as an image
    (HTML, "text/html; charset=utf-8", "not_an_image"),
    (b'{"error": "rate limited"}', "application/json", "not_an_image"),
    (_png_header_only(20_000, 20_000), "image/png", "decompression_bomb"),   # over Pillow's hard limit
    (_png_header_only(12_000, 12_000), "image/png", "decompression_bomb"),   # over ours, under Pillow's error
    (_png_header_only(10, 10), "image/png", "decode_error"),                 # header fine, pixels missing
], ids=["truncated", "corrupt", "html-as-jpeg", "html", "json", "bomb-pillow", "bomb-local", "png-no-pixels"])
def test_bad_images_by_reason(data, content_type, reason):
    prepared, got, detail, _ = check_and_prepare(data, content_type, 89_478_485)
    assert (prepared, got) == (None, reason), detail
    assert detail and not re.search(r"0x[0-9a-f]{6,}", detail)  # no memory addresses: details repeat run to run


def test_local_pixel_limit_not_the_global():
    assert check_and_prepare(JPEG, "image/jpeg", 64 * 48)[1] is None
    assert check_and_prepare(JPEG, "image/jpeg", 64 * 48 - 1)[1] == "decompression_bomb"
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # untouched


def test_sniff_trusts_bytes_not_headers():
    assert sniff(JPEG) == "JPEG" and sniff(HTML) is None
    assert check_and_prepare(JPEG, "text/html", 10**8)[1] is None  # an image with a wrong header is an image


def test_exif_orientation_is_applied():
    out = ImageProcessor(resize_mode="no")(_rotated_jpeg())
    assert out.ok and (out.width, out.height) == (40, 80) and (out.original_width, out.original_height) == (40, 80)
    assert out.meta["orientation"] == 6
    plain = ImageProcessor(resize_mode="no")(_jpeg(80, 40))
    assert (plain.width, plain.height) == (80, 40)


def test_upright_jpeg_goes_to_the_resizer_untouched():
    prepared, reason, _, meta = check_and_prepare(JPEG, "image/jpeg", 10**8)
    assert reason is None and prepared is JPEG and meta["orientation"] == 1
    out = ImageProcessor(resize_mode="no", skip_reencode=True)(JPEG)
    assert out.data == JPEG  # skip_reencode keeps the fetched bytes, as in img2dataset


@pytest.mark.parametrize("img,fmt", [
    (Image.new("P", (30, 20)), "GIF"), (Image.new("RGBA", (30, 20), (10, 200, 10, 128)), "PNG"),
    (Image.new("LA", (30, 20)), "PNG"), (Image.new("RGB", (30, 20)), "WEBP"), (Image.new("RGB", (30, 20)), "BMP"),
    (Image.new("RGB", (30, 20)), "TIFF"), (Image.new("I;16", (30, 20), 4000), "PNG"), (Image.new("CMYK", (30, 20)), "JPEG"),
], ids=["gif", "png-rgba", "png-la", "webp", "bmp", "tiff", "png-16bit", "jpeg-cmyk"])
def test_web_formats_and_modes_become_jpegs(img, fmt):
    out = ImageProcessor(image_size=32)(_encode(img, fmt))
    assert out.ok, out.detail
    assert out.data[:3] == b"\xff\xd8\xff" and (out.width, out.height) == (32, 32)
    assert (out.original_width, out.original_height) == (30, 20)


def test_resizer_limits_by_reason():
    assert ImageProcessor(min_image_size=100)(JPEG).reason == "image_too_small"
    assert ImageProcessor(max_aspect_ratio=1.1)(JPEG).reason == "aspect_ratio_too_large"
    assert ImageProcessor(max_image_area=100)(JPEG).reason == "image_area_too_large"
    assert resizer_reason("some cv2 failure") == "resize_error"


def test_exif_json_on_request():
    out = ImageProcessor(extract_exif=True)(_rotated_jpeg())
    assert "Image Orientation" in out.meta["exif"]


# -- config --------------------------------------------------------------------------------------------

def test_config_defaults_are_img2dataset_s():
    c = DownloadConfig()
    assert (c.image_size, c.resize_mode, c.encode_format, c.encode_quality, c.timeout, c.retries) == \
        (256, "border", "jpg", 95, 10.0, 2)
    assert (c.upscale_interpolation, c.downscale_interpolation) == ("lanczos", "area")
    assert c.max_image_area == math.inf and c.max_aspect_ratio == math.inf
    assert (c.samples_per_shard, c.max_redirects, c.max_image_pixels, c.threads, c.per_host_connections) == \
        (10_000, 5, 89_478_485, 32, 8)
    assert c.respect_opt_out and c.ssrf_guard and c.allow_hosts == [] and "recap" in c.user_agent


@pytest.mark.parametrize("bad", [
    {"timeout": -3}, {"timeout": 0}, {"retries": -1}, {"image_size": 0}, {"resize_mode": "stretch"},
    {"encode_format": "gif"}, {"encode_format": "png", "encode_quality": 50}, {"encode_quality": 101},
    {"upscale_interpolation": "magic"}, {"allow_hosts": ["bad host:x"]}, {"max_bytes": 0}, {"threads": 0},
    {"nope": 1},
])
def test_config_rejects(bad):
    with pytest.raises(ValidationError):
        DownloadConfig(**bad)


def test_image_member_follows_encode_format():
    assert DownloadStage(DownloadConfig(), CTX).image_member() == "jpg"
    assert DownloadStage(DownloadConfig(encode_format="webp"), CTX).image_member() == "webp"


# -- process() end to end ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def srv():
    with TestServer("127.0.0.1") as s:
        s.route("/a.jpg", static(JPEG))
        s.route("/b.jpg", static(_jpeg(30, 90)))
        s.route("/hop", redirect("/a.jpg"))
        s.route("/html.jpg", static(HTML))
        s.route("/trunc.jpg", static(JPEG[:300]))
        s.route("/rot.jpg", static(_rotated_jpeg()))
        s.route("/bomb.png", static(_png_header_only(20_000, 20_000), content_type="image/png"))
        yield s


def _input(srv: TestServer) -> tuple[pa.Table, list[tuple[str, str | None]]]:
    """(input table, expected (status, reason) per row)."""
    rows = [  # (url, dup_of, input_note, expected status, expected reason)
        (srv.url("/a.jpg"), None, "caption_truncated", "success", None),
        (srv.url("/missing.jpg"), None, "caption_not_utf8", "failed_to_download", "http_404"),
        (srv.url("/html.jpg"), None, None, "failed_to_resize", "not_an_image"),
        (srv.url("/a.jpg"), "u0", None, "failed_to_download", "duplicate_input"),
        (srv.url("/trunc.jpg"), None, None, "failed_to_resize", "decode_error"),
        (srv.url("/hop"), None, None, "success", None),
        (srv.url("/bomb.png"), None, None, "failed_to_resize", "decompression_bomb"),
        ("ftp://127.0.0.1/x.jpg", None, None, "failed_to_download", "unsupported_scheme"),
        ("http://127.0.0.2/x.jpg", None, None, "failed_to_download", "blocked_address"),
        (srv.url("/b.jpg"), None, None, "success", None),
        (srv.url("/rot.jpg"), None, None, "success", None),
    ]
    n = len(rows)
    table = pa.table({
        "uid": [f"u{i}" for i in range(n)],
        "key": [f"{i:09d}" for i in range(n)],
        "url": [r[0] for r in rows],
        "caption": [f"caption {i}" if i != 2 else "" for i in range(n)],
        "dup_of": pa.array([r[1] for r in rows], pa.string()),
        "input_note": pa.array([r[2] for r in rows], pa.string()),
        "license": [f"cc-by-{i}" for i in range(n)],
        "score": pa.array([i / 10 for i in range(n)], pa.float64()),
        "status": [f"user status {i}" for i in range(n)],  # a user column named like one of ours
    })
    return table, [(r[3], r[4]) for r in rows]


def _stage(srv: TestServer, **kw) -> DownloadStage:
    cfg = DownloadConfig(**{"image_size": 32, "allow_hosts": [srv.netloc], "timeout": 3.0, "retries": 0,
                            "threads": 8, **kw})
    stage = DownloadStage(cfg, CTX)
    stage.setup()
    return stage


def test_process_end_to_end(srv):
    table, expected = _input(srv)
    stage = _stage(srv)
    try:
        out = stage.process(table)
    finally:
        stage.teardown()
    assert out.column_names == ["uid", "key", "url", "caption", "status", "error_message", "width", "height",
                                "original_width", "original_height", "sha256", "jpg", "license", "score",
                                "input_status", DROP, DETAIL, NOTE]
    assert out.column("uid").equals(table.column("uid")) and out.column("key").equals(table.column("key"))
    for name in ("license", "score"):
        assert out.column(name).equals(table.column(name))
    assert out.column("input_status").equals(table.column("status"))
    for t in ("width", "height", "original_width", "original_height"):
        assert out.schema.field(t).type == pa.int32()
    rows = out.to_pylist()
    assert [(r["status"], r[DROP]) for r in rows] == expected
    for r in rows:
        if r["status"] == "success":
            assert r["error_message"] is None and r[DETAIL] is None
            assert hashlib.sha256(r["jpg"]).hexdigest() == r["sha256"]
            assert Image.open(io.BytesIO(r["jpg"])).size == (32, 32) == (r["width"], r["height"])
        else:
            assert r["jpg"] is None and r["sha256"] is None and r["width"] is None
            assert r["error_message"].startswith(r[DROP])
    assert rows[3][DETAIL] == "u0"  # the duplicate names the first
    assert srv.hits["/a.jpg"] == 2  # row 0 and the redirect; never the duplicate row
    assert rows[1][DETAIL] == "HTTP 404 Not Found"
    assert (rows[9]["original_width"], rows[9]["original_height"]) == (30, 90)
    assert (rows[10]["original_width"], rows[10]["original_height"]) == (40, 80)  # EXIF-rotated
    assert [r[NOTE] for r in rows] == ["caption_truncated"] + [None] * 10  # notes only on kept rows

    stats = stage.shard_stats(out, 1.5)
    assert stats == {"count": 11, "successes": 4, "failed_to_download": 4, "failed_to_resize": 3, "duration": 1.5,
                     "status_dict": {"blocked_address": 1, "decode_error": 1, "decompression_bomb": 1,
                                     "duplicate_input": 1, "http_404": 1, "not_an_image": 1, "success": 4,
                                     "unsupported_scheme": 1}}


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def test_two_runs_give_identical_bytes(srv):
    table, _ = _input(srv)
    outs = []
    for threads in (8, 3):  # the thread count changes the timing, never the output
        stage = _stage(srv, threads=threads)
        try:
            outs.append(_ipc(stage.process(table)))
        finally:
            stage.teardown()
    assert outs[0] == outs[1]


def test_png_encoding_and_process_without_setup(srv):
    stage = DownloadStage(DownloadConfig(image_size=16, encode_format="png", encode_quality=3,
                                         allow_hosts=[srv.netloc]), CTX)
    table = pa.table({"uid": ["x"], "key": ["0"], "url": [srv.url("/a.jpg")], "caption": ["c"],
                      "dup_of": pa.array([None], pa.string()), "input_note": pa.array([None], pa.string())})
    out = stage.process(table)  # setup() on first use when the caller skipped it
    stage.teardown()
    assert out.column("status").to_pylist() == ["success"] and stage.image_member() == "png"
    assert out.column("jpg")[0].as_py()[:8] == b"\x89PNG\r\n\x1a\n"


def test_all_duplicates_and_empty_batches(srv):
    stage = _stage(srv)
    empty = pa.table({"uid": pa.array([], pa.string()), "key": pa.array([], pa.string()),
                      "url": pa.array([], pa.string()), "caption": pa.array([], pa.string()),
                      "dup_of": pa.array([], pa.string()), "input_note": pa.array([], pa.string())})
    assert stage.process(empty).num_rows == 0
    dups = pa.table({"uid": ["b"], "key": ["1"], "url": [srv.url("/a.jpg")], "caption": ["c"],
                     "dup_of": ["a"], "input_note": pa.array([None], pa.string())})
    assert stage.process(dups).column(DROP).to_pylist() == ["duplicate_input"]
    stage.teardown()


def test_16_bit_rgb_png_is_brought_to_8_bits():
    import cv2
    import numpy as np

    arr = np.full((20, 30, 3), 40_000, np.uint16)
    data = cv2.imencode(".png", arr)[1].tobytes()
    out = ImageProcessor(image_size=32)(data)
    assert out.ok, out.detail
    assert out.data[:3] == b"\xff\xd8\xff" and (out.original_width, out.original_height) == (30, 20)
