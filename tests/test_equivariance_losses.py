import torch
import torch.nn as nn
import torch.nn.functional as F

from wsss import config, losses
from wsss.equivariance import Flip, Rescale, make_transform
from wsss.train import Objective, poly_lr


def test_flip_inverse_is_exact():
    x = torch.randn(2, 3, 17, 23)
    t = Flip()
    assert torch.equal(t.invert(t.apply(x), x.shape[-2:]), x)


def test_rescale_inverse_is_exact_on_linear_ramps():
    h, w = 33, 49
    yy, xx = torch.meshgrid(torch.linspace(-1, 2, h), torch.linspace(0, 5, w), indexing="ij")
    x = torch.stack([yy, xx, 0.3 * yy - 2 * xx + 1])[None]
    for s in (0.3, 0.5, 0.75):
        t = Rescale(s)
        y = t.apply(x)
        assert y.shape[-2:] == t.out_size((h, w))
        assert torch.allclose(t.invert(y, (h, w)), x, atol=1e-5)


def test_make_transform_follows_method():
    cfg = config.load()
    assert isinstance(make_transform(cfg.method), Rescale) and make_transform(cfg.method).scale == 0.3
    cfg = config.load(None, ["method.transform=flip"])
    assert isinstance(make_transform(cfg.method), Flip)
    cfg = config.load(None, ["method.name=sse", "method.sse_scales=[0.4, 0.6]"])
    assert {make_transform(cfg.method).scale for _ in range(40)} == {0.4, 0.6}


class PixelNet(nn.Module):
    """A per-pixel (1x1 conv) CAM net, optionally with a position-dependent term that breaks equivariance."""

    def __init__(self, num_classes=4, positional=False):
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.positional = positional

    def forward(self, x):
        cam = self.conv(x)
        if self.positional:
            ramp = torch.linspace(0, 3, x.shape[-1], device=x.device)
            cam = cam + ramp.view(1, 1, 1, -1)
        return {"cam": cam, "logits": cam[:, 1:].mean(dim=(2, 3)), "cam_rv": None}


def test_equivariant_loss_zero_for_equivariant_net_positive_otherwise():
    torch.manual_seed(0)
    cfg = config.load(None, ["method.name=seam", "method.transform=flip"])
    x = torch.randn(2, 3, 16, 20)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    eq = Objective(PixelNet(), cfg)(x, labels)["eq"]
    assert float(eq) < 1e-6
    neq = Objective(PixelNet(positional=True), cfg)(x, labels)["eq"]
    assert float(neq) > 1e-2


def test_loss_terms_and_weights():
    torch.manual_seed(0)
    cfg = config.load(None, ["method.name=seam", "method.transform=flip", "method.w_eq=0", "method.w_cla=2"])
    x = torch.randn(2, 3, 16, 20)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    t = Objective(PixelNet(positional=True), cfg)(x, labels)
    assert torch.allclose(t["loss"], 2 * t["cla"] + t["ce"])
    cfg = config.load(None, ["method.name=cam"])
    t = Objective(PixelNet(), cfg)(x, labels)
    assert float(t["eq"]) == 0 and torch.allclose(t["loss"], t["cla"])


def test_max_norm_and_topk_and_onehot():
    cam = torch.tensor([[[[0.0, 2.0], [4.0, -1.0]], [[1.0, 1.0], [3.0, 5.0]]]])
    n = losses.max_norm(cam)
    assert torch.allclose(n.amax(dim=(2, 3)), torch.ones(1, 2), atol=1e-4)
    assert float(n.min()) >= 0
    # SEAM's max_onehot: channel 0 (background) kept; arg-max among the foreground channels only
    cam3 = torch.cat([cam, torch.tensor([[[[2.0, 0.5], [3.0, 6.0]]]])], dim=1)
    oh = losses.max_onehot(cam3)
    assert torch.equal(oh, torch.tensor([[[[0.0, 2.0], [4.0, -1.0]], [[0.0, 1.0], [3.0, 0.0]],
                                          [[2.0, 0.0], [3.0, 6.0]]]]))
    err = torch.arange(10, dtype=torch.float32).view(1, 10)
    assert float(losses.topk_mean(err, 0.2)) == 8.5
    lab = losses.label_mask(torch.tensor([[0.0, 1.0]]))
    assert lab.flatten().tolist() == [1.0, 0.0, 1.0]


def test_poly_lr():
    assert poly_lr(0.01, 0, 100, 0.9) == 0.01
    assert poly_lr(0.01, 100, 100, 0.9) == 0.0
    assert abs(poly_lr(0.01, 50, 100, 0.9) - 0.01 * 0.5 ** 0.9) < 1e-12
