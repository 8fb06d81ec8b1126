"""Data fixtures shared by every test module (loaded as a pytest plugin from conftest.py).

- ``synth_root``: a small synthetic VOC-layout dataset (24 images, 64 px, seed 0) built once per session.
- ``voc_sample``: the real PASCAL VOC 2012 val sample (13 images) from ../shared/data beside the repository;
  tests using it are skipped when it is absent.
"""
from __future__ import annotations

from pathlib import Path

import pytest

VOC_SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/voc2012-val-sample"


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    from wsss.data.synth import make_synthetic

    root = tmp_path_factory.mktemp("synth") / "synth"
    make_synthetic(str(root), num_images=24, size=64, seed=0)
    return root


@pytest.fixture(scope="session")
def voc_sample() -> Path:
    if not (VOC_SAMPLE / "JPEGImages").is_dir():
        pytest.skip(f"real VOC sample not found at {VOC_SAMPLE}")
    return VOC_SAMPLE
