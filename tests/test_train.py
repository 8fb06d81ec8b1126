"""A short CPU training on synthetic data: the loss falls and CAM mIoU beats the untrained network;
checkpoints round-trip; CAM inference shapes and file format; the CLI verbs run end to end."""
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss import config
from wsss.cam import CamInferencer, cam_labels, infer_cams, load_cam, save_cam
from wsss.checkpoint import load_cam_model, load_checkpoint, save_checkpoint
from wsss.data import open_dataset
from wsss.train import build_model, evaluate_cams, train

CFG = Path(__file__).resolve().parents[1] / "configs/synth_daen_tiny.yaml"


def _cfg(root, *ov):
    return config.load(CFG, [f"data.root={root}", "optim.epochs=1000", "optim.max_steps=60", "infer.scales=[1.0]", *ov])


@pytest.fixture(scope="module")
def train_root(tmp_path_factory):
    from wsss.data.synth import make_synthetic

    root = tmp_path_factory.mktemp("train-synth") / "synth"
    make_synthetic(str(root), num_images=400, size=64, seed=7, val_fraction=0.15)
    return str(root)


@pytest.fixture(scope="module")
def trained(train_root, tmp_path_factory):
    # plain CAM: the short training this test can afford must learn; the siamese objectives are tested in
    # test_equivariance_losses.py and through Ray Train in test_ray_train.py
    out = tmp_path_factory.mktemp("ckpt") / "cam"
    cfg = _cfg(train_root, "optim.max_steps=600", "method.name=cam", "model.attention=none")
    res = train(cfg, str(out), progress=False)
    return cfg, res, out


def test_training_loss_falls_and_cam_beats_untrained(trained, train_root):
    cfg, res, out = trained
    assert res["steps"] == 600
    assert res["loss_last"] < res["loss_first"] * 0.9
    val = open_dataset(train_root, "val")
    torch.manual_seed(0)
    untrained = evaluate_cams(build_model(cfg, val.num_classes).eval(), cfg, val)["miou"]
    assert res["val_cam_miou"] > untrained + 0.02, (res["val_cam_miou"], untrained)


def test_checkpoint_round_trip(trained):
    cfg, res, out = trained
    state, cfg2, meta, metrics = load_checkpoint(str(out))
    assert cfg2.to_dict() == cfg.to_dict()
    assert meta["kind"] == "cam" and meta["class_names"][0] == "background"
    assert metrics["steps"] == 600
    model, cfg3, _ = load_cam_model(str(out), device=torch.device("cpu"))
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_missing_checkpoint_is_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_checkpoint(str(tmp_path / "nope"))
    assert "nope" in str(e.value) and "\n" not in str(e.value)


def test_cam_inference_format(trained, train_root, tmp_path):
    cfg, res, out = trained
    model, cfg, meta = load_cam_model(str(out))
    ds = open_dataset(train_root, "val")
    i = ds.ids[0]
    img, lab = ds.load_image(i), ds.labels(i)
    cam, keys = CamInferencer(model, cfg, scales=[1.0, 1.5])(img, lab)
    assert cam.shape == (int(lab.sum()), *img.shape[:2]) and cam.dtype == np.float32
    assert keys.tolist() == (np.nonzero(lab)[0] + 1).tolist()
    assert cam.min() >= 0 and cam.max() <= 1 and np.allclose(cam.reshape(len(keys), -1).max(1), 1, atol=1e-3)
    save_cam(str(tmp_path / "a.npz"), cam, keys)
    cam2, keys2 = load_cam(str(tmp_path / "a.npz"))
    assert np.abs(cam2 - cam).max() < 1e-3 and keys2.tolist() == keys.tolist()
    with np.load(tmp_path / "a.npz") as z:
        assert z["cam"].dtype == np.float16 and z["keys"].dtype == np.int16 and z["hw"].tolist() == list(img.shape[:2])
    lbl = cam_labels(cam, keys, 0.3)
    assert lbl.dtype == np.uint8 and set(np.unique(lbl)) <= {0, *keys.tolist()}


def test_infer_cams_resumes_and_rejects(trained, train_root, tmp_path):
    import shutil

    cfg, res, out = trained
    data = tmp_path / "data"
    shutil.copytree(train_root, data)
    ds = open_dataset(str(data), "val")
    bad = ds.ids[1]
    (data / "JPEGImages" / f"{bad}.jpg").write_bytes(b"not a jpeg")
    r1 = infer_cams(str(out), str(data), str(tmp_path / "cams"), split="val", progress=False,
                    overrides=["infer.scales=[1.0]"])
    assert r1["written"] == len(ds.ids) - 1 and [i for i, _ in r1["rejects"]] == [bad]
    assert bad in (tmp_path / "cams" / "rejects.csv").read_text()
    r2 = infer_cams(str(out), str(data), str(tmp_path / "cams"), split="val", progress=False,
                    overrides=["infer.scales=[1.0]"])
    assert r2["written"] == 0 and r2["skipped_existing"] == len(ds.ids) - 1


def test_cli_end_to_end(trained, train_root, tmp_path, capsys):
    from wsss.cli import main

    cfg, res, out = trained
    cams = tmp_path / "cams"
    assert main(["--quiet", "cams", "--checkpoint", str(out), "--data", train_root, "--split", "val",
                 "--out", str(cams), "--labels", "--set", "infer.scales=[1.0]"]) == 0
    js = tmp_path / "eval.json"
    assert main(["evaluate", "--pred", str(cams / "labels"), "--data", train_root, "--split", "val",
                 "--json", str(js)]) == 0
    out_txt = capsys.readouterr().out
    assert "mIoU" in out_txt
    import json

    assert 0 <= json.loads(js.read_text())["miou"] <= 1
    assert main(["evaluate", "--cams", str(cams), "--data", train_root, "--split", "val"]) == 0
    assert main(["train", "--config", str(CFG), "--set", "optim.max_steps=oops"]) == 2
    assert "optim.max_steps" in capsys.readouterr().err


def test_backward_step_through_a_grad_scaler_matches_plain_step():
    """The fp16 path (GradScaler: scale, unscale before clipping, step) updates exactly like the plain one; on the
    CPU no scaler is made (bf16/fp32 need none). A CPU GradScaler stands in for the CUDA one here."""
    from wsss.train import backward_step, grad_scaler

    assert grad_scaler(torch.device("cpu"), True) is None
    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    nets = [torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)]
    nets[1].load_state_dict(nets[0].state_dict())
    for clip in (None, 0.05):
        for k, net in enumerate(nets):
            opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) if k else None
            for _ in range(3):
                loss = torch.nn.functional.mse_loss(net(x), y)
                backward_step(loss, opt, net.parameters(), clip, scaler)
        for p0, p1 in zip(nets[0].parameters(), nets[1].parameters()):
            assert torch.allclose(p0, p1, atol=1e-6)
    # a step whose scaled gradients overflow is skipped, not applied
    net = nets[1]
    before = [p.detach().clone() for p in net.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    backward_step(net(x).sum() * float("inf"), opt, net.parameters(), None, scaler)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters())) and scaler.get_scale() < 2.0 ** 12
