"""The segmentation stage in one process: model shapes per family at output stride 8/16, frozen BN and SGD groups,
backbone weights from a file, the loss with 255 ignored, the bad-input cases (missing / wrong-size / bad-class
label PNGs are rejected, a label folder with another class list is a one-line error), the CRF post-processing,
a short CPU training that beats an untrained net, checkpoint round trip and prediction PNGs, the CLI verbs."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.config import ConfigError
from wsss.data import fs
from wsss.data.io import decode_mask, encode_label_png
from wsss.seg.config import load_seg_config
from wsss.seg.data import LabelFolderError, label_uri
from wsss.seg.models import build_seg_model, seg_loss
from wsss.seg.predict import SegPredictor, crf_labels, evaluate_seg, load_seg_model, predict_folder
from wsss.seg.train import prepare_training, train_seg, untrained_miou

ROOT = Path(__file__).resolve().parents[1]
SYNTH = ROOT / "configs/synth_seg.yaml"


def _cfg(*ov):
    return load_seg_config(SYNTH, list(ov))


# ---- models ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,backbone", [("deeplabv3", "resnet50"), ("deeplabv2", "resnet50"),
                                           ("deeplabv1", "tiny"), ("light", "tiny")])
@pytest.mark.parametrize("os_", [8, 16])
def test_model_shapes_per_family(arch, backbone, os_):
    cfg = load_seg_config(None, [f"model.arch={arch}", f"model.backbone={backbone}", f"model.output_stride={os_}",
                                 "model.width=8"])
    net = build_seg_model(cfg, 5).eval()
    x = torch.randn(1, 3, 80, 64)
    with torch.no_grad():
        low = net.logits_at_stride(x)
        full = net(x)
    assert low.shape == (1, 5, 80 // os_, 64 // os_)
    assert full.shape == (1, 5, 80, 64)
    assert net.output_stride == os_


def test_deeplabv3_is_torchvisions_architecture():
    import torchvision

    cfg = load_seg_config(None, ["model.arch=deeplabv3", "model.backbone=resnet50"])
    ours = build_seg_model(cfg, 7).state_dict()
    tv = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=7,
                                                            aux_loss=False).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in tv.items()}
    assert cfg.aspp_rates() == [12, 24, 36]
    assert load_seg_config(None, ["model.arch=deeplabv3", "model.output_stride=16"]).aspp_rates() == [6, 12, 18]


def test_deeplabv2_aspp_rates_summed_and_param_groups():
    cfg = load_seg_config(None, ["model.backbone=resnet50"])  # defaults: deeplab-pytorch VOC
    assert cfg.model.arch == "deeplabv2" and cfg.aspp_rates() == [6, 12, 18, 24]
    assert (cfg.data.crop, cfg.optim.batch_size, cfg.optim.lr, cfg.optim.weight_decay) == (321, 10, 2.5e-4, 5e-4)
    net = build_seg_model(cfg, 21)
    assert [c.dilation[0] for c in net.classifier.convs] == [6, 12, 18, 24]
    groups = {g["name"]: g for g in net.param_groups(cfg.optim)}
    assert groups["new_weight"]["lr"] == pytest.approx(2.5e-3) and groups["new_weight"]["weight_decay"] == 5e-4
    assert groups["new_bias"]["lr"] == pytest.approx(5e-3) and groups["new_bias"]["weight_decay"] == 0.0
    assert groups["backbone_weight"]["lr"] == pytest.approx(2.5e-4)
    # frozen BN: eval mode under .train(), no grad for its affine parameters, and not in any SGD group
    net.train()
    bns = [m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training and not m.weight.requires_grad for m in bns)
    in_groups = {id(p) for g in groups.values() for p in g["params"]}
    assert not any(id(m.weight) in in_groups for m in bns)


def test_backbone_weights_from_a_file(tmp_path):
    import torchvision

    sd = torchvision.models.resnet50(weights=None).state_dict()
    sd = {k: (torch.randn_like(v) if v.is_floating_point() else v) for k, v in sd.items()}
    path = tmp_path / "r50.pt"
    torch.save(sd, path)
    cfg = load_seg_config(None, ["model.backbone=resnet50", f"model.pretrained={path}"])
    net = build_seg_model(cfg, 3)
    assert torch.equal(net.backbone.layer4[2].conv3.weight, sd["layer4.2.conv3.weight"])
    bad = tmp_path / "bad.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match=r"bad\.pt"):
        build_seg_model(load_seg_config(None, ["model.backbone=resnet50", f"model.pretrained={bad}"]), 3)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.arch"):
        load_seg_config(None, ["model.arch=unet"])
    with pytest.raises(ConfigError, match="model.backbone"):
        load_seg_config(None, ["model.arch=deeplabv2", "model.backbone=tiny"])
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        load_seg_config(None, ["optim.lrr=1"])
    for f in ("seg_deeplabv2_voc.yaml", "seg_deeplabv1_r38_voc.yaml", "synth_seg.yaml"):
        load_seg_config(ROOT / "configs" / f)
    r38 = load_seg_config(ROOT / "configs/seg_deeplabv1_r38_voc.yaml")
    assert (r38.data.crop, r38.optim.lr, r38.optim.max_steps, r38.model.backbone) == (448, 1e-3, 20000, "resnet38")


# ---- loss -----------------------------------------------------------------------------------------------

def test_loss_ignores_255():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 6, requires_grad=True)
    target = torch.randint(0, 4, (2, 6, 6))
    target[0, :3] = 255
    loss = seg_loss(logits, target)
    valid = target != 255
    ref = torch.nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[valid], target[valid])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    loss.backward()
    assert logits.grad[0, :, :3].abs().max() == 0  # ignored pixels send no gradient
    assert logits.grad[0, :, 3:].abs().max() > 0
    # logits at stride are upsampled to the label size
    assert seg_loss(torch.zeros(1, 4, 3, 3), torch.zeros(1, 6, 6, dtype=torch.long)).item() == pytest.approx(np.log(4))
    # a batch without a valid pixel: 0, finite, zero gradient (torch's mean would be NaN)
    z = torch.randn(1, 4, 6, 6, requires_grad=True)
    l0 = seg_loss(z, torch.full((1, 6, 6), 255))
    l0.backward()
    assert l0.item() == 0.0 and torch.isfinite(z.grad).all() and z.grad.abs().max() == 0


# ---- bad input ------------------------------------------------------------------------------------------

def _label_folder(synth_root, dst: Path, split="train") -> list[str]:
    """A pseudo-label-like folder: the masks of ``split`` as <id>.png."""
    from wsss.data import open_dataset

    ds = open_dataset(str(synth_root), split)
    dst.mkdir(parents=True, exist_ok=True)
    for i in ds.ids:
        (dst / f"{i}.png").write_bytes(encode_label_png(ds.load_mask(i)))
    return list(ds.ids)


def test_bad_labels_are_rejected_and_the_rest_trains(synth_root, tmp_path):
    labels = tmp_path / "pseudo"
    ids = _label_folder(synth_root, labels)
    (labels / f"{ids[0]}.png").unlink()                                   # missing
    (labels / f"{ids[1]}.png").write_bytes(encode_label_png(np.zeros((10, 12), np.uint8)))  # wrong size
    m = decode_mask((labels / f"{ids[2]}.png").read_bytes(), "x").copy()
    m[0, 0] = 42                                                          # class index beyond the dataset's
    (labels / f"{ids[2]}.png").write_bytes(encode_label_png(m))
    cfg = _cfg(f"data.root={synth_root}", f"data.labels={labels}", "optim.max_steps=2", "optim.batch_size=4")
    _, _, ok, rejects = prepare_training(cfg)
    reasons = dict(rejects)
    assert set(reasons) == set(ids[:3]) and ok == ids[3:]
    assert "missing" in reasons[ids[0]] and "12x10 (WxH)" in reasons[ids[1]]
    assert "class index 42" in reasons[ids[2]]
    assert all("\n" not in r for r in reasons.values())
    res = train_seg(cfg, str(tmp_path / "ckpt"), progress=False, evaluate=False)
    assert res["steps"] == 2 and res["n_train"] == len(ids) - 3
    assert {r[0] for r in res["rejects"]} == set(ids[:3])
    assert label_uri(str(labels), "a") == fs.join(str(labels), "a.png")


def test_label_folder_with_other_classes_is_one_line_error(synth_root, tmp_path):
    labels = tmp_path / "pseudo"
    _label_folder(synth_root, labels)
    (labels / "classes.txt").write_text("background\ncat\ndog\n")
    cfg = _cfg(f"data.root={synth_root}", f"data.labels={labels}", "optim.max_steps=1")
    with pytest.raises(LabelFolderError) as e:
        train_seg(cfg, str(tmp_path / "ckpt"), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and str(labels) in msg and "3 classes" in msg
    with pytest.raises(LabelFolderError, match="not found"):
        prepare_training(_cfg(f"data.root={synth_root}", f"data.labels={tmp_path / 'nope'}"))


# ---- CRF post-processing --------------------------------------------------------------------------------

def test_crf_snaps_blurred_probabilities_to_the_edge():
    from wsss.seg.config import deeplab_crf

    h, w = 40, 40
    image = np.zeros((h, w, 3), np.uint8)
    image[:, 20:] = 255                              # a sharp edge at column 20
    p1 = np.clip((np.arange(w) - 8) / 16.0, 0, 1)    # a soft ramp at 0.5 on column 16: the edge 4 px too early
    probs = np.stack([1 - p1, p1])[:, None, :].repeat(h, 1).astype(np.float32)
    truth = (np.arange(w) >= 20).astype(np.uint8)[None].repeat(h, 0)
    plain = probs.argmax(0)
    refined = crf_labels(image, probs, deeplab_crf())
    assert (plain != truth).mean() > 0.05
    assert (refined != truth).mean() < (plain != truth).mean() / 2


# ---- training ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from wsss.data.synth import make_synthetic

    root = tmp_path_factory.mktemp("seg-synth") / "synth"
    make_synthetic(str(root), num_images=160, size=64, seed=5, val_fraction=0.2)
    out = tmp_path_factory.mktemp("seg-ckpt") / "seg"
    cfg = _cfg(f"data.root={root}", "optim.max_steps=150", "eval.max_images=24", "eval.scales=[1.0,1.25]")
    res = train_seg(cfg, str(out), progress=False)
    return cfg, res, out, root


def test_short_training_beats_untrained(trained):
    from wsss.seg.data import open_images

    cfg, res, out, root = trained
    assert res["steps"] == 150 and res["loss_last"] < res["loss_first"]
    val = res["val"]
    assert set(val["protocols"]) == {"single", "multi", "single+crf", "multi+crf"}
    floor = untrained_miou(cfg, open_images(str(root), "val"))["single"]["miou"]
    assert val["single"]["miou"] > floor + 0.03, (val["single"]["miou"], floor)
    assert val["multi"]["miou"] > floor + 0.03
    assert val["n_images"] == 24


def test_checkpoint_round_trip_and_prediction(trained, tmp_path):
    from wsss.data import open_dataset
    from wsss.metrics import evaluate_folder

    cfg, res, out, root = trained
    model, cfg2, meta = load_seg_model(str(out), device="cpu")
    assert meta["kind"] == "seg" and meta["step"] == 150 and meta["arch"] == "light"
    assert cfg2.to_dict() == cfg.to_dict()
    val = open_dataset(str(root), "val")
    img = val.load_image(val.ids[0])
    probs = SegPredictor(model, cfg2, scales=[1.0], flip=False).probs(img)
    assert probs.shape == (val.num_classes,) + img.shape[:2]
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    # the same numbers as the training's own evaluation
    ev = evaluate_seg(model, cfg2, val, ["single"], max_images=24)
    assert ev["single"]["miou"] == pytest.approx(res["val"]["single"]["miou"], abs=1e-9)
    # label PNGs for a plain image folder (no layout), resumable
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in val.ids[:5]:
        shutil.copy(root / "JPEGImages" / f"{i}.jpg", folder / f"{i}.jpg")
    (folder / "broken.jpg").write_bytes(b"not an image")
    pred = tmp_path / "pred"
    r = predict_folder(str(out), str(folder), str(pred), progress=False)
    assert r["n_written"] == 5 and [i for i, _ in r["rejects"]] == ["broken"]
    lab = decode_mask((pred / f"{val.ids[0]}.png").read_bytes(), "p")
    assert np.array_equal(lab, probs.argmax(0))
    assert predict_folder(str(out), str(folder), str(pred), progress=False)["n_skipped"] == 5
    # over the dataset itself with CRF; scored by the project's evaluator
    pred2 = tmp_path / "pred-val"
    predict_folder(str(out), str(root), str(pred2), split="val", crf=True, progress=False, max_images=24)
    scored = evaluate_folder(str(pred2), str(root), split="val")
    assert scored["n_images"] == 24
    assert scored["miou"] == pytest.approx(res["val"]["single+crf"]["miou"], abs=1e-9)


def test_cli_train_seg_and_predict_seg(synth_root, tmp_path, capsys):
    from wsss.cli import main

    labels = tmp_path / "pseudo"
    _label_folder(synth_root, labels)
    out = tmp_path / "ck"
    rc = main(["--quiet", "train-seg", "--config", str(SYNTH), "--data", str(synth_root), "--labels", str(labels),
               "--out", str(out), "--set", "optim.max_steps=3", "--set", "optim.batch_size=4",
               "--set", "eval.crf=false", "--set", "eval.scales=[1.0]"])
    text = capsys.readouterr().out
    assert rc == 0 and "train-seg: 3 steps" in text and "single" in text
    rc = main(["--quiet", "predict-seg", "--checkpoint", str(out), "--data", str(synth_root), "--split", "val",
               "--out", str(tmp_path / "p")])
    assert rc == 0 and "predict-seg: " in capsys.readouterr().out
    assert len(list((tmp_path / "p").glob("*.png"))) == 6
    rc = main(["predict-seg", "--checkpoint", str(labels), "--data", str(synth_root), "--out", str(tmp_path / "q")])
    assert rc == 2 and "not a wsss checkpoint" in capsys.readouterr().err
