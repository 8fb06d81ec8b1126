"""Confusion matrix, IoU/mIoU, CAM labels, background-threshold sweep and folder evaluation."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from wsss.data import open_dataset
from wsss.data.io import encode_label_png
from wsss.metrics import (DEFAULT_THRESHOLDS, SEAM_THRESHOLDS, ConfusionMatrix, cam_to_label, evaluate_folder,
                          format_table, iou_from_confusion, threshold_sweep)

NAMES3 = ["background", "a", "b"]


def test_confusion_matrix_counts_and_ignore():
    gt = np.array([[0, 0, 1], [1, 255, 2]])
    pred = np.array([[0, 1, 1], [0, 2, 2]])
    cm = ConfusionMatrix(3).update(gt, pred)
    np.testing.assert_array_equal(cm.matrix, [[1, 1, 0], [1, 1, 0], [0, 0, 1]])  # the 255 pixel is not counted
    cm.update(np.array([1, 2]), np.array([255, 7]))  # out-of-range predictions: misses for the gt class
    np.testing.assert_array_equal(cm.unassigned, [0, 1, 1])
    r = cm.result(NAMES3)
    assert r["per_class"]["a"] == pytest.approx(1 / 4)  # tp 1 / (gt 3 + pred 2 - 1)
    assert r["per_class"]["b"] == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="class index 5"):
        cm.update(np.array([5]), np.array([0]))


def test_iou_hand_made_with_absent_class():
    conf = np.array([[3, 1, 0], [1, 2, 0], [0, 0, 0]])
    r = iou_from_confusion(conf, NAMES3)
    assert r["per_class"] == {"background": pytest.approx(0.6), "a": pytest.approx(0.5), "b": None}
    assert r["absent"] == ["b"]
    assert r["miou"] == pytest.approx(0.55)  # absent class left out of the mean
    assert r["pixel_accuracy"] == pytest.approx(5 / 7)
    # a class predicted but never in the ground truth is present with IoU 0
    r2 = iou_from_confusion(np.array([[3, 1, 1], [1, 2, 0], [0, 0, 0]]), NAMES3)
    assert r2["per_class"]["b"] == 0.0 and r2["absent"] == []
    assert r2["miou"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    with pytest.raises(ValueError, match="class names"):
        iou_from_confusion(conf, ["x", "y"])
    table = format_table(r)
    assert "absent" in table and "55.00" in table and table.splitlines()[-1].startswith("mIoU")
    assert "60.00" in table


def test_cam_to_label():
    cam = np.array([[[0.2, 0.6, 0.3]], [[0.1, 0.7, 0.3]]], np.float32)  # (2, 1, 3)
    keys = np.array([4, 9])
    np.testing.assert_array_equal(cam_to_label(cam, keys, 0.3), [[0, 9, 0]])  # tie with the threshold -> bg
    np.testing.assert_array_equal(cam_to_label(cam, keys, 0.1), [[4, 9, 4]])
    assert cam_to_label(np.zeros((0, 2, 2)), np.zeros(0), 0.5).tolist() == [[0, 0], [0, 0]]


def test_threshold_sweep_finds_known_best():
    gt = np.zeros((8, 8), np.uint8)
    gt[2:6, 2:6] = 2
    gt[0, 0] = 255
    cam = np.zeros((1, 8, 8), np.float32)
    cam[0] = 0.2
    cam[0, :, 4:] = 0.3          # background pixels score up to 0.30
    cam[0, 2:6, 2:6] = 0.5
    cam[0, 2:6, 2:4] = 0.45      # object pixels score 0.45 .. 0.50
    keys = np.array([2])
    r = threshold_sweep([(cam, keys, gt), (cam, keys, gt, "second")], 3, NAMES3)
    assert r["best_threshold"] == pytest.approx(0.30)  # perfect on [0.30, 0.45); the first such threshold
    assert r["miou"] == pytest.approx(1.0)
    assert r["per_class"]["a"] is None and r["absent"] == ["a"]
    assert len(r["curve"]) == len(DEFAULT_THRESHOLDS) == 96 and r["n_images"] == 2
    assert list(DEFAULT_THRESHOLDS[:60]) == list(SEAM_THRESHOLDS) and DEFAULT_THRESHOLDS[-1] == 0.95
    curve = dict(r["curve"])
    assert curve[0.2] < 1.0 and curve[0.45] < 1.0 and curve[0.44] == pytest.approx(1.0)
    # each curve point equals a direct evaluation at that threshold
    for t in (0.0, 0.25, 0.3, 0.47, 0.59, 0.95):
        cm = ConfusionMatrix(3).update(gt, cam_to_label(cam, keys, t))
        assert curve[t] == pytest.approx(iou_from_confusion(cm, NAMES3)["miou"])
    # mismatched pairs are skipped and reported
    r = threshold_sweep([(cam, keys, gt), (cam, keys, gt[:4], "bad")], 3, NAMES3, thresholds=[0.4, 0.1])
    assert r["rejects"][0][0] == "bad" and r["n_images"] == 1
    assert [t for t, _ in r["curve"]] == [0.4, 0.1] and r["best_threshold"] == pytest.approx(0.4)


def _copy_gt(voc_sample, pred_dir):
    pred_dir.mkdir()
    for p in (voc_sample / "SegmentationClass").glob("*.png"):
        shutil.copy(p, pred_dir / p.name)


def test_evaluate_folder_perfect_and_one_wrong(voc_sample, tmp_path):
    pred = tmp_path / "pred"
    _copy_gt(voc_sample, pred)
    out_json = tmp_path / "eval.json"
    r = evaluate_folder(str(pred), str(voc_sample), "val", json_path=str(out_json))
    assert r["miou"] == pytest.approx(1.0) and r["n_images"] == 13 and r["missing"] == [] and r["rejects"] == []
    saved = json.loads(out_json.read_text())
    assert saved["miou"] == pytest.approx(1.0) and saved["split"] == "val" and saved["n_images"] == 13
    assert saved["per_class"]["aeroplane"] is None and saved["per_class"]["person"] == pytest.approx(1.0)

    # one prediction all background: expected IoUs from pixel counts
    ds = open_dataset(voc_sample, "val")
    wrong = "2007_000762"
    masks = {i: ds.load_mask(i) for i in ds.ids}
    (pred / f"{wrong}.png").write_bytes(encode_label_png(np.zeros_like(masks[wrong])))
    counts = np.zeros(21)
    for m in masks.values():
        counts += np.bincount(m[m != 255].ravel(), minlength=21)[:21]
    mx = masks[wrong]
    cx = np.bincount(mx[mx != 255].ravel(), minlength=21)[:21]
    fg_x = cx[1:].sum()
    ious = [counts[0] / (counts[0] + fg_x)]
    ious += [(counts[c] - cx[c]) / counts[c] for c in range(1, 21) if counts[c] > 0]
    r = evaluate_folder(str(pred), str(voc_sample), "val")
    assert r["miou"] == pytest.approx(float(np.mean(ious)))
    assert r["per_class"]["bottle"] == pytest.approx((counts[5] - cx[5]) / counts[5])
    assert r["miou"] < 1.0


def test_evaluate_folder_missing_and_rejects(voc_sample, tmp_path):
    pred = tmp_path / "pred"
    _copy_gt(voc_sample, pred)
    (pred / "2007_000123.png").unlink()
    (pred / "2007_000999.png").write_bytes(encode_label_png(np.zeros((10, 10), np.uint8)))
    (pred / "2007_001284.png").write_bytes(b"corrupt")
    r = evaluate_folder(str(pred), str(voc_sample), "val", json_path=str(tmp_path / "e.json"))
    assert r["missing"] == ["2007_000123"]
    rej = dict((i, reason) for i, reason in r["rejects"])
    assert set(rej) == {"2007_000999", "2007_001284"}
    assert "2007_000999.png: prediction is 10x10" in rej["2007_000999"] and "\n" not in rej["2007_000999"]
    assert "2007_001284.png" in rej["2007_001284"]
    assert r["n_images"] == 10 and r["miou"] == pytest.approx(1.0)
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["missing"] == ["2007_000123"] and len(saved["rejects"]) == 2
    with pytest.raises(FileNotFoundError, match="prediction folder"):
        evaluate_folder(str(tmp_path / "nope"), str(voc_sample), "val")
