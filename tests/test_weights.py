"""The official weights format: load, validate, save, download, cache, init."""

import functools
import hashlib
import http.server
import json
import threading

import jax
import msgpack
import numpy as np
import pytest

import velo_scale
from tests.reference_data import CHECKPOINT, REFERENCE_DIR
from velo_scale._src import weights as weights_lib


def _leaves_in_order(theta, prefix=()):
    for k, v in theta.items():
        if isinstance(v, dict):
            yield from _leaves_in_order(v, prefix + (k,))
        else:
            yield list(prefix + (k,)), v


def test_load_matches_manifest_sums(theta):
    manifest = json.loads((REFERENCE_DIR / "theta_perturbed.json").read_text())
    ours = {tuple(p): v for p, v in _leaves_in_order(theta)}
    arrays = [leaf for leaf in manifest["leaves"] if leaf["path"][0] == "params"]
    assert len(ours) == len(arrays) == 33  # + gen_id and step: 35 on disk
    for leaf in arrays:
        path = tuple(leaf["path"][1:])
        arr = ours[path]
        assert list(arr.shape) == leaf["shape"], path
        assert arr.dtype == np.float32
        np.testing.assert_allclose(arr.astype(np.float64).sum(), leaf["sum"], rtol=1e-9)
        np.testing.assert_allclose(
            np.abs(arr.astype(np.float64)).sum(), leaf["abs_sum"], rtol=1e-9
        )
    assert sum(v.size for v in ours.values()) == manifest["total_float_parameters"]
    assert velo_scale.Architecture.of(theta) == velo_scale.Architecture()


def test_save_round_trip_is_bit_identical(theta, tmp_path):
    out = tmp_path / "params"
    velo_scale.save_weights(out, theta)
    assert out.read_bytes() == CHECKPOINT.read_bytes()
    again = velo_scale.load_weights(out)
    for (pa, a), (pb, b) in zip(_leaves_in_order(theta), _leaves_in_order(again)):
        assert pa == pb
        np.testing.assert_array_equal(a, b)


def test_official_gen_id_and_step_are_accepted(theta, tmp_path):
    out = tmp_path / "params"
    velo_scale.save_weights(out, theta, gen_id="0" * 32, step=5620)
    # The official file's size: 35 bytes more than ours (README of the data).
    assert out.stat().st_size == velo_scale.OFFICIAL_WEIGHTS_BYTES
    velo_scale.load_weights(out)


def _write_raw(path, theta):
    root = {"params": theta, "gen_id": "", "step": 0}
    path.write_bytes(
        msgpack.packb(root, default=weights_lib._default, use_bin_type=True)
    )


def _copy(theta):
    return jax.tree_util.tree_map(np.array, theta)


def test_wrong_key_is_named(theta, tmp_path):
    bad = _copy(theta)
    bad["rnn_params"]["lstm"] = bad["rnn_params"].pop("rnn/linear")
    _write_raw(tmp_path / "p", bad)
    with pytest.raises(
        velo_scale.WeightsError, match=r"missing the key rnn_params/'rnn/linear'/b"
    ):
        velo_scale.load_weights(tmp_path / "p")


def test_extra_key_is_named(theta, tmp_path):
    bad = _copy(theta)
    bad["rnn_params"]["extra"] = {"w": np.zeros((2, 2), np.float32)}
    _write_raw(tmp_path / "p", bad)
    with pytest.raises(
        velo_scale.WeightsError, match="unexpected key rnn_params/extra/w"
    ):
        velo_scale.load_weights(tmp_path / "p")


def test_wrong_shape_is_named(theta, tmp_path):
    bad = _copy(theta)
    bad["ff_mod_stack"]["~"]["w0__7"] = np.zeros((256, 1, 4), np.float32)
    _write_raw(tmp_path / "p", bad)
    with pytest.raises(
        velo_scale.WeightsError,
        match=r"ff_mod_stack/~/w0__7 has shape \(256, 1, 4\).*needs \(256, 3, 4\)",
    ):
        velo_scale.load_weights(tmp_path / "p")


def test_architecture_mismatch_is_named(tmp_path):
    with pytest.raises(
        velo_scale.WeightsError, match="has shape .*lstm_hidden_size=128"
    ):
        velo_scale.load_weights(
            CHECKPOINT, architecture=velo_scale.Architecture(lstm_hidden_size=128)
        )


def test_truncated_file(tmp_path):
    path = tmp_path / "params"
    path.write_bytes(CHECKPOINT.read_bytes()[:100_000])
    with pytest.raises(velo_scale.WeightsError, match="truncated"):
        velo_scale.load_weights(path)


def test_not_a_weights_file(tmp_path):
    path = tmp_path / "params"
    path.write_bytes(msgpack.packb({"foo": 1}))
    with pytest.raises(
        velo_scale.WeightsError, match="expected a map with key 'params'"
    ):
        velo_scale.load_weights(path)


