"""SEAM as its public code computes it (train_SEAM.py, infer_SEAM.py): hand-computed checks of the ECR target
(background 1 - max fg, arg-max over foreground only), ECR's top-k count, the rvmin term, ER's normalisation,
ER = 0 for an equivariant net, the ER-only method, and the PCM-output scoring of CAM inference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from wsss import config, losses
from wsss.cam import CamInferencer
from wsss.train import Objective, build_model, build_optimizer, train_step


def _t(rows):
    """(C, W) nested list -> (1, C, 1, W) tensor."""
    return torch.tensor(rows, dtype=torch.float32)[None, :, None, :]


# ------------------------------------------------------------------------------------------------ ECR

def test_ecr_target_background_is_one_minus_max_fg_and_argmax_is_over_fg_only():
    # channel 0 = an untrained classifier row that would win everywhere if it took part in the arg-max
    cam = _t([[0.9, 0.9, 0.9],
              [0.8, 0.2, 0.0],
              [0.1, 0.6, 0.0]])
    target = losses.ecr_target(cam)
    assert torch.allclose(target, _t([[0.2, 0.4, 1.0],
                                      [0.8, 0.0, 0.0],
                                      [0.0, 0.6, 0.0]]))
    # max_onehot keeps channel 0 as given and zeroes non-maximal foreground values (ties kept)
    oh = losses.max_onehot(_t([[5.0, 0.0], [0.3, 0.4], [0.3, 0.1]]))
    assert torch.equal(oh, _t([[5.0, 0.0], [0.3, 0.4], [0.3, 0.0]]))
    assert not target.requires_grad


def test_cross_equivariant_loss_by_hand():
    cam2 = _t([[0.9, 0.9, 0.9], [0.8, 0.2, 0.0], [0.1, 0.6, 0.0]])
    cam1 = _t([[0.0, 0.0, 0.0], [0.5, 0.0, 1.0], [0.0, 0.7, 0.0]])
    rv1 = torch.zeros_like(cam2)                       # e1 = mean(target of cam2) = (0.2+0.4+1+0.8+0.6) / 9
    rv2 = losses.ecr_target(cam1)                      # e2 = 0
    got = losses.cross_equivariant_loss(cam1, rv1, cam2, rv2, topk=1.0)
    assert abs(float(got) - 3.0 / 9) < 1e-6
    # the hardest 20 % of C*h*w = 9 elements: int(1.8) = 1 -> the largest error, 1.0 (background of pixel 3)
    got = losses.cross_equivariant_loss(cam1, rv1, cam2, rv2, topk=0.2)
    assert abs(float(got) - 1.0) < 1e-6


def test_ecr_topk_counts_all_channels_per_sample_and_truncates():
    err = torch.zeros(2, 21, 3, 5)                      # 315 elements per sample -> k = int(63.0) = 63
    err[0] = torch.arange(315, dtype=torch.float32).view(21, 3, 5)
    # sample 0: mean of 252..314 = 283; sample 1: zeros -> the mean over both samples' top-k is 141.5
    assert float(losses.topk_mean(err, 0.2)) == pytest.approx(141.5)
    # 38 elements: 0.2 * 38 = 7.6 -> k = 7 as SEAM's int(), so 31..37 (mean 34), not 8 elements (33.5)
    assert float(losses.topk_mean(torch.arange(38, dtype=torch.float32).view(1, 38), 0.2)) == pytest.approx(34.0)


# ------------------------------------------------------------------------------------------------ rvmin

def test_adaptive_min_pooling_loss_by_hand():
    x = torch.tensor([[[[0.5, -1.0], [2.0, 0.1]],
                       [[0.3, 0.4], [-3.0, 0.2]]],
                      [[[-0.5, -1.0], [-2.0, -0.1]],
                       [[-0.3, -0.4], [-3.0, -0.2]]]])   # (2, 2, 2, 2)
    # sample 0: max over channels [[0.5, 0.4], [2.0, 0.2]]; h*w // 4 = 1 -> lowest 0.2; sample 1: all < 0 -> relu 0
    assert float(losses.adaptive_min_pooling_loss(x)) == pytest.approx((0.2 + 0.0) / 2)
    y = torch.arange(8, dtype=torch.float32).view(1, 1, 2, 4) - 1.0   # -1..6; k = 2 -> relu(-1), relu(0)
    assert float(losses.adaptive_min_pooling_loss(y)) == 0.0
    assert float(losses.adaptive_min_pooling_loss(y + 2.0)) == pytest.approx((1.0 + 2.0) / 2)


# ------------------------------------------------------------------------------------------------ ER

def test_er_classes_normalises_as_if_there_were_that_many_classes():
    a = torch.rand(2, 7, 4, 4)
    b = torch.rand(2, 7, 4, 4)
    mean = losses.equivariant_loss(a, b)
    assert float(mean) == pytest.approx(float((a[:, 1:] - b[:, 1:]).abs().mean()))
    assert float(losses.equivariant_loss(a, b, num_classes=20)) == pytest.approx(float(mean) * 6 / 20)
    assert float(losses.equivariant_loss(a, b, num_classes=6)) == pytest.approx(float(mean))


class LinearPixelNet(nn.Module):
    """A positive 1x1-conv CAM net (equivariant to rescaling on linear ramp images), optionally with a
    periodic term in absolute pixel units that is not."""

    def __init__(self, num_classes=4, periodic=False):
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.rand(num_classes, 3, 1, 1) + 0.1)
            self.conv.bias.fill_(0.1)
        self.periodic = periodic

    def forward(self, x):
        cam = self.conv(x)
        if self.periodic:
            cam = cam + 0.5 * torch.sin(1.3 * torch.arange(x.shape[-1], dtype=x.dtype)).view(1, 1, 1, -1)
        return {"cam": cam, "logits": cam[:, 1:].mean(dim=(2, 3)), "cam_rv": None}


def _ramps(b, h, w):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return torch.stack([yy, xx, 0.5 * yy + 0.3 * xx]).expand(b, 3, h, w).contiguous()


@pytest.mark.parametrize("grid", ["input", "feature"])
def test_er_is_zero_for_a_scale_equivariant_net(grid):
    torch.manual_seed(0)
    cfg = config.load(None, ["method.name=er", "method.scale=0.3", f"method.er_grid={grid}"])
    x = _ramps(2, 41, 31)                              # rescaled to 12 x 9, align_corners=True: exact on ramps
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 1]])
    assert float(Objective(LinearPixelNet(), cfg)(x, labels)["eq"].detach()) < 1e-5
    assert float(Objective(LinearPixelNet(periodic=True), cfg)(x, labels)["eq"].detach()) > 1e-2


# ------------------------------------------------------------------------------------------------ methods

def _tiny_cfg(name, *ov):
    return config.load(None, [f"method.name={name}", "model.backbone=tiny", "model.width=4", "model.attention=none",
                              "model.dropout=0", "optim.amp=false", "device=cpu", *ov])


def test_er_method_is_siamese_without_pcm_and_trains_one_step():
    cfg = _tiny_cfg("er")
    assert cfg.siamese and not cfg.uses_pcm
    torch.manual_seed(0)
    net = build_model(cfg, 4)
    assert net.pcm is None
    objective = Objective(net, cfg)
    x, labels = torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    t = objective(x, labels)
    assert float(t["ce"]) == 0 and float(t["rvmin"]) == 0 and float(t["eq"]) > 0
    assert torch.allclose(t["loss"], t["cla"] + t["eq"])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loss, metrics = train_step(objective, {"image": x, "labels": labels}, cfg, build_optimizer(net, cfg))
    assert np.isfinite(float(loss)) and set(metrics) == {"loss", "cla", "rvmin", "eq", "ce"}
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items() if k.startswith("backbone."))
    # ER alone sends gradient into the backbone
    cfg0 = _tiny_cfg("er", "method.w_cla=0")
    objective = Objective(build_model(cfg0, 4), cfg0)
    objective(x, labels)["loss"].backward()
    assert objective.net.classifier.weight.grad.abs().sum() > 0
    assert sum(float(p.grad.abs().sum()) for p in objective.net.backbone.parameters() if p.grad is not None) > 0


def test_seam_objective_terms_and_where_their_gradients_go():
    torch.manual_seed(0)
    cfg = _tiny_cfg("seam")
    net = build_model(cfg, 4)
    objective = Objective(net, cfg)
    x, labels = torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    t = objective(x, labels)
    assert all(float(t[k]) > 0 for k in ("cla", "rvmin", "eq", "ce"))
    assert torch.allclose(t["loss"], t["cla"] + t["rvmin"] + t["eq"] + t["ce"])
    # rvmin and ECR train only the PCM's projections (SEAM: detached CAM and features)
    cfg_pcm = _tiny_cfg("seam", "method.w_cla=0", "method.w_eq=0")
    torch.manual_seed(0)
    obj = Objective(build_model(cfg_pcm, 4), cfg_pcm)
    obj(x, labels)["loss"].backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in obj.net.backbone.parameters())
    assert obj.net.classifier.weight.grad is None or float(obj.net.classifier.weight.grad.abs().sum()) == 0
    assert float(obj.net.pcm.proj.weight.grad.abs().sum()) > 0
    # the ER weight and er_classes act on ER alone
    cfg20 = _tiny_cfg("seam", "method.er_classes=20", "method.w_ce=0", "method.w_rvmin=0")
    torch.manual_seed(0)
    net20 = build_model(cfg20, 4)
    net20.load_state_dict(net.state_dict())
    t3 = Objective(net20, cfg20)(x, labels)
    assert float(t3["eq"]) == pytest.approx(float(t["eq"]) * 3 / 20, rel=1e-5)
    assert torch.allclose(t3["loss"], t3["cla"] + t3["eq"])


def test_methods_lists_and_validation():
    assert "er" in config.METHODS
    for bad in ("method.er_grid=pixels", "method.er_classes=0", "method.w_rvmin=-1", "infer.resample=nearest"):
        with pytest.raises(config.ConfigError, match=bad.split("=")[0]):
            config.load(None, [bad])


# ------------------------------------------------------------------------------------------------ inference

class OffsetNet(nn.Module):
    """cam = cam_rv = 1 + a left-to-right ramp in [0, 1] on every channel (minimum 1, maximum 2)."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.num_classes = num_classes
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        b, _, h, w = x.shape
        ramp = torch.linspace(0, 1, w).view(1, 1, 1, w).expand(b, self.num_classes, h, w)
        cam = 1.0 + ramp + 0 * self.dummy
        return {"cam": cam, "logits": cam[:, 1:].mean(dim=(2, 3)), "cam_rv": cam.clone()}


