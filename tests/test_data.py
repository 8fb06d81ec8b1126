"""Readers (VOC, generic, local and S3), defensive decoding, the synthetic generator and the training dataset."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.config import DataConfig
from wsss.data import BadItem, DatasetError, open_dataset
from wsss.data import io as dio
from wsss.data.base import labels_from_mask
from wsss.data.io import decode_image, decode_mask, encode_label_png, validate_id, voc_palette
from wsss.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainDataset, normalize

# ---- helpers ---------------------------------------------------------------------------------------------------


def _jpeg(arr: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _rand_image(rng, h=24, w=32) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _mask(h, w, cls, box=(4, 4, 12, 12)) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    y0, x0, y1, x1 = box
    m[y0:y1, x0:x1] = cls
    m[y0, x0:x1] = 255
    return m


def make_voc(root: Path, items: dict, splits: dict, cls_labels: dict | None = None,
             classes: list[str] | None = None) -> Path:
    """items: id -> (image bytes or None, mask array/bytes or None)."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for i, (img, mask) in items.items():
        if img is not None:
            (root / "JPEGImages" / f"{i}.jpg").write_bytes(img)
        if mask is not None:
            data = mask if isinstance(mask, bytes) else encode_label_png(mask)
            (root / "SegmentationClass" / f"{i}.png").write_bytes(data)
    for name, ids in splits.items():
        (root / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    if cls_labels is not None:
        np.save(root / "cls_labels.npy", cls_labels, allow_pickle=True)
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


@pytest.fixture()
def tiny_voc(tmp_path):
    """4 classes (bg + a, b, c); ids: good1 (a), good2 (b + c), aug-only mask id, no-mask id with cls label."""
    rng = np.random.default_rng(0)
    m2 = _mask(24, 32, 2)
    m2[14:20, 20:28] = 3
    items = {
        "good1": (_jpeg(_rand_image(rng)), _mask(24, 32, 1)),
        "good2": (_jpeg(_rand_image(rng)), m2),
        "augonly": (_jpeg(_rand_image(rng)), None),
        "nomask": (_jpeg(_rand_image(rng)), None),
    }
    root = make_voc(tmp_path / "voc", items, {"train": ["good1", "good2", "augonly", "nomask"], "val": ["good1"]},
                    classes=["background", "a", "b", "c"],
                    cls_labels={"nomask": np.array([0, 0, 1], np.float32),
                                "good1": np.array([1, 0, 0], np.float32)})
    (root / "SegmentationClassAug").mkdir()
    (root / "SegmentationClassAug" / "augonly.png").write_bytes(encode_label_png(_mask(24, 32, 3)))
    # an Aug mask for good1 with another class: the original SegmentationClass mask must win
    (root / "SegmentationClassAug" / "good1.png").write_bytes(encode_label_png(_mask(24, 32, 2)))
    return root


# ---- id validation -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["", " ", ".", "..", "../x", "a/b", "/etc/passwd", "a\\b", "x\x00y", "C:evil",
                                 " lead", "a\nb"])
def test_validate_id_rejects_unsafe(bad):
    with pytest.raises(BadItem) as e:
        validate_id(bad)
    assert "id" in str(e.value) and "\n" not in str(e.value)


def test_validate_id_accepts_plain():
    assert validate_id("2007_000123") == "2007_000123"
    assert validate_id("img.v2-01") == "img.v2-01"


# ---- image decoding ------------------------------------------------------------------------------------------------

