"""The quick-start job and its real data (Fashion-MNIST idx files)."""

import numpy as np
import pytest

from velo_scale import cli
from velo_scale._src import weights as weights_lib
from velo_scale.data import load_fashion_mnist
from velo_scale.demo import run_demo


def test_fashion_mnist_is_real():
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (
        10000,
        28,
        28,
    )
    assert train.images.dtype == np.uint8
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert 70 < train.images.mean() < 80  # Fashion-MNIST's mean pixel is ~72.9


def test_fashion_mnist_missing_dir_explains(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="apt-get install dataset-fashion-mnist"
    ):
        load_fashion_mnist("train", data_dir=str(tmp_path))


def test_demo_trains_with_adamw():
    result = run_demo(optimizer="adamw", num_steps=60, log_every=0)
    assert result["test_accuracy"] > 0.6
    assert result["train_loss"] < 1.2


def test_demo_runs_velo_with_given_weights(reference_dir):
    # The test checkpoint is a perturbed, untrained network: this checks the
    # wiring (weights from a path, loss passed every step), not training quality.
    result = run_demo(
        optimizer="velo",
        num_steps=3,
        weights=str(reference_dir / "theta_perturbed.msgpack"),
        log_every=0,
    )
    assert np.isfinite(result["train_loss"])


def test_cli_without_weights_exits_with_help(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("VELO_SCALE_WEIGHTS", raising=False)
    monkeypatch.setenv("VELO_SCALE_CACHE", str(tmp_path))
    monkeypatch.setattr(
        weights_lib, "OFFICIAL_WEIGHTS_URL", "http://127.0.0.1:9/params"
    )
    assert cli.main(["demo", "--num_steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "VELO_SCALE_WEIGHTS" in err and "could not be downloaded" in err
