"""Images decoded with TF ops equal PIL's pixels; only the files TF cannot match go through PIL.

The reference is ``image_io.decode_rgb`` (PIL), the decoder every COCO-json file used before:
``tf_decode.decode_rgb_tf`` must give its exact pixels on each format and colour mode that
``image_io.tf_decodable`` accepts, and the files it turns away must really differ or fail in TF.
A COCO-json pipeline gives the same batches (pixels, boxes, counts) with the TF route as with
every file forced through PIL, calls Python only for the PIL-routed files, and two pipelines give
identical augmented batches.
"""

import io
import json
import struct

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from effdet_jax.data import report
from effdet_jax.data.image_io import decode_rgb, tf_decodable
from effdet_jax.data.pipeline import make_eval_pipeline, make_train_pipeline
from effdet_jax.data.sources import coco_json
from effdet_jax.data.tf_decode import decode_rgb_tf
from effdet_jax.models.model_config import IMAGENET_NORMALIZATION as IMAGENET

from .helpers import take, tiny_shapes_config

H, W = 29, 43


def _rgb(seed: int = 0) -> Image.Image:
    """A smooth random RGB image (upsampled noise: JPEG blocks with real AC content)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (7, 11, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((W, H), Image.BILINEAR)


def _enc(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


def _animated_gif() -> bytes:
    frames = [_rgb(s).convert("P") for s in range(3)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:])
    return out.getvalue()


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": ignored, the stored grid is used
    return _enc(_rgb(), "JPEG", quality=90, exif=exif)


# Files TF ops decode: name -> bytes.
TF_FILES = {
    "baseline.jpg": lambda: _enc(_rgb(), "JPEG", quality=90),
    "q95_444.jpg": lambda: _enc(_rgb(), "JPEG", quality=95, subsampling=0),
    "progressive.jpg": lambda: _enc(_rgb(), "JPEG", quality=85, progressive=True),
    "gray.jpg": lambda: _enc(_rgb().convert("L"), "JPEG"),
    "exif_rotated.jpg": _exif_rotated_jpeg,
    "rgb.png": lambda: _enc(_rgb(), "PNG"),
    "rgba.png": lambda: _enc(_rgb().convert("RGBA"), "PNG"),
    "gray.png": lambda: _enc(_rgb().convert("L"), "PNG"),
    "gray_alpha.png": lambda: _enc(_rgb().convert("LA"), "PNG"),
    "palette.png": lambda: _enc(_rgb().convert("P"), "PNG"),
    "palette_transparent.png": lambda: _enc(_rgb().convert("P"), "PNG", transparency=3),
    "bilevel.png": lambda: _enc(_rgb().convert("1"), "PNG"),
    "palette.gif": lambda: _enc(_rgb().convert("P"), "GIF"),
    "animated.gif": _animated_gif,
    "rgb.bmp": lambda: _enc(_rgb(), "BMP"),
    "lossy.webp": lambda: _enc(_rgb(), "WEBP", quality=80),
}


def _png16(values: np.ndarray) -> bytes:
    return _enc(Image.fromarray(values.astype(np.uint16)), "PNG")


def _corrupt_png() -> bytes:
    data = bytearray(_enc(_rgb(), "PNG"))
    data[len(data) // 2] ^= 0x5A  # inside IDAT: the CRC no longer matches
    return bytes(data)


# Files left to PIL: name -> bytes.
PIL_FILES = {
    "cmyk.jpg": lambda: _enc(_rgb().convert("CMYK"), "JPEG"),
    "truncated.jpg": lambda: _enc(_rgb(), "JPEG")[:-40],
    "png16_small_values.png": lambda: _png16(np.arange(H * W).reshape(H, W) % 200),
    "png16.png": lambda: _png16(np.arange(H * W).reshape(H, W) * 50),
    "no_iend.png": lambda: _enc(_rgb(), "PNG")[:-12],
    "bad_crc.png": _corrupt_png,
    "palette.bmp": lambda: _enc(_rgb().convert("P"), "BMP"),
    "rgb.tiff": lambda: _enc(_rgb(), "TIFF"),
    "no_trailer.gif": lambda: _enc(_rgb().convert("P"), "GIF")[:-1],
}


def _write(tmp_path, files: dict) -> dict[str, str]:
    paths = {}
    for name, make in files.items():
        path = tmp_path / name
        path.write_bytes(make())
        paths[name] = str(path)
    return paths


def _route(path: str) -> bool:
    with Image.open(path) as im:
        fmt, mode = im.format, im.mode
    return tf_decodable(path, fmt, mode)


@pytest.mark.parametrize("name", sorted(TF_FILES))
def test_tf_decoding_equals_pil_pixel_for_pixel(tmp_path, name):
    path = _write(tmp_path, {name: TF_FILES[name]})[name]
    assert _route(path), name
    data = open(path, "rb").read()
    expected, _ = decode_rgb(data, name)
    got = decode_rgb_tf(tf.constant(data)).numpy()
    assert got.shape == expected.shape == (H, W, 3)  # EXIF orientation ignored by both
    np.testing.assert_array_equal(got, expected)


def test_jpeg_uses_the_accurate_idct_tf_default_differs(tmp_path):
    """TF's default (fast) IDCT is not PIL's; the accurate one is (asserted above)."""
    data = TF_FILES["q95_444.jpg"]()
    pil, _ = decode_rgb(data)
    fast = tf.io.decode_image(data, channels=3).numpy().astype(int)
    assert 0 < np.abs(fast - pil).max() <= 16


def test_files_tf_cannot_match_go_through_pil(tmp_path):
    paths = _write(tmp_path, PIL_FILES)
    for name, path in paths.items():
        assert not _route(path), name
    # Why: TF keeps the top byte of a 16-bit PNG, PIL's decode_rgb keeps values < 256 as they
    # are; TF ignores a BMP palette; TF raises on a truncated JPEG and on a PNG without IEND.
    data = open(paths["png16_small_values.png"], "rb").read()
    assert not np.array_equal(decode_rgb_tf(tf.constant(data)).numpy(), decode_rgb(data)[0])
    data = open(paths["palette.bmp"], "rb").read()
    assert not np.array_equal(decode_rgb_tf(tf.constant(data)).numpy(), decode_rgb(data)[0])
    for name in ("truncated.jpg", "no_iend.png"):
        with pytest.raises(tf.errors.InvalidArgumentError):
            decode_rgb_tf(tf.constant(open(paths[name], "rb").read()))
    # A file that is not there or not an image is PIL's too (it reports it unreadable).
    assert not tf_decodable(str(tmp_path / "missing.jpg"), "JPEG", "RGB")
    bmp = bytearray(_enc(_rgb(), "BMP"))
    struct.pack_into("<I", bmp, 2, len(bmp) + 10)  # header size disagrees with the file
    (tmp_path / "short.bmp").write_bytes(bytes(bmp))
    assert not _route(str(tmp_path / "short.bmp"))


def _coco_folder(tmp_path) -> tuple[str, str, int]:
    """Every TF and PIL test file plus an unreadable one in a COCO json with one box each;
    returns (json, image folder, number of PIL-routed files)."""
    d = tmp_path / "images"
    d.mkdir()
    files = {**TF_FILES, **PIL_FILES, "broken.jpg": lambda: b"\xff\xd8 not a jpeg"}
    _write(d, files)
    images, anns = [], []
    for i, name in enumerate(sorted(files)):
        images.append({"id": i + 1, "file_name": name, "height": H, "width": W})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 2, "iscrowd": 0,
                     "bbox": [3 + i % 5, 2, 20, 15], "area": 300})
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return str(path), str(d), len(PIL_FILES) + 1


def _config(ann: str, img: str, **kw):
    c = tiny_shapes_config(source="coco_json", **kw)
    c.train_annotations = c.eval_annotations = ann
    c.train_images = c.eval_images = img
    return c


@pytest.fixture
def pil_calls(monkeypatch):
    """Counts the files the pipeline decodes with PIL."""
    calls = []
    real = coco_json.read_rgb

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(coco_json, "read_rgb", counting)
    return calls


def _force_pil(monkeypatch):
    monkeypatch.setattr(report, "tf_decodable", lambda *_: False)
    monkeypatch.setattr(report, "_HEADER_CACHE", {})


KEYS = ("images", "boxes", "classes", "image_id", "image_scale", "image_hw")


def test_eval_batches_equal_with_tf_and_with_pil_decoding(tmp_path, monkeypatch, pil_calls):
    ann, img, num_pil = _coco_folder(tmp_path)
    n = len(TF_FILES) + num_pil
    c = _config(ann, img)
    tf_route = list(make_eval_pipeline(c, 48, n, normalization=IMAGENET))
    assert len(pil_calls) == num_pil  # Python runs only for the PIL-routed files
    # The data report lists the PIL-routed files whose header opens (broken.jpg's does not).
    r = report.scan_coco_split("eval", ann, img, "contiguous", 100, True)
    assert r.decoded_with_pil["count"] == len(PIL_FILES)
    assert "decoded with PIL (not by TF ops): 9 files" in r.table()
    _force_pil(monkeypatch)
    pil_route = list(make_eval_pipeline(c, 48, n, normalization=IMAGENET))
    assert len(pil_calls) == num_pil + n
    (a,), (b,) = tf_route, pil_route
    for k in KEYS:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert a["counts"] == b["counts"]
    # broken.jpg and truncated.jpg are unreadable; converted: gray/LA/P/1-bit PNG, gray JPEG,
    # GIFs, CMYK JPEG, 16-bit PNGs, palette BMP (PIL modes other than RGB).
    assert a["counts"]["images_unreadable"] == 2
    assert a["counts"]["images_converted"] == 14
    assert (a["image_id"] == -1).sum() == 2


def test_train_batches_equal_with_tf_and_with_pil_decoding(tmp_path, monkeypatch):
    ann, img, _ = _coco_folder(tmp_path)
    c = _config(ann, img, autoaugment_policy="v0")
    tf_route = take(make_train_pipeline(c, 48, 4, normalization=IMAGENET), 3)
    _force_pil(monkeypatch)
    pil_route = take(make_train_pipeline(c, 48, 4, normalization=IMAGENET), 3)
    for a, b in zip(tf_route, pil_route, strict=True):
        for k in KEYS[:-1]:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert a["counts"] == b["counts"]


def test_two_pipelines_give_identical_batches_and_resume(tmp_path):
    """Same examples, same order, same augmentation per example (jitter, flip, AutoAugment v0),
    over an epoch boundary, and from a resumed step."""
    ann, img, num_pil = _coco_folder(tmp_path)
    n = len(TF_FILES) + num_pil
    c = _config(ann, img, autoaugment_policy="v0", jitter_min=0.5, jitter_max=1.5)
    steps = (n + 3) // 4 + 1
    first = take(make_train_pipeline(c, 48, 4, normalization=IMAGENET), steps)
    again = take(make_train_pipeline(c, 48, 4, normalization=IMAGENET), steps)
    resumed = take(make_train_pipeline(c, 48, 4, normalization=IMAGENET, start_step=2), 2)
    for a, b in zip(first, again, strict=True):
        for k in KEYS[:-1]:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert a["counts"] == b["counts"]
    for a, b in zip(first[2:4], resumed, strict=True):
        for k in KEYS[:-1]:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ids = np.concatenate([b["image_id"] for b in first])[:n]
    assert sorted(ids) == list(range(1, n + 1))  # one epoch: every file once


def _bad_huffman_jpeg() -> bytes:
    """A JPEG whose header opens and which ends with EOI, but whose Huffman table is broken:
    routed to TF, which fails on it (as does PIL)."""
    data = bytearray(_enc(_rgb(), "JPEG"))
    i = data.index(b"\xff\xc4")
    data[i + 5:i + 21] = b"\xff" * 16
    return bytes(data)


def test_files_tf_ops_fail_on_are_counted_not_fatal(tmp_path, caplog, pil_calls):
    """A file TF ops fail on after the scan passed it (corrupt data, or deleted since) goes to
    PIL, which reports it unreadable as before; with on_bad_data="error" it stops the pipeline
    naming the file."""
    d = tmp_path / "images"
    d.mkdir()
    files = {"good.jpg": TF_FILES["baseline.jpg"], "bad_huffman.jpg": _bad_huffman_jpeg,
             "deleted.jpg": TF_FILES["baseline.jpg"]}
    _write(d, files)
    images = [{"id": i + 1, "file_name": f, "height": H, "width": W} for i, f in enumerate(files)]
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 2, 20, 15]}
            for i in range(len(files))]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "a"}]}))
    c = _config(str(path), str(d))
    assert _route(str(d / "bad_huffman.jpg"))
    pipeline = make_eval_pipeline(c, 48, 3, normalization=IMAGENET)
    (d / "deleted.jpg").unlink()
    (batch,) = list(pipeline)
    assert batch["counts"]["images_unreadable"] == 2
    np.testing.assert_array_equal(batch["image_id"], [1, -1, -1])
    assert sorted(p.rsplit("/", 1)[1] for p in pil_calls) == ["bad_huffman.jpg", "deleted.jpg"]
    assert "bad_huffman.jpg" in caplog.text and "deleted.jpg" in caplog.text
    c.on_bad_data = "error"
    with pytest.raises(Exception, match=r"cannot decode image .*bad_huffman\.jpg"):
        list(make_eval_pipeline(c, 48, 3, normalization=IMAGENET))