def test_inference_scores_the_pcm_output_with_min_max_and_the_raw_cam_with_max():
    cfg = config.load(None, ["method.name=seam", "infer.scales=[1.0]", "infer.flip=false", "device=cpu"])
    image = np.zeros((8, 16, 3), np.uint8)
    net = OffsetNet()
    cam, keys = CamInferencer(net, cfg, use_pcm=True)(image, np.array([0.0, 1.0]))
    assert keys.tolist() == [2]
    assert cam.min() == pytest.approx(0.0, abs=1e-4) and cam.max() == pytest.approx(1.0, abs=1e-4)
    raw, _ = CamInferencer(net, cfg, use_pcm=False)(image, np.array([0.0, 1.0]))
    assert raw.min() == pytest.approx(0.5, abs=1e-4) and raw.max() == pytest.approx(1.0, abs=1e-4)


def test_inference_resizes_each_scale_like_pil_bicubic():
    from PIL import Image

    from wsss.data.transforms import normalize

    seen = []

    class Spy(OffsetNet):
        def forward(self, x):
            seen.append(x.clone())
            return super().forward(x)

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    cfg = config.load(None, ["method.name=seam", "infer.scales=[0.5]", "infer.flip=true", "device=cpu"])
    CamInferencer(Spy(), cfg)(image, np.array([1.0, 1.0]))
    want = normalize(np.asarray(Image.fromarray(image).resize((15, 10), Image.BICUBIC)))
    assert seen[0].shape == (2, 3, 10, 15)
    assert torch.allclose(seen[0][0], want) and torch.allclose(seen[0][1], torch.flip(want, dims=(-1,)))
