"""Visual helpers and the static HTML report."""
from __future__ import annotations

import io
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from wsss.report import write_report
from wsss.viz import cam_overlay, colormap_jet, grid, label_to_rgb


def test_label_to_rgb_and_colormap():
    lab = np.array([[0, 1], [15, 255]], np.uint8)
    rgb = label_to_rgb(lab)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == (0, 0, 0) and tuple(rgb[0, 1]) == (128, 0, 0)
    assert tuple(rgb[1, 0]) == (192, 128, 128) and tuple(rgb[1, 1]) == (224, 224, 192)
    cm = colormap_jet(np.array([0.0, 1.0]))
    assert cm[0, 2] > 100 and cm[0, 0] == 0 and cm[1, 0] > 100 and cm[1, 2] == 0  # blue -> red


def test_cam_overlay_and_grid():
    img = np.full((20, 30, 3), 100, np.uint8)
    cam = np.zeros((10, 15), np.float32)
    cam[:, 8:] = 1.0
    out = cam_overlay(img, cam, alpha=0.5)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert out[10, 29, 0] > out[10, 0, 0] and out[10, 0, 2] > out[10, 29, 2]  # hot = red side, cold = blue side
    with pytest.raises(ValueError):
        cam_overlay(img, np.zeros((2, 3, 4)))
    g = grid([[img, np.ones((20, 30), np.uint8)], [None, img]], tile=32, pad=2)
    assert g.shape == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2, 3)
    assert tuple(g[2 + 16, 2 + 32 + 2 + 16]) == (128, 0, 0)  # label tile in the VOC palette
    assert (g[40:60, 5:30] == 255).all()  # empty cell


def test_write_report(voc_sample, tmp_path):
    ids = sorted(p.stem for p in (voc_sample / "JPEGImages").glob("*.jpg"))
    good = tmp_path / "rw"
    good.mkdir()
    for i in ids[:3]:
        shutil.copy(voc_sample / "SegmentationClass" / f"{i}.png", good / f"{i}.png")
    (good / f"{ids[1]}.png").write_bytes(b"junk")
    cams = tmp_path / "cams"
    cams.mkdir()
    for i in ids[:2]:
        h, w = np.asarray(Image.open(voc_sample / "JPEGImages" / f"{i}.jpg")).shape[:2]
        cam = np.linspace(0, 1, h * w, dtype=np.float32).reshape(1, h, w).astype(np.float16)
        buf = io.BytesIO()
        np.savez_compressed(buf, cam=cam, keys=np.array([15], np.int16), hw=np.array([h, w], np.int32))
        (cams / f"{i}.npz").write_bytes(buf.getvalue())
    (cams / f"{ids[2]}.npz").write_bytes(b"not a zip")
    results = {"CAM": {"miou": 0.5, "per_class": {"background": 0.8, "aeroplane": None, "person": 0.2},
                       "best_threshold": 0.26},
               "+RW <b>&": {"miou": 0.6, "per_class": {"background": 0.85, "aeroplane": None, "person": 0.35}}}
    throughput = [{"stage": "cam", "images/s": 12.5, "workers": 2}, {"stage": "<crf>", "images/s": 3.25}]
    out = write_report(str(tmp_path / "rep" / "report.html"), str(voc_sample), "val",
                       pred_dirs={"+RW": str(good)}, cams_dir=str(cams), results=results,
                       throughput=throughput, max_images=4)
    html = (tmp_path / "rep" / "report.html").read_text()
    assert out.endswith("report.html")
    assert "<table class='iou'>" in html and "mIoU" in html
    assert "+RW &lt;b&gt;&amp;" in html and "<b>&" not in html and "&lt;crf&gt;" in html
    assert "35.00" in html and "60.00" in html and "absent" in html and "0.26" in html
    assert "12.5" in html
    srcs = re.findall(r"<img src='([^']+)'", html)
    # 4 images + 4 GT + 2 CAM overlays + 2 readable predictions
    assert len(srcs) == 12
    for s in srcs:
        assert not s.startswith("/") and (tmp_path / "rep" / s).is_file(), s
        assert Image.open(tmp_path / "rep" / s).size[0] <= 192
    assert html.count(">missing<") == 2  # CAM and prediction of the 4th image
    assert "junk" not in html and f"{ids[1]}.png" in html  # the bad prediction's one-line reason
    assert "http" not in html and "<script" not in html
