import pytest

from wsss import config
from wsss.config import ConfigError


def test_defaults_follow_the_papers():
    cfg = config.load()
    assert cfg.method.name == "daen" and cfg.attention == "csm"
    assert cfg.optim.lr == 0.01 and cfg.optim.power == 0.9 and cfg.optim.batch_size == 8
    assert cfg.infer.scales == [0.5, 1.0, 1.5, 2.0] and cfg.infer.flip
    assert cfg.rw.beta == 8 and cfg.rw.logt == 8 and cfg.affinity.radius == 5
    assert config.from_dict({"method": {"name": "seam"}}).attention == "none"
    assert config.from_dict({"method": {"name": "seam"}, "model": {"attention": "channel"}}).attention == "channel"


def test_unknown_key_is_one_line_error_naming_it(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  backbone: tiny\n  atention: csm\n")
    with pytest.raises(ConfigError) as e:
        config.load(p)
    msg = str(e.value)
    assert "model.atention" in msg and "\n" not in msg


@pytest.mark.parametrize("override,key", [
    ("model.backbone=vgg", "model.backbone"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.batch_size=abc", "optim.batch_size"),
    ("method.name=foo", "method.name"),
    ("infer.flip=maybe", "infer.flip"),
    ("nosuch.key=1", "nosuch"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        config.load(None, [override])
    assert key in str(e.value)


def test_overrides_and_yaml_round_trip(tmp_path):
    cfg = config.load(None, ["optim.lr=0.005", "infer.scales=[1.0, 2.0]", "model.pretrained=null", "seed=3"])
    assert cfg.optim.lr == 0.005 and cfg.infer.scales == [1.0, 2.0] and cfg.seed == 3
    p = tmp_path / "out.yaml"
    cfg.save(p)
    again = config.load(p)
    assert again.to_dict() == cfg.to_dict()


def test_shipped_configs_load():
    from pathlib import Path

    from wsss.seg.config import load_seg_config

    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert files
    for f in files:  # segmentation-network configs (seg_*.yaml, synth_seg.yaml) have their own typed schema
        (load_seg_config if "seg" in f.stem.split("_") else config.load)(f)