def test_missing_path(tmp_path):
    with pytest.raises(
        velo_scale.WeightsError, match="does not exist.*VELO_SCALE_WEIGHTS"
    ):
        velo_scale.load_weights(tmp_path / "nope")


def test_file_url_and_directory(theta, tmp_path):
    velo_scale.save_weights(tmp_path / "params", theta)
    a = velo_scale.load_weights(f"file://{tmp_path}/params")
    b = velo_scale.load_weights(tmp_path)  # a directory holding `params`
    np.testing.assert_array_equal(
        a["rnn_params"]["step_size"]["w"], b["rnn_params"]["step_size"]["w"]
    )


def test_env_var_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("VELO_SCALE_WEIGHTS", str(CHECKPOINT))
    monkeypatch.setenv("VELO_SCALE_CACHE", str(tmp_path / "cache"))
    theta = velo_scale.load_weights()
    assert theta["lstm_init_state"]["hidden"].shape == (1, 512)


def _closed_port_url():
    # Port 9 (discard) on loopback: nothing listens, the connection is refused.
    return "http://127.0.0.1:9/params"


def test_download_without_network_explains_the_fix(monkeypatch, tmp_path):
    monkeypatch.delenv("VELO_SCALE_WEIGHTS", raising=False)
    monkeypatch.setenv("VELO_SCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(weights_lib, "OFFICIAL_WEIGHTS_URL", _closed_port_url())
    with pytest.raises(velo_scale.WeightsError) as err:
        velo_scale.load_weights()
    msg = str(err.value)
    assert "could not be downloaded" in msg
    assert "9,282,564 bytes" in msg
    assert "VELO_SCALE_WEIGHTS" in msg and str(tmp_path / "cache") in msg
    assert not list((tmp_path).rglob("*.params")), "no partial file may be left"
    tx = velo_scale.velo(10, weights="official")  # builds without the file
    with pytest.raises(velo_scale.WeightsError, match="could not be downloaded"):
        tx.init({"w": np.ones((2,), np.float32)})


@pytest.fixture
def http_server(tmp_path):
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(tmp_path)
    )
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_is_cached_and_size_checked(monkeypatch, tmp_path, http_server):
    data = CHECKPOINT.read_bytes()
    (tmp_path / "params").write_bytes(data)
    monkeypatch.delenv("VELO_SCALE_WEIGHTS", raising=False)
    monkeypatch.setenv("VELO_SCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(weights_lib, "OFFICIAL_WEIGHTS_URL", f"{http_server}/params")
    # Wrong expected size: rejected, nothing cached.
    monkeypatch.setattr(weights_lib, "OFFICIAL_WEIGHTS_BYTES", len(data) + 35)
    with pytest.raises(velo_scale.WeightsError, match="expected 9,282,564"):
        velo_scale.load_weights()
    assert not velo_scale.default_cache_path().exists()
    monkeypatch.setattr(weights_lib, "OFFICIAL_WEIGHTS_BYTES", len(data))
    velo_scale.load_weights()
    cached = velo_scale.default_cache_path()
    assert hashlib.sha256(cached.read_bytes()).digest() == hashlib.sha256(data).digest()
    # Second call reads the cache: works with the server gone.
    monkeypatch.setattr(weights_lib, "OFFICIAL_WEIGHTS_URL", _closed_port_url())
    velo_scale.load_weights()


def test_https_url_source(tmp_path, http_server):
    (tmp_path / "params").write_bytes(CHECKPOINT.read_bytes())
    theta = velo_scale.load_weights(f"{http_server}/params")
    assert theta["rnn_params"]["rnn/linear"]["w"].shape == (1024, 2048)


@pytest.mark.parametrize(
    "sizes",
    [
        dict(),
        dict(lstm_hidden_size=16, param_inits=8),
        dict(ff_hidden_size=6, ff_hidden_layers=3),
    ],
)
def test_init_weights_structure_and_use(sizes, tmp_path):
    theta = velo_scale.init_weights(jax.random.PRNGKey(0), **sizes)
    arch = velo_scale.Architecture(**sizes)
    assert velo_scale.Architecture.of(theta) == arch
    velo_scale.save_weights(tmp_path / "p", theta)
    back = velo_scale.load_weights(tmp_path / "p", architecture=arch)
    np.testing.assert_array_equal(
        back["rnn_params"]["linear_1"]["w"], theta["rnn_params"]["linear_1"]["w"]
    )
    params = {"w": np.ones((3, 4), np.float32), "b": np.zeros((4,), np.float32)}
    tx = velo_scale.velo(10, weights=theta)
    state = tx.init(params)
    updates, _ = tx.update(params, state, params, loss=1.0)
    assert all(
        np.isfinite(np.asarray(u)).all() for u in jax.tree_util.tree_leaves(updates)
    )
