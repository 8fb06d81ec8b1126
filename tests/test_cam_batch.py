"""Batched CAM inference (wsss.cam.CamInferencer.infer_batch): one forward per scale for a whole batch of
same-size images with both flips stacked gives the per-image loop's CAMs (allclose), for a PCM method (DAEN with
CSM) and plain CAM, mixed image sizes, labels given or predicted; and the pseudo-label stages use it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from wsss.cam import CamInferencer
from wsss.config import Config


def _cfg(method: str, attention: str = "none") -> Config:
    cfg = Config()
    cfg.model.backbone = "tiny"
    cfg.model.width = 8
    cfg.model.attention = attention
    cfg.method.name = method
    cfg.infer.scales = [1.0, 0.5, 1.5]
    cfg.infer.flip = True
    cfg.device = "cpu"
    return cfg.validate()


def _images(rng, sizes):
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes]


@pytest.mark.parametrize("method,attention,use_pcm,resample", [
    ("daen", "csm", True, "bicubic"), ("seam", "none", True, "bilinear"), ("seam", "none", False, "bicubic"),
    ("cam", "none", False, "bilinear")])
def test_infer_batch_equals_per_image_loop(method, attention, use_pcm, resample):
    from wsss.train import build_model

    cfg = _cfg(method, attention)
    cfg.infer.use_pcm = use_pcm
    cfg.infer.resample = resample
    torch.manual_seed(0)
    net = build_model(cfg, 5)
    net.train()  # infer_batch switches to eval and back, as __call__ does
    inf = CamInferencer(net, cfg, batch_size=3)
    assert inf.use_pcm == (use_pcm and cfg.uses_pcm)
    rng = np.random.default_rng(0)
    # 5 images of 40x56 (two batches of 3 + 2) and 2 of other sizes, interleaved
    sizes = [(40, 56), (40, 56), (33, 47), (40, 56), (40, 56), (64, 48), (40, 56)]
    images = _images(rng, sizes)
    labels = [np.eye(4, dtype=np.float32)[k % 4] + (np.eye(4, dtype=np.float32)[(k + 2) % 4] if k % 2 else 0)
              for k in range(len(images))]
    for labs in (labels, None):  # given labels, and classes predicted from the logits
        ref = [inf(im, None if labs is None else labs[k]) for k, im in enumerate(images)]
        got = inf.infer_batch(images, labs)
        assert len(got) == len(images)
        for (c_ref, k_ref), (c, k), im in zip(ref, got, images):
            assert c.shape == c_ref.shape and c.shape[1:] == im.shape[:2]
            assert np.array_equal(k, k_ref)
            np.testing.assert_allclose(c, c_ref, rtol=1e-4, atol=1e-5)
    assert net.training  # restored
    assert inf.infer_batch([], []) == []
    with pytest.raises(ValueError, match="label vectors"):
        inf.infer_batch(images[:2], labels[:1])


def test_infer_batch_does_one_forward_per_scale_per_group():
    from wsss.train import build_model

    cfg = _cfg("cam")
    torch.manual_seed(0)
    net = build_model(cfg, 4)
    calls = []
    net.register_forward_hook(lambda m, inp, out: calls.append(tuple(inp[0].shape)))
    inf = CamInferencer(net, cfg, batch_size=8)
    rng = np.random.default_rng(1)
    images = _images(rng, [(32, 40)] * 4 + [(24, 24)] * 2)
    inf.infer_batch(images, [np.array([1, 0, 0], np.float32)] * 6)
    # 2 size groups x 3 scales, each forward holding the group's images and their flips
    assert len(calls) == 6
    assert sorted(c[0] for c in calls) == [4, 4, 4, 8, 8, 8]
    calls.clear()
    inf(images[0], np.array([1, 0, 0], np.float32))
    assert [c[0] for c in calls] == [2, 2, 2]  # the per-image path: 1 image + its flip per scale


def test_cam_stage_batch_matches_call(tmp_path):
    from wsss.checkpoint import save_checkpoint
    from wsss.pseudolabel import CamStage
    from wsss.train import build_model

    cfg = _cfg("daen", "csm")
    torch.manual_seed(0)
    names = ["background", "a", "b", "c"]
    save_checkpoint(str(tmp_path / "ck"), build_model(cfg, 4), cfg, meta={"kind": "cam", "class_names": names})
    stage = CamStage(str(tmp_path / "ck"), device="cpu")
    rng = np.random.default_rng(2)
    images = _images(rng, [(30, 30)] * 3)
    labels = [np.array([1, 0, 1], np.float32)] * 3
    for (c, k), im, lab in zip(stage.batch(images, labels), images, labels):
        c_ref, k_ref = stage(im, lab)
        assert np.array_equal(k, k_ref)
        np.testing.assert_allclose(c, c_ref, rtol=1e-4, atol=1e-5)


def test_unused_pcm_is_not_computed_and_changes_nothing():
    from wsss.train import build_model

    cfg = _cfg("seam")
    cfg.infer.use_pcm = False
    torch.manual_seed(0)
    net = build_model(cfg, 3)
    seen = []
    net.pcm.register_forward_hook(lambda m, i, o: seen.append(1))
    inf = CamInferencer(net, cfg)
    image = np.random.default_rng(3).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    cam, keys = inf(image, np.array([1, 1], np.float32))
    assert seen == []  # the forward skipped the PCM
    ref = CamInferencer(net, cfg)
    ref._skip_pcm = False  # the PCM computed and ignored
    cam2, keys2 = ref(image, np.array([1, 1], np.float32))
    assert len(seen) == len(cfg.infer.scales) and np.array_equal(keys, keys2)
    np.testing.assert_allclose(cam, cam2, rtol=1e-5, atol=1e-6)