def test_decode_corrupt_truncated_empty():
    rng = np.random.default_rng(1)
    good = _jpeg(_rand_image(rng, 64, 64))
    assert decode_image(good, "ok.jpg").shape == (64, 64, 3)
    with pytest.raises(BadItem, match="corrupt.jpg"):
        decode_image(b"\x00garbage" * 20, "corrupt.jpg")
    with pytest.raises(BadItem, match="trunc.jpg"):
        decode_image(good[: len(good) // 2], "trunc.jpg")
    png = _png(Image.fromarray(_rand_image(rng, 64, 64)))
    with pytest.raises(BadItem, match="trunc.png"):
        decode_image(png[: len(png) // 2], "trunc.png")
    with pytest.raises(BadItem, match="empty.jpg: empty"):
        decode_image(b"", "empty.jpg")


def test_decode_size_guard(monkeypatch):
    monkeypatch.setattr(dio, "MAX_IMAGE_PIXELS", 50 * 50)
    data = _png(Image.new("RGB", (60, 60)))
    with pytest.raises(BadItem, match="big.png: image is 60x60"):
        decode_image(data, "big.png")


def test_decode_converts_modes_to_rgb():
    gray = np.full((5, 7), 100, np.uint8)
    out = decode_image(_png(Image.fromarray(gray)), "g.png")
    assert out.shape == (5, 7, 3) and (out == 100).all()

    pal = Image.frombytes("P", (3, 2), bytes([0, 1, 15, 15, 1, 0]))
    pal.putpalette(voc_palette())
    out = decode_image(_png(pal), "p.png")
    assert tuple(out[0, 2]) == (192, 128, 128) and tuple(out[0, 1]) == (128, 0, 0)

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[..., 3] = 128
    out = decode_image(_png(Image.fromarray(rgba)), "a.png")
    assert out.shape == (4, 4, 3) and tuple(out[1, 1]) == (10, 20, 30)

    g16 = Image.fromarray(np.full((3, 3), 65535, np.uint16))
    out = decode_image(_png(g16), "g16.png")
    assert out.dtype == np.uint8 and (out == 255).all()

    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG")
    out = decode_image(buf.getvalue(), "cmyk.jpg")
    assert out.shape == (8, 8, 3) and out.min() > 240


def test_png_bytes_in_jpg_file_are_read(tmp_path):
    img = np.zeros((10, 12, 3), np.uint8)
    img[..., 1] = 200
    root = make_voc(tmp_path / "v", {"x": (_png(Image.fromarray(img).convert("L")), _mask(10, 12, 1, (1, 1, 5, 5)))},
                    {"train": ["x"]})
    ds = open_dataset(root, "train")
    out = ds.load_image("x")
    assert out.shape == (10, 12, 3) and np.ptp(out) == 0  # gray PNG inside a .jpg -> RGB


# ---- mask decoding -------------------------------------------------------------------------------------------------

def test_decode_mask_checks():
    m = _mask(10, 12, 3, (1, 1, 6, 6))
    data = encode_label_png(m)
    np.testing.assert_array_equal(decode_mask(data, "m.png", expected_hw=(10, 12), num_classes=4), m)
    with pytest.raises(BadItem, match=r"m.png: mask is 12x10 \(WxH\) but its image is 11x10"):
        decode_mask(data, "m.png", expected_hw=(10, 11))
    with pytest.raises(BadItem, match="m.png: mask has class index 3"):
        decode_mask(data, "m.png", num_classes=3)
    # 255 never counts as a class
    assert decode_mask(encode_label_png(np.full((2, 2), 255, np.uint8)), "i.png", num_classes=2).max() == 255
    # RGB-coded masks are mapped back through the VOC palette; unknown colours are refused
    rgb = Image.open(io.BytesIO(data)).convert("RGB")
    np.testing.assert_array_equal(decode_mask(_png(rgb), "rgb.png"), m)
    odd = np.zeros((2, 2, 3), np.uint8)
    odd[0, 0] = (1, 2, 3)
    with pytest.raises(BadItem, match=r"odd.png: RGB mask colour \(1, 2, 3\)"):
        decode_mask(_png(Image.fromarray(odd)), "odd.png")


def test_encode_label_png_roundtrip_and_palette():
    lab = np.arange(256, dtype=np.uint8).reshape(16, 16)
    img = Image.open(io.BytesIO(encode_label_png(lab)))
    assert img.mode == "P"
    np.testing.assert_array_equal(np.asarray(img), lab)
    pal = voc_palette()
    assert len(pal) == 768 and pal[3:6] == [128, 0, 0] and pal[-3:] == [224, 224, 192]


# ---- VOC reader on a tiny layout made here ---------------------------------------------------------------------------

def test_voc_reader_tiny(tiny_voc):
    ds = open_dataset(tiny_voc, "train")
    assert ds.layout == "voc" and ds.split == "train"
    assert ds.class_names == ["background", "a", "b", "c"] and ds.num_classes == 4
    assert ds.ids == ["good1", "good2", "augonly", "nomask"] and len(ds) == 4 and ds.has_masks
    assert ds.load_image("good1").shape == (24, 32, 3)
    # labels: cls_labels.npy first, else from the mask
    np.testing.assert_array_equal(ds.labels("good1"), [1, 0, 0])
    np.testing.assert_array_equal(ds.labels("good2"), [0, 1, 1])
    np.testing.assert_array_equal(ds.labels("nomask"), [0, 0, 1])
    # SegmentationClass wins over SegmentationClassAug; Aug fills ids the original set lacks
    assert set(np.unique(ds.load_mask("good1"))) == {0, 1, 255}
    assert set(np.unique(ds.load_mask("augonly"))) == {0, 3, 255}
    np.testing.assert_array_equal(ds.labels("augonly"), [0, 0, 1])
    assert ds.load_mask("nomask") is None and ds.mask_bytes("nomask") is None
    item = ds.load_item("good2")
    assert item["image"].shape[:2] == item["mask"].shape
    assert ds.class_list(item["labels"]) == ["b", "c"]
    assert open_dataset(tiny_voc, "val").ids == ["good1"]
    assert open_dataset(tiny_voc).ids == ["good1", "good2", "augonly", "nomask"]  # union of split files


def test_voc_default_class_names_and_errors(tmp_path):
    rng = np.random.default_rng(2)
    root = make_voc(tmp_path / "v", {"a": (_jpeg(_rand_image(rng)), _mask(24, 32, 15))}, {"val": ["a"]})
    ds = open_dataset(root, "val", layout="voc")
    assert ds.num_classes == 21 and ds.class_names[15] == "person"
    np.testing.assert_array_equal(np.flatnonzero(ds.labels("a")), [14])
    with pytest.raises(DatasetError, match="train.txt"):
        open_dataset(root, "train")
    with pytest.raises(DatasetError, match="not found"):
        open_dataset(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="unknown dataset layout"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "x.txt").write_text("x")
        open_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="split name"):
        open_dataset(root, "../val")


def test_voc_bad_items_name_file_or_id(tmp_path):
    rng = np.random.default_rng(3)
    good = _jpeg(_rand_image(rng))
    items = {
        "ok": (good, _mask(24, 32, 1)),
        "corrupt": (b"not an image at all", None),
        "trunc": (good[: len(good) // 3], None),
        "empty": (b"", None),
        "wrongsize": (good, _mask(20, 32, 1)),
        "nofile": (None, None),
        "outofrange": (good, _mask(24, 32, 7)),
        "bgonly": (good, np.zeros((24, 32), np.uint8)),
        "zerolabel": (good, None),
    }
    root = make_voc(tmp_path / "v", items, {"train": list(items) + ["../x", "a/b", "/abs"]},
                    cls_labels={"zerolabel": np.zeros(3, np.float32), "corrupt": np.array([1, 0, 0], np.float32),
                                "trunc": np.array([1, 0, 0], np.float32), "empty": np.array([1, 0, 0], np.float32),
                                "short": np.array([1, 0], np.float32)},
                    classes=["background", "a", "b", "c"])
    ds = open_dataset(root, "train")
    # unsafe ids never reach .ids; they are recorded with a reason naming the split file
    assert "../x" not in ds.ids and "a/b" not in ds.ids and "/abs" not in ds.ids
    assert [i for i, _ in ds.rejects] == ["../x", "a/b", "/abs"]
    assert all("train.txt" in r for _, r in ds.rejects)
    with pytest.raises(BadItem, match=r"\.\./x"):
        ds.load_image("../x")
    with pytest.raises(BadItem, match="/etc/passwd"):
        ds.labels("/etc/passwd")
    with pytest.raises(BadItem, match="corrupt.jpg"):
        ds.load_image("corrupt")
    with pytest.raises(BadItem, match="trunc.jpg"):
        ds.load_image("trunc")
    with pytest.raises(BadItem, match="empty.jpg: empty file"):
        ds.load_image("empty")
    with pytest.raises(BadItem, match="wrongsize.png: mask is 32x20"):
        ds.load_mask("wrongsize")
    with pytest.raises(BadItem, match="id nofile: image file missing: .*nofile.jpg"):
        ds.load_image("nofile")
    with pytest.raises(BadItem, match="id nofile: no image-level labels"):
        ds.labels("nofile")
    with pytest.raises(BadItem, match="outofrange.png: mask has class index 7"):
        ds.load_mask("outofrange")
    with pytest.raises(BadItem, match="outofrange.png"):
        ds.labels("outofrange")
    with pytest.raises(BadItem, match="id bgonly: empty label vector"):
        ds.labels("bgonly")
    with pytest.raises(BadItem, match="id zerolabel: empty label vector"):
        ds.labels("zerolabel")
    with pytest.raises(BadItem, match="id short: label vector has 2 entries"):
        ds.labels("short")
    assert ds.labels("ok").tolist() == [1, 0, 0]


def test_cls_labels_pickle_is_restricted(tmp_path):
    rng = np.random.default_rng(4)
    root = make_voc(tmp_path / "v", {"a": (_jpeg(_rand_image(rng)), _mask(24, 32, 1))}, {"train": ["a"]},
                    classes=["background", "a"])

    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    np.save(root / "cls_labels.npy", np.array({"a": Evil()}, dtype=object), allow_pickle=True)
    ds = open_dataset(root, "train")
    with pytest.raises(DatasetError, match="cls_labels.npy"):
        ds.labels("a")
    assert not (tmp_path / "pwned").exists()


# ---- the real VOC sample ------------------------------------------------------------------------------------------

def test_voc_sample_real(voc_sample):
    ds = open_dataset(voc_sample, "val")
    assert len(ds) == 13 and ds.num_classes == 21 and ds.has_masks and not ds.rejects
    for i in ds.ids:
        item = ds.load_item(i)
        assert item["image"].dtype == np.uint8 and item["image"].ndim == 3
        assert item["mask"].shape == item["image"].shape[:2]
        np.testing.assert_array_equal(item["labels"], labels_from_mask(item["mask"], 21))
    assert ds.class_list(ds.labels("2007_000762")) == ["bottle", "diningtable", "person"]


def test_voc_sample_on_s3_matches_local(voc_sample, s3_server):
    uri = s3_server.unique_uri("voc")
    bucket, prefix = uri[len("s3://"):].split("/", 1)
    client = s3_server.client()
    for p in sorted(voc_sample.rglob("*")):
        if p.is_file():
            key = f"{prefix}/{p.relative_to(voc_sample).as_posix()}"
            client.put_object(Bucket=bucket, Key=key, Body=p.read_bytes())
    remote = open_dataset(uri, "val")
    local = open_dataset(voc_sample, "val")
    assert remote.ids == local.ids and remote.class_names == local.class_names and remote.has_masks
    for i in remote.ids[:3]:
        np.testing.assert_array_equal(remote.load_image(i), local.load_image(i))
        np.testing.assert_array_equal(remote.load_mask(i), local.load_mask(i))
        np.testing.assert_array_equal(remote.labels(i), local.labels(i))
    with pytest.raises(BadItem, match="id missing1: image file missing: s3://"):
        remote.load_image("missing1")


# ---- generic layout ----------------------------------------------------------------------------------------------

def make_generic(root: Path, with_classes=True, with_splits=True) -> Path:
    rng = np.random.default_rng(5)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(_rand_image(rng, 16, 16)).save(root / "images" / "t1.png")
    (root / "images" / "t2.jpg").write_bytes(_jpeg(_rand_image(rng, 16, 16)))
    Image.fromarray(_rand_image(rng, 16, 16)).convert("RGBA").save(root / "images" / "t3.png")
    Image.fromarray(_rand_image(rng, 16, 16)).save(root / "images" / "t4.png")
    Image.fromarray(_rand_image(rng, 16, 16)).save(root / "images" / "t6.png")
    (root / "images" / "notes.txt").write_text("ignored")
    (root / "masks" / "t1.png").write_bytes(encode_label_png(_mask(16, 16, 1, (2, 2, 8, 8))))
    (root / "masks" / "t6.png").write_bytes(encode_label_png(_mask(16, 16, 3, (2, 2, 8, 8))))
    (root / "labels.csv").write_text("id,classes\nt1,TE\nt2,NEC;LYM\nt3,LYM TAS\nt4,\nt5,TE\nt7,BOGUS\n../up,TE\n")
    if with_classes:
        (root / "classes.txt").write_text("background\nTE\nNEC\nLYM\nTAS\n")
    if with_splits:
        (root / "splits").mkdir()
        (root / "splits" / "train.txt").write_text("t1\nt2\nt3\n")
        (root / "splits" / "val.txt").write_text("t1\nt6\n")
    return root


def test_generic_layout(tmp_path):
    root = make_generic(tmp_path / "g")
    ds = open_dataset(root)  # no split -> every id of labels.csv
    assert ds.layout == "generic"
    assert ds.class_names == ["background", "TE", "NEC", "LYM", "TAS"]
    assert ds.ids == ["t1", "t2", "t3", "t4", "t5", "t7"]
    assert ds.rejects and ds.rejects[0][0] == "../up" and "labels.csv line 8" in ds.rejects[0][1]
    np.testing.assert_array_equal(ds.labels("t1"), [1, 0, 0, 0])
    np.testing.assert_array_equal(ds.labels("t2"), [0, 1, 1, 0])
    np.testing.assert_array_equal(ds.labels("t3"), [0, 0, 1, 1])  # space-separated names too
    assert ds.load_image("t2").shape == (16, 16, 3) and ds.load_image("t3").shape == (16, 16, 3)
    assert ds.load_mask("t1").shape == (16, 16) and ds.load_mask("t2") is None
    with pytest.raises(BadItem, match="id t4: empty label vector"):
        ds.labels("t4")
    with pytest.raises(BadItem, match="id t5: no image file"):
        ds.load_image("t5")
    with pytest.raises(BadItem, match="id t7: unknown class 'BOGUS'"):
        ds.labels("t7")
    tr = open_dataset(root, "train")
    assert tr.ids == ["t1", "t2", "t3"] and tr.split == "train"
    val = open_dataset(root, "val")
    np.testing.assert_array_equal(val.labels("t6"), [0, 0, 1, 0])  # not in labels.csv: from its mask
    with pytest.raises(DatasetError, match="split file not found: .*test.txt"):
        open_dataset(root, "test")


def test_generic_without_classes_or_splits(tmp_path):
    root = make_generic(tmp_path / "g", with_classes=False, with_splits=False)
    ds = open_dataset(root, "train")  # no splits/ folder: the split is every id
    assert ds.class_names == ["background", "BOGUS", "LYM", "NEC", "TAS", "TE"]
    assert ds.ids == ["t1", "t2", "t3", "t4", "t5", "t7"]
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    (bad / "labels.csv").write_text("name,tags\nx,TE\n")
    with pytest.raises(DatasetError, match="labels.csv: header"):
        open_dataset(bad)


# ---- synthetic generator ------------------------------------------------------------------------------------------

def test_synth_dataset(synth_root):
    ds = open_dataset(synth_root, "train")
    val = open_dataset(synth_root, "val")
    assert ds.class_names[0] == "background" and ds.num_classes == 7
    assert len(ds) + len(val) == 24 and not set(ds.ids) & set(val.ids) and len(val) == 6
    n_multi = 0
    fg = []
    for i in ds.ids + val.ids:
        item = ds.load_item(i)
        assert item["image"].shape == (64, 64, 3) and item["mask"].shape == (64, 64)
        np.testing.assert_array_equal(item["labels"], labels_from_mask(item["mask"], 7))
        n_multi += item["labels"].sum() > 1
        fg.append(np.mean((item["mask"] > 0) & (item["mask"] < 255)))
    assert n_multi >= 4
    assert np.mean(fg) > 0.15  # objects cover a good fraction of the image
    counts = sum(ds.labels(i) for i in ds.ids)
    assert (counts > 0).sum() >= 5  # most classes appear


def test_synth_deterministic(tmp_path):
    from wsss.data.synth import make_synthetic, render_image

    a = make_synthetic(str(tmp_path / "a"), num_images=4, size=48, seed=3, num_classes=5)
    make_synthetic(str(tmp_path / "b"), num_images=4, size=48, seed=3, num_classes=5)
    make_synthetic(str(tmp_path / "c"), num_images=4, size=48, seed=4, num_classes=5)
    assert a["class_names"] == ["background", "ring", "cross", "checker", "triangle"]
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 4 * 2 + 4
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a/JPEGImages/synth_00000.jpg").read_bytes() != \
        (tmp_path / "c/JPEGImages/synth_00000.jpg").read_bytes()
    img, lab = render_image(3, 0, 48, 4)
    saved = (tmp_path / "a/SegmentationClass/synth_00000.png").read_bytes()
    np.testing.assert_array_equal(lab, decode_mask(saved, "m"))
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic(str(tmp_path / "d"), num_images=2, num_classes=20)


def test_synth_marker_is_small_part_of_object():
    """The class-telling marker is a small share of each object (the reason plain CAMs are incomplete)."""
    from wsss.data import synth

    size = 128
    for kind in synth.MARKERS:
        r = 0.2 * size
        h = max(3.5, 0.24 * r)
        mark, _ = synth._marker(kind, size, 64.0, 64.0, h, 1.0, 0.0)
        body_area = np.pi * r * r
        assert 0 < mark.sum() < 0.2 * body_area, kind


# ---- transforms and the training dataset -------------------------------------------------------------------------

def test_normalize():
    img = np.zeros((2, 3, 3), np.uint8)
    img[..., 0] = 255
    x = normalize(img)
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.tensor((1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]))
    assert torch.allclose(x[1], torch.tensor(-IMAGENET_MEAN[1] / IMAGENET_STD[1]))


def test_train_dataset_shapes_and_determinism(synth_root):
    ds = open_dataset(synth_root, "train")
    cfg = DataConfig(crop=48, resize_long=[32, 80])
    td = TrainDataset(ds, cfg, seed=0)
    assert len(td) == len(ds)
    a = td[0]
    assert set(a) == {"image", "labels", "id"}
    assert a["image"].shape == (3, 48, 48) and a["image"].dtype == torch.float32
    assert a["labels"].shape == (6,) and a["labels"].sum() >= 1 and a["id"] == ds.ids[0]
    a2 = td[0]
    assert not torch.equal(a2["image"], a["image"])  # a second visit gets another augmentation
    again = TrainDataset(ds, cfg, seed=0)
    assert torch.equal(again[0]["image"], a["image"]) and torch.equal(again[0]["image"], a2["image"])  # replayed
    again.set_epoch(1)
    assert not torch.equal(again[0]["image"], a["image"])
    assert not torch.equal(TrainDataset(ds, cfg, seed=1)[0]["image"], a["image"])
    # padding when the image is smaller than the crop: zeros (= the mean colour after normalisation)
    small = TrainDataset(ds, DataConfig(crop=96, resize_long=[40, 40]), seed=0)[1]["image"]
    assert small.shape == (3, 96, 96) and (small == 0).all(dim=0).float().mean() > 0.5
    loader = torch.utils.data.DataLoader(td, batch_size=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 48, 48) and batch["labels"].shape == (4, 6) and len(batch["id"]) == 4


def test_train_dataset_rejects_bad_items(tmp_path):
    rng = np.random.default_rng(6)
    items = {"g1": (_jpeg(_rand_image(rng)), _mask(24, 32, 1)), "bad": (b"broken", _mask(24, 32, 1)),
             "bg": (_jpeg(_rand_image(rng)), np.zeros((24, 32), np.uint8)),
             "g2": (_jpeg(_rand_image(rng)), _mask(24, 32, 2))}
    root = make_voc(tmp_path / "v", items, {"train": ["g1", "bad", "bg", "g2", "../x"]},
                    classes=["background", "a", "b"])
    td = TrainDataset(open_dataset(root, "train"), DataConfig(crop=32, resize_long=[24, 40]), seed=0)
    assert td.rejects[0][0] == "../x"  # carried over from the dataset
    out = td[1]  # "bad" -> replaced by the next good item
    assert out["id"] in ("g2", "g1") and out["image"].shape == (3, 32, 32)
    rej = dict(td.rejects)
    assert "bad" in rej and "bad.jpg" in rej["bad"] and "bg" in rej and "empty label vector" in rej["bg"]
    td[1]
    assert [i for i, _ in td.rejects].count("bad") == 1  # recorded once
    td2 = TrainDataset(open_dataset(root, "train"), DataConfig(crop=32, resize_long=[24, 40]), seed=0)
    td2.check()
    assert td2.ids == ["g1", "g2"] and {i for i, _ in td2.rejects} == {"../x", "bad", "bg"}
