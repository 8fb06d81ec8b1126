"""Models: backbones, CSM attention, PCM, CAMNet, parameter groups and pretrained-weight loading (CPU, small)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from wsss.config import from_dict
from wsss.models.attention import CSM, ChannelAttention, SpatialAttention, build_attention
from wsss.models.backbones import build_backbone
from wsss.models.cam_net import CAMNet
from wsss.models.pcm import PCM, normalize_affinity, prepare_cam
from wsss.models.weights import load_pretrained

BN = nn.modules.batchnorm._BatchNorm


def _cfg(**model):
    method = model.pop("method", "daen")
    return from_dict({"model": model, "method": {"name": method}})


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------------------------- attention

def test_csm_matches_hand_computation():
    torch.manual_seed(0)
    f = torch.tensor([[[[1.0, -2.0, 0.5],
                        [3.0, 0.0, -1.0]],
                       [[-0.5, 2.0, 1.5],
                        [0.0, -3.0, 2.5]]]])          # (1, 2, 2, 3)
    csm = CSM(channels=2, reduction=2, kernel=3)       # hidden = 1
    a = [0.7, -0.4]                                    # fc1: 2 -> 1
    b = [1.5, -2.0]                                    # fc2: 1 -> 2
    w = np.arange(18, dtype=np.float64).reshape(2, 3, 3) / 10.0 - 0.8   # spatial 3x3 conv, 2 input maps
    with torch.no_grad():
        csm.channel.fc1.weight.copy_(torch.tensor(a).view(1, 2, 1, 1))
        csm.channel.fc2.weight.copy_(torch.tensor(b).view(2, 1, 1, 1))
        csm.spatial.conv.weight.copy_(torch.tensor(w, dtype=torch.float32).view(1, 2, 3, 3))
    out = csm(f)[0].detach().numpy()

    x = f[0].numpy().astype(np.float64)
    C, H, W = x.shape

    def mlp(v):
        hidden = max(a[0] * v[0] + a[1] * v[1], 0.0)
        return [b[0] * hidden, b[1] * hidden]

    avg = [x[c].mean() for c in range(C)]
    mx = [x[c].max() for c in range(C)]
    ma, mm = mlp(avg), mlp(mx)
    ca = [_sig(ma[c] + mm[c]) for c in range(C)]
    g = np.stack([ca[c] * x[c] for c in range(C)])
    pooled = np.stack([g.mean(axis=0), g.max(axis=0)])          # [mean_c; max_c]
    padded = np.zeros((2, H + 2, W + 2))
    padded[:, 1:-1, 1:-1] = pooled
    sa = np.zeros((H, W))
    for i in range(H):
        for j in range(W):
            s = 0.0
            for c in range(2):
                for di in range(3):
                    for dj in range(3):
                        s += w[c, di, dj] * padded[c, i + di, j + dj]
            sa[i, j] = _sig(s)
    expected = np.maximum(g * sa[None], 0.0)
    assert out.shape == (C, H, W)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert (out == 0).any() and (out > 0).any()   # the ReLU mattered


def test_channel_attention_values():
    ca = ChannelAttention(1, reduction=16)             # hidden = max(1 // 16, 1) = 1
    assert ca.fc1.weight.shape == (1, 1, 1, 1)
    with torch.no_grad():
        ca.fc1.weight.fill_(1.0)
        ca.fc2.weight.fill_(1.0)
    f = torch.tensor([[[[0.0, 1.0], [0.0, 3.0]]]])     # avg 1, max 3
    assert ca(f).item() == pytest.approx(_sig(1.0 + 3.0), abs=1e-6)
    with torch.no_grad():
        ca.fc2.weight.fill_(0.0)
    assert ca(f).item() == pytest.approx(0.5)
    assert ChannelAttention(4096, 16).fc1.out_channels == 256   # DAEN: reduction 16 -> 256 hidden


def test_spatial_attention_values():
    sa = SpatialAttention(kernel=1)
    with torch.no_grad():
        sa.conv.weight.copy_(torch.tensor([2.0, -1.0]).view(1, 2, 1, 1))   # 2 * mean_c - max_c
    f = torch.tensor([[[[1.0, 4.0]], [[3.0, -2.0]]]])   # (1, 2, 1, 2)
    got = sa(f)[0, 0, 0]
    assert got[0].item() == pytest.approx(_sig(2 * 2.0 - 3.0), abs=1e-6)
    assert got[1].item() == pytest.approx(_sig(2 * 1.0 - 4.0), abs=1e-6)
    assert SpatialAttention(7).conv.padding == (3, 3)


@pytest.mark.parametrize("name", ["none", "channel", "spatial", "csm"])
def test_build_attention_keeps_shape_and_is_nonnegative(name):
    mod = build_attention(name, 8, 4, 3)
    f = torch.randn(2, 8, 5, 6)
    out = mod(f)
    assert out.shape == f.shape and (out >= 0).all()
    if name == "none":
        assert torch.equal(out, torch.relu(f))
    else:
        assert sum(p.numel() for p in mod.parameters()) > 0


def test_build_attention_rejects_unknown():
    with pytest.raises(ValueError, match="model.attention"):
        build_attention("cbam", 8)


# ---------------------------------------------------------------------------------------------- PCM

def test_normalize_affinity_columns_sum_to_one():
    aff = torch.rand(2, 12, 12) * 3
    aff[0, :, 4] = 0.0                                 # an all-zero column stays finite (eps)
    n = normalize_affinity(aff)
    sums = n.sum(dim=1)
    assert torch.isfinite(n).all()
    np.testing.assert_allclose(sums[1].numpy(), np.ones(12), atol=1e-4)
    mask = torch.ones(12, dtype=torch.bool)
    mask[4] = False
    np.testing.assert_allclose(sums[0, mask].numpy(), np.ones(11), atol=1e-4)
    assert not torch.allclose(n.sum(dim=2), torch.ones(2, 12))   # rows are not what is normalised


def test_prepare_cam_background_and_argmax():
    cam = torch.zeros(1, 3, 1, 3)
    cam[0, 1] = torch.tensor([[4.0, 1.0, 0.0]])
    cam[0, 2] = torch.tensor([[1.0, 2.0, -1.0]])
    cam[0, 0] = 5.0                                    # the raw background channel is replaced
    p = prepare_cam(cam)
    # max-norm: fg1 = [1, .25, 0], fg2 = [.5, 1, 0] -> bg = 1 - max = [0, 0, 1]; non-max entries zeroed
    np.testing.assert_allclose(p[0, 0, 0].numpy(), [0.0, 0.0, 1.0], atol=1e-4)
    np.testing.assert_allclose(p[0, 1, 0].numpy(), [1.0, 0.0, 0.0], atol=1e-4)
    np.testing.assert_allclose(p[0, 2, 0].numpy(), [0.0, 1.0, 0.0], atol=1e-4)
    assert not p.requires_grad


def test_pcm_identical_features_average_the_cam():
    torch.manual_seed(0)
    pcm = PCM(c4=4, c5=6)
    with torch.no_grad():                              # positive weights: features identical and non-zero
        for conv in (pcm.proj4, pcm.proj5, pcm.proj):
            conv.weight.fill_(0.1)
    h = w = 2
    cam = torch.zeros(1, 3, h, w)
    cam[0, 1, 0, 0] = 2.0                              # class 1 at one pixel
    cam[0, 2, 0, 1] = 3.0                              # class 2 at another
    image = torch.full((1, 3, 16, 16), 0.5)
    f4 = torch.ones(1, 4, h, w)
    f5 = torch.ones(1, 6, 1, 1)                        # other resolution: resized to (h, w)
    out = pcm(cam, image, f4, f5)
    assert out.shape == (1, 3, h, w) and out.dtype == torch.float32
    # prepared: bg = [0, 0, 1, 1], fg1 = [1, 0, 0, 0], fg2 = [0, 1, 0, 0]; uniform affinity -> means
    expected = torch.tensor([0.5, 0.25, 0.25]).view(1, 3, 1, 1).expand(1, 3, h, w)
    np.testing.assert_allclose(out.detach().numpy(), expected.numpy(), atol=1e-4)


def test_pcm_gradients_reach_projections_not_backbone_or_cam():
    torch.manual_seed(0)
    pcm = PCM(c4=4, c5=6)
    cam = torch.randn(1, 3, 4, 4, requires_grad=True)
    f4 = torch.randn(1, 4, 4, 4, requires_grad=True)
    f5 = torch.randn(1, 6, 4, 4, requires_grad=True)
    out = pcm(cam, torch.randn(1, 3, 32, 32), f4, f5)
    out.square().sum().backward()
    assert cam.grad is None and f4.grad is None and f5.grad is None
    for conv in (pcm.proj4, pcm.proj5, pcm.proj):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- backbones

def _bn_frozen_check(backbone):
    bns = [m for m in backbone.modules() if isinstance(m, BN)]
    assert bns
    backbone.train()
    assert all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    before = [m.running_mean.clone() for m in bns[:3]]
    with torch.no_grad():
        backbone(torch.randn(1, 3, 32, 32) * 3 + 1)
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bns[:3]))


@pytest.fixture(scope="module")
def r38_net():
    """One ResNet-38 DAEN network shared by the ResNet-38 tests (it has ~107 M parameters)."""
    torch.manual_seed(0)
    return CAMNet(_cfg(backbone="resnet38", method="daen"), num_classes=3, load_weights=False)


def test_resnet38_shapes_and_frozen_parts(r38_net):
    bb = r38_net.backbone
    assert bb.out_channels == (512, 1024, 4096) and bb.frozen_bn
    with torch.no_grad():
        f4, f5, f6 = bb.eval()(torch.randn(1, 3, 64, 64))
    assert f4.shape == (1, 512, 8, 8) and f5.shape == (1, 1024, 8, 8) and f6.shape == (1, 4096, 8, 8)
    assert f6.dtype == torch.float32
    assert (f6 < 0).any()                               # f6_pre: before the final ReLU
    assert (f4 >= 0).all() and (f5 >= 0).all()          # conv4 / conv5 are bn-relu'd block inputs
    # SEAM freezes conv1a and b2..b2_2; b3 onwards trains
    assert not bb.conv1a.weight.requires_grad and not bb.b2_2.conv_branch2b1.weight.requires_grad
    assert bb.b3.conv_branch2a.weight.requires_grad and bb.b7.conv_branch2b2.weight.requires_grad
    # the b5/b6/b7 dilations and b6/b7 dropout as in SEAM
    assert bb.b6.conv_branch2b1.dilation == (4, 4) and bb.b5_1.conv_branch2a.dilation == (2, 2)
    assert bb.b5.conv_branch2a.dilation == (1, 1) and bb.b7.dropout_2b1.p == 0.5 and bb.b6.dropout_2b1.p == 0.3
    keys = set(bb.state_dict())
    assert {"conv1a.weight", "b2.conv_branch1.weight", "b4_5.bn_branch2b1.running_var",
            "b7.conv_branch2b2.weight", "bn7.weight"} <= keys
    _bn_frozen_check(bb)
    with pytest.raises(ValueError, match="model.output_stride"):
        build_backbone(_cfg(backbone="resnet38", output_stride=16).model)


@pytest.mark.parametrize("os_, hw5", [(8, 8), (16, 4)])
def test_resnet50_shapes_and_frozen_bn(os_, hw5):
    torch.manual_seed(0)
    bb = build_backbone(_cfg(backbone="resnet50", output_stride=os_).model)
    assert bb.out_channels == (512, 1024, 2048) and bb.frozen_bn
    assert not hasattr(bb, "fc")
    with torch.no_grad():
        f4, f5, f6 = bb.eval()(torch.randn(1, 3, 64, 64))
    assert f4.shape == (1, 512, 8, 8) and f5.shape == (1, 1024, hw5, hw5) and f6.shape == (1, 2048, hw5, hw5)
    assert (f6 < 0).any()                               # before layer4's last ReLU
    if os_ == 8:
        _bn_frozen_check(bb)


def test_tiny_backbone_trains_bn_and_has_stride_8():
    bb = build_backbone(_cfg(backbone="tiny", width=8).model)
    assert bb.out_channels == (16, 32, 64) and not bb.frozen_bn
    assert bb.stage6[0][0].dilation == (2, 2) and bb.down[1][0].stride == (2, 2)
    bb.train()
    f4, f5, f6 = bb(torch.randn(2, 3, 64, 48))
    assert f4.shape == (2, 16, 8, 6) and f5.shape == (2, 32, 8, 6) and f6.shape == (2, 64, 8, 6)
    assert all(m.training for m in bb.modules() if isinstance(m, BN))
    assert all(p.requires_grad for p in bb.parameters())
    assert (f6 < 0).any()


# ---------------------------------------------------------------------------------------------- CAMNet

@pytest.mark.parametrize("attention", ["none", "channel", "spatial", "csm"])
@pytest.mark.parametrize("method", ["cam", "daen"])
def test_camnet_tiny_outputs(attention, method):
    torch.manual_seed(0)
    cfg = _cfg(backbone="tiny", width=8, attention=attention, method=method)
    net = CAMNet(cfg, num_classes=5, load_weights=False)
    net.train()
    out = net(torch.randn(2, 3, 64, 64))
    assert out["cam"].shape == (2, 5, 8, 8)
    assert out["logits"].shape == (2, 4)
    torch.testing.assert_close(out["logits"], out["cam"][:, 1:].mean(dim=(2, 3)))
    assert len(out["feats"]) == 3 and out["feats"][2].shape == (2, 64, 8, 8)
    assert (out["feats"][2] >= 0).all()
    if method == "daen":
        assert out["cam_rv"].shape == (2, 5, 8, 8)
        assert net(torch.randn(1, 3, 64, 64), pcm=False)["cam_rv"] is None
    else:
        assert out["cam_rv"] is None and net.pcm is None
    if attention == "none":
        assert isinstance(net.attention, nn.ReLU)


def _check_big_camnet(net, hw):
    net.train()
    assert all(not m.training for m in net.backbone.modules() if isinstance(m, BN))
    assert net.dropout.training and net.attention.training
    with torch.no_grad():
        out = net(torch.randn(1, 3, 64, 64))
    assert out["cam"].shape == (1, 3, hw, hw) and out["cam_rv"].shape == (1, 3, hw, hw)
    assert out["logits"].shape == (1, 2) and out["cam"].dtype == torch.float32
    assert isinstance(net.attention, CSM)
    assert net.attention.channel.fc1.out_channels == net.backbone.out_channels[2] // 16


def test_camnet_resnet50_os16():
    torch.manual_seed(0)
    net = CAMNet(_cfg(backbone="resnet50", output_stride=16, method="daen"), num_classes=3, load_weights=False)
    _check_big_camnet(net, 4)


def test_camnet_resnet38(r38_net):
    _check_big_camnet(r38_net, 8)
    with pytest.warns(UserWarning, match="pretrained"):
        by_name = _check_groups(r38_net, _cfg().optim)
    assert "backbone.conv1a.weight" not in by_name and "backbone.bn7.weight" not in by_name
    assert by_name["backbone.b3.conv_branch2a.weight"]["lr_mult"] == 1.0
    assert by_name["pcm.proj4.weight"]["lr_mult"] == 10.0


def test_camnet_rejects_single_class():
    with pytest.raises(ValueError, match="num_classes"):
        CAMNet(_cfg(backbone="tiny", width=4), num_classes=1)


def _check_groups(net, optim):
    groups = net.param_groups(optim)
    seen: dict[int, dict] = {}
    for g in groups:
        assert g["lr"] == pytest.approx(optim.lr * g["lr_mult"])
        for p in g["params"]:
            assert id(p) not in seen, "parameter in two groups"
            seen[id(p)] = g
    trainable = {id(p): n for n, p in net.named_parameters() if p.requires_grad}
    assert set(seen) == set(trainable)
    return {trainable[i]: g for i, g in seen.items()}


def test_param_groups_tiny_daen():
    cfg = from_dict({"model": {"backbone": "tiny", "width": 4}, "method": {"name": "daen"},
                     "optim": {"new_lr_mult": 7.0, "lr": 0.02, "weight_decay": 1e-3}})
    net = CAMNet(cfg, num_classes=4)
    by_name = _check_groups(net, cfg.optim)
    assert by_name["classifier.weight"]["lr_mult"] == 7.0 and by_name["classifier.weight"]["weight_decay"] == 1e-3
    assert by_name["attention.channel.fc1.weight"]["lr_mult"] == 7.0
    assert by_name["attention.spatial.conv.weight"]["lr_mult"] == 7.0
    assert by_name["pcm.proj.weight"]["lr_mult"] == 7.0
    bias = next(n for n in by_name if n.startswith("backbone.") and n.endswith(".bias"))
    assert by_name[bias]["lr_mult"] == 2.0 and by_name[bias]["weight_decay"] == 0.0
    conv = next(n for n in by_name if n.startswith("backbone.") and n.endswith("0.weight"))
    assert by_name[conv]["lr_mult"] == 1.0 and by_name[conv]["weight_decay"] == 1e-3
    # a new-layer bias would get 2 x new_lr_mult without decay
    net.classifier.bias = nn.Parameter(torch.zeros(4))
    by_name = _check_groups(net, cfg.optim)
    assert by_name["classifier.bias"]["lr_mult"] == 14.0 and by_name["classifier.bias"]["weight_decay"] == 0.0
    opt = torch.optim.SGD(net.param_groups(cfg.optim), lr=cfg.optim.lr, momentum=0.9)
    assert len(opt.param_groups) == 4


def test_param_groups_resnet50_skip_frozen():
    cfg = _cfg(backbone="resnet50", output_stride=16, method="cam", attention="csm")
    net = CAMNet(cfg, num_classes=3, load_weights=False)
    with pytest.warns(UserWarning, match="pretrained"):
        by_name = _check_groups(net, cfg.optim)
    assert not any(".bn" in n or "downsample.1" in n for n in by_name)   # frozen BN excluded
    assert by_name["backbone.layer4.2.conv3.weight"]["lr_mult"] == 1.0
    assert by_name["attention.channel.fc2.weight"]["lr_mult"] == cfg.optim.new_lr_mult


# ---------------------------------------------------------------------------------------------- weights

def _tiny(seed: int):
    torch.manual_seed(seed)
    bb = build_backbone(_cfg(backbone="tiny", width=4).model)
    with torch.no_grad():       # make BN buffers differ between seeds too
        for m in bb.modules():
            if isinstance(m, BN):
                m.running_mean.uniform_()
    return bb


def test_load_pretrained_round_trip(tmp_path):
    src, dst = _tiny(1), _tiny(2)
    path = tmp_path / "tiny.pt"
    torch.save(src.state_dict(), path)
    assert not torch.equal(src.stem[0][0].weight, dst.stem[0][0].weight)
    load_pretrained(dst, str(path))
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), k
    # converted files carry no num_batches_tracked; DataParallel "module." prefixes are stripped
    sd = {f"module.{k}": v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": sd}, path)
    load_pretrained(_tiny(3), path)


def test_camnet_loads_pretrained_backbone(tmp_path):
    src = _tiny(1)
    path = tmp_path / "bb.pt"
    torch.save(src.state_dict(), path)
    cfg = _cfg(backbone="tiny", width=4, pretrained=str(path))
    net = CAMNet(cfg, num_classes=3)
    assert net.pretrained_loaded
    assert torch.equal(net.backbone.stage6[1][0].weight, src.stage6[1][0].weight)


def test_load_pretrained_missing_file(tmp_path):
    path = tmp_path / "nope" / "weights.pt"
    with pytest.raises(ValueError) as e:
        load_pretrained(_tiny(0), str(path))
    msg = str(e.value)
    assert str(path) in msg and "not found" in msg and "\n" not in msg


def test_load_pretrained_mismatched_keys(tmp_path):
    src = _tiny(0)
    sd = src.state_dict()
    path = tmp_path / "bad.pt"

    renamed = dict(sd)
    renamed["stem.0.0.weightX"] = renamed.pop("stem.0.0.weight")
    torch.save(renamed, path)
    with pytest.raises(ValueError) as e:
        load_pretrained(_tiny(1), path)
    msg = str(e.value)
    assert str(path) in msg and "stem.0.0.weight" in msg and "missing" in msg and "\n" not in msg

    extra = dict(sd, **{"head.weight": torch.zeros(3)})
    torch.save(extra, path)
    with pytest.raises(ValueError, match=r"unexpected key 'head\.weight'"):
        load_pretrained(_tiny(1), path)

    shaped = dict(sd)
    shaped["stage5.1.0.weight"] = torch.zeros(1, 1, 3, 3)
    torch.save(shaped, path)
    with pytest.raises(ValueError) as e:
        load_pretrained(_tiny(1), path)
    assert "shape" in str(e.value) and "stage5.1.0.weight" in str(e.value) and str(path) in str(e.value)

    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a torch state_dict"):
        load_pretrained(_tiny(1), path)


def test_load_pretrained_resnet50_ignores_fc(tmp_path):
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet50(weights=None)
    path = tmp_path / "r50.pt"
    torch.save(tv.state_dict(), path)                  # includes fc.*: dropped by pretrained_ignore
    cfg = _cfg(backbone="resnet50", output_stride=16, pretrained=str(path))
    bb = build_backbone(cfg.model)
    assert torch.equal(bb.layer3[0].conv2.weight, tv.layer3[0].conv2.weight)


def test_load_pretrained_from_s3(s3_server):
    from wsss.data import fs

    src = _tiny(5)
    import io

    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    uri = s3_server.unique_uri("weights") + "/tiny.pt"
    fs.write_bytes(uri, buf.getvalue())
    dst = load_pretrained(_tiny(6), uri)
    assert torch.equal(dst.stage6[0][0].weight, src.stage6[0][0].weight)
    missing = s3_server.unique_uri("weights") + "/absent.pt"
    with pytest.raises(ValueError) as e:
        load_pretrained(_tiny(6), missing)
    assert missing in str(e.value) and "not found" in str(e.value)
