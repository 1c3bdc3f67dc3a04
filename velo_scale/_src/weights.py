"""VeLO meta-parameters: the official checkpoint format, download, cache, init.

The official file (`params`) is flax `serialization.to_bytes` of
`ParameterCheckpoint(params=theta, gen_id: str, step: int)`: a msgpack map
`{"params": theta, "gen_id": ..., "step": ...}` whose arrays are msgpack
extension type 1 holding msgpack `[shape, dtype name, raw little-endian
bytes]`. `theta` is

    ff_mod_stack/~/{w0__0..w0__13 [K, c_i, F], b0 [K, F], w1 [K, F, F], b1,
                    ..., wL [K, F, 3], bL [K, 3]}
    lstm_init_state/{hidden, cell} [1, H]
    rnn_params/{linear, linear_1, linear_2} {w [30, H], b [H]},
               "rnn/linear" {w [2H, 4H], b [4H]} (one key with a slash),
               rnn_to_controls {w [H, K], b [K]}, step_size {w [H, 1], b [1]}

with H = 512 (LSTM), K = 256 (MLP bank), F = 4 and L = 2 for the official
weights. This module reads and writes that format with `msgpack` alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from importlib import resources
from typing import Any

import jax
import msgpack
import numpy as np

from velo_scale._src import param_net, tensor_net

Theta = dict[str, Any]

OFFICIAL_WEIGHTS_NAME = "aug12_continue_on_bigger_2xbs_200kstep_bigproblem_v2_5620"
OFFICIAL_WEIGHTS_URL = (
    "https://storage.googleapis.com/gresearch/learned_optimization/"
    f"pretrained_lopts/{OFFICIAL_WEIGHTS_NAME}/params"
)
OFFICIAL_WEIGHTS_BYTES = 9_282_564
WEIGHTS_ENV = "VELO_SCALE_WEIGHTS"
# Weights made by velo_scale's meta-training (`velo_scale.meta`); `"auto"`
# uses them when the official file is not on this machine.
PROJECT_WEIGHTS_ENV = "VELO_SCALE_PROJECT_WEIGHTS"
CACHE_ENV = "VELO_SCALE_CACHE"
_CACHE_FILE = f"{OFFICIAL_WEIGHTS_NAME}.params"
_MSGPACK_NDARRAY = 1
_MSGPACK_NPSCALAR = 3

_OFFLINE_HELP = (
    "VeLO needs its meta-parameters: the official file '{name}' ({size:,} bytes), "
    "from {url}. It could not be downloaded ({why}). On a machine without "
    "internet, copy that file here and either\n"
    "  * put it at {cache} (the user cache; set ${cache_env} to move the cache), or\n"
    "  * point ${env} at it: export {env}=/path/to/params, or\n"
    "  * pass it explicitly: velo_scale.velo(num_steps, weights='/path/to/params')."
)


class WeightsError(ValueError):
    """A weights file is missing, truncated or does not match the architecture."""


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Sizes of the VeLO network (defaults: the official checkpoint).

    Attributes:
      lstm_hidden_size: H, width of the per-tensor LSTM.
      param_inits: K, number of MLPs in the per-parameter bank.
      ff_hidden_size: F, width of the per-parameter MLP's hidden layers.
      ff_hidden_layers: L, number of hidden layers of the per-parameter MLP.
    """

    lstm_hidden_size: int = 512
    param_inits: int = 256
    ff_hidden_size: int = 4
    ff_hidden_layers: int = 2

    def expected_shapes(self) -> dict[tuple[str, ...], tuple[int, ...]]:
        """Every leaf path of theta (on-disk order) and its shape."""
        h, k, f = self.lstm_hidden_size, self.param_inits, self.ff_hidden_size
        nf = tensor_net.NUM_TENSOR_FEATURES
        ff = ("ff_mod_stack", "~")
        shapes: dict[tuple[str, ...], tuple[int, ...]] = {}
        bank: dict[str, tuple[int, ...]] = {}
        for i, c in enumerate(param_net.INPUT_GROUP_WIDTHS):
            bank[f"w0__{i}"] = (k, c, f)
        widths = [f] * self.ff_hidden_layers + [param_net.NUM_OUTPUTS]
        for layer, width in enumerate(widths):
            bank[f"b{layer}"] = (k, width)
            if layer:
                bank[f"w{layer}"] = (k, widths[layer - 1], width)
        for name in sorted(bank):
            shapes[ff + (name,)] = bank[name]
        shapes[("lstm_init_state", "hidden")] = (1, h)
        shapes[("lstm_init_state", "cell")] = (1, h)
        rnn = {
            "linear": (nf, h),
            "linear_1": (nf, h),
            "linear_2": (nf, h),
            "rnn/linear": (2 * h, 4 * h),  # [mixed x (H), h (H)] -> 4 gates
            "rnn_to_controls": (h, k),
            "step_size": (h, 1),
        }
        for name in sorted(rnn):
            fan_in, fan_out = rnn[name]
            shapes[("rnn_params", name, "b")] = (fan_out,)
            shapes[("rnn_params", name, "w")] = (fan_in, fan_out)
        return shapes

    @classmethod
    def of(cls, theta: Mapping[str, Any]) -> Architecture:
        """Infers the sizes from a theta dict (validate with `validate`)."""
        try:
            bank = theta["ff_mod_stack"]["~"]
            return cls(
                lstm_hidden_size=int(np.shape(theta["lstm_init_state"]["hidden"])[-1]),
                param_inits=int(np.shape(bank["b0"])[0]),
                ff_hidden_size=int(np.shape(bank["b0"])[-1]),
                ff_hidden_layers=param_net.num_hidden_layers(bank),
            )
        except (KeyError, TypeError, IndexError) as e:
            raise WeightsError(
                f"VeLO weights lack the key {e} needed to read the architecture; "
                "expected the official layout (ff_mod_stack/~/b0, "
                "lstm_init_state/hidden, rnn_params/...)."
            ) from None


def validate(
    theta: Mapping[str, Any], architecture: Architecture | None = None
) -> None:
    """Checks every key and shape of theta; raises `WeightsError` on the first
    mismatch, naming the key path."""
    architecture = architecture or Architecture.of(theta)
    expected = architecture.expected_shapes()
    found = dict(_flatten(theta))
    for path, shape in expected.items():
        name = "/".join(repr(p) if "/" in p else p for p in path)
        if path not in found:
            raise WeightsError(
                f"VeLO weights are missing the key {name} (shape {shape}) for "
                f"{architecture}."
            )
        got = tuple(np.shape(found[path]))
        if got != shape:
            raise WeightsError(
                f"VeLO weights key {name} has shape {got}, but {architecture} "
                f"needs {shape}."
            )
        value = found[path]
        dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
        if dtype != np.float32:
            raise WeightsError(
                f"VeLO weights key {name} has dtype {dtype}; the format stores float32."
            )
        bad = int(np.size(value) - np.count_nonzero(np.isfinite(np.asarray(value))))
        if bad:
            raise WeightsError(
                f"VeLO weights key {name} has {bad} non-finite (NaN or inf) "
                f"value(s) of {np.size(value)}; the file is corrupt or was written "
                "by a diverged meta-training run. Use an intact weights file (the "
                "official one, or export an earlier meta-training checkpoint)."
            )
    extra = sorted(set(found) - set(expected))
    if extra:
        name = "/".join(extra[0])
        raise WeightsError(
            f"VeLO weights have an unexpected key {name}; {architecture} has no "
            "such parameter (is this a different optimizer's checkpoint?)."
        )


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


# --- msgpack format -----------------------------------------------------------


class _FormatError(ValueError):
    """An array record inside the msgpack stream is malformed."""


def _ext_hook(code: int, data: bytes):
    if code in (_MSGPACK_NDARRAY, _MSGPACK_NPSCALAR):
        try:
            shape, dtype, buf = msgpack.unpackb(data, raw=True)
            dtype = np.dtype(dtype.decode())
            arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
        except (TypeError, ValueError, AttributeError, msgpack.UnpackException) as e:
            raise _FormatError(f"an array record cannot be decoded ({e})") from None
        return arr[()] if code == _MSGPACK_NPSCALAR else arr.copy()
    return msgpack.ExtType(code, data)


def _default(obj):
    if isinstance(obj, (np.ndarray, jax.Array)):
        arr = np.ascontiguousarray(np.asarray(obj))
        payload = msgpack.packb(
            (list(arr.shape), arr.dtype.name, arr.tobytes("C")), use_bin_type=True
        )
        return msgpack.ExtType(_MSGPACK_NDARRAY, payload)
    raise TypeError(f"cannot serialise {type(obj)} in VeLO weights")


def _decode(data: bytes, source: str) -> tuple[Theta, str, int]:
    try:
        root = msgpack.unpackb(data, ext_hook=_ext_hook, strict_map_key=False)
    except _FormatError as e:
        raise WeightsError(
            f"{source} is not a valid VeLO weights file: {e}. The file is "
            "corrupt: replace it with an intact copy (the official file has "
            f"{OFFICIAL_WEIGHTS_BYTES:,} bytes)."
        ) from None
    except (
        ValueError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
    ) as e:
        raise WeightsError(
            f"{source} is not a valid VeLO weights file ({len(data):,} bytes; "
            f"msgpack error: {e}). The official file has "
            f"{OFFICIAL_WEIGHTS_BYTES:,} bytes; a shorter file is truncated: "
            "download it again."
        ) from None
    if not isinstance(root, dict) or "params" not in root:
        keys = list(root) if isinstance(root, dict) else type(root).__name__
        raise WeightsError(
            f"{source} is not a VeLO weights file: expected a map with key "
            f"'params' (and 'gen_id', 'step'), found {keys}."
        )
    gen_id = root.get("gen_id", "")
    step = root.get("step", 0)
    if isinstance(gen_id, bytes):
        gen_id = gen_id.decode()
    if not isinstance(gen_id, str) or not isinstance(step, (int, np.integer)):
        raise WeightsError(
            f"{source}: 'gen_id' must be a string and 'step' an integer, got "
            f"{gen_id!r} and {step!r}."
        )
    return root["params"], gen_id, int(step)


def _canonical(theta: Mapping[str, Any], architecture: Architecture) -> Theta:
    """Nested dict in on-disk order with numpy float32 leaves."""
    found = dict(_flatten(theta))
    out: Theta = {}
    for path in architecture.expected_shapes():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.asarray(found[path], np.float32)
    return out


def weights_from_bytes(
    data: bytes, *, source: str = "<bytes>", architecture: Architecture | None = None
) -> Theta:
    """Decodes the official format; see `load_weights`."""
    theta, _, _ = _decode(data, source)
    try:
        validate(theta, architecture)
    except WeightsError as e:
        raise WeightsError(f"{source}: {e}") from None
    return theta


def weights_to_bytes(
    theta: Mapping[str, Any], *, gen_id: str = "", step: int = 0
) -> bytes:
    """Encodes theta in the official format (leaves in on-disk order)."""
    architecture = Architecture.of(theta)
    validate(theta, architecture)
    root = {"params": _canonical(theta, architecture), "gen_id": gen_id, "step": step}
    return msgpack.packb(root, default=_default, use_bin_type=True, strict_types=False)


def _read_source(source: str) -> tuple[bytes, str]:
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme in ("http", "https"):
        return _download(source), source
    path = pathlib.Path(
        urllib.request.url2pathname(parsed.path) if parsed.scheme == "file" else source
    ).expanduser()
    if not path.exists():
        raise WeightsError(
            f"VeLO weights file {str(path)!r} does not exist. Pass the path of the "
            f"official 'params' file ({OFFICIAL_WEIGHTS_BYTES:,} bytes) or set "
            f"${WEIGHTS_ENV}."
        )
    if path.is_dir():
        path = path / "params"
        if not path.exists():
            raise WeightsError(f"directory {str(path.parent)!r} has no 'params' file.")
    return path.read_bytes(), str(path)


def load_weights(
    source: str | os.PathLike | None = None,
    *,
    architecture: Architecture | None = None,
) -> Theta:
    """Loads VeLO meta-parameters from the official `params` file format.

    Args:
      source: a path, a `file://` or `https://` URL, or None to resolve the
        default: `$VELO_SCALE_WEIGHTS`, then the user cache
        (`default_cache_path()`), then a download of the official file into
        that cache.
      architecture: the sizes the file must have; None infers them from the
        file (the official file is `Architecture()`) and checks the rest
        against them.

    Returns:
      theta, a nested dict of numpy float32 arrays (see module docstring);
      `gen_id` and `step` of the file are accepted and dropped.

    Raises:
      WeightsError: missing/truncated file, wrong key or shape (the first
        mismatch is named), or no network when a download is needed.

    Example:
      >>> theta = velo_scale.load_weights("/data/velo/params")  # doctest: +SKIP
    """
    if source is None:
        data, name = _resolve_default()
    else:
        data, name = _read_source(os.fspath(source))
    return weights_from_bytes(data, source=name, architecture=architecture)


def save_weights(
    path: str | os.PathLike,
    theta: Mapping[str, Any],
    *,
    gen_id: str = "",
    step: int = 0,
) -> None:
    """Writes theta in the official format, atomically (temp file + rename)."""
    atomic_write_bytes(
        pathlib.Path(path), weights_to_bytes(theta, gen_id=gen_id, step=step)
    )


def atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
    """Writes `data` to `path` via a temporary file in the same folder and a
    rename (readable 0o644), so `path` is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def default_cache_path() -> pathlib.Path:
    """Where the official weights are cached: `$VELO_SCALE_CACHE` or
    `$XDG_CACHE_HOME/velo_scale` (default `~/.cache/velo_scale`)."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        root = os.path.join(xdg, "velo_scale")
    return pathlib.Path(root).expanduser() / _CACHE_FILE


def _resolve_default() -> tuple[bytes, str]:
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return _read_source(env)
    cached = default_cache_path()
    broken = None
    digest_file = cached.with_name(cached.name + ".sha256")
    if cached.exists():
        data = cached.read_bytes()
        if len(data) == OFFICIAL_WEIGHTS_BYTES:
            _verify_cached(cached, data, digest_file)
            return data, str(cached)
        broken = len(data)
    try:
        data = _download(OFFICIAL_WEIGHTS_URL, expected_bytes=OFFICIAL_WEIGHTS_BYTES)
    except WeightsError as e:
        if broken is None:
            raise
        raise WeightsError(
            f"the cached VeLO weights file {str(cached)!r} is truncated or corrupt "
            f"({broken:,} bytes, expected {OFFICIAL_WEIGHTS_BYTES:,}), and a fresh "
            f"copy could not be downloaded. Delete it (rm {str(cached)!r}) and put "
            "an intact copy of the official file there, or point "
            f"${WEIGHTS_ENV} at one.\n\n{e}"
        ) from None
    atomic_write_bytes(cached, data)
    atomic_write_bytes(digest_file, hashlib.sha256(data).hexdigest().encode())
    return data, str(cached)


def _verify_cached(path: pathlib.Path, data: bytes, digest_file: pathlib.Path) -> None:
    """Checks a cached download against the sha256 recorded when it was
    downloaded (files put into the cache by hand have none)."""
    if not digest_file.exists():
        return
    want = digest_file.read_text().strip()
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise WeightsError(
            f"the cached VeLO weights file {str(path)!r} changed since it was "
            f"downloaded (sha256 {got[:12]}..., recorded {want[:12]}...): the "
            f"copy is corrupt. Delete it and {digest_file.name} "
            f"(rm {str(path)!r} {str(digest_file)!r}) so it is downloaded again, "
            "or put an intact copy there."
        )


def _download(
    url: str, *, expected_bytes: int | None = None, timeout: float = 30.0
) -> bytes:
    """Downloads url; raises `WeightsError` with set-up help on failure."""
    help_args = dict(
        name=OFFICIAL_WEIGHTS_NAME,
        size=OFFICIAL_WEIGHTS_BYTES,
        url=url,
        cache=default_cache_path(),
        cache_env=CACHE_ENV,
        env=WEIGHTS_ENV,
    )
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        why = getattr(e, "reason", e)
        raise WeightsError(_OFFLINE_HELP.format(why=why, **help_args)) from None
    if expected_bytes is not None and len(data) != expected_bytes:
        raise WeightsError(
            _OFFLINE_HELP.format(
                why=f"got {len(data):,} bytes, expected {expected_bytes:,}",
                **help_args,
            )
        )
    return data


def sha256(theta: Mapping[str, Any]) -> str:
    """Hash of theta's on-disk bytes (provenance of exported weights)."""
    return hashlib.sha256(weights_to_bytes(theta)).hexdigest()


def init_weights(
    key: jax.Array, architecture: Architecture | None = None, **sizes
) -> Theta:
    """Random meta-parameters with the structure of the official weights.

    Initialisers follow the reference: truncated normals with stddev
    1/sqrt(fan_in) for every weight (the first MLP layer uses the total input
    width 30), zero biases and a zero initial LSTM state.

    Args:
      key: PRNG key.
      architecture: sizes; or give them as keywords (`lstm_hidden_size=`,
        `param_inits=`, `ff_hidden_size=`, `ff_hidden_layers=`).

    Returns:
      theta as numpy-free jax arrays in the on-disk structure.
    """
    architecture = architecture or Architecture(**sizes)
    shapes = architecture.expected_shapes()
    keys = jax.random.split(key, len(shapes))
    theta: Theta = {}
    for k, (path, shape) in zip(keys, shapes.items()):
        node = theta
        for p in path[:-1]:
            node = node.setdefault(p, {})
        name = path[-1]
        if path[0] == "lstm_init_state" or name.startswith("b"):
            value = jax.numpy.zeros(shape, jax.numpy.float32)
        else:
            if path[0] == "ff_mod_stack":
                fan_in = (
                    param_net.NUM_PARAM_FEATURES
                    if name.startswith("w0__")
                    else shape[1]
                )
            else:
                fan_in = shape[0]
            value = jax.random.truncated_normal(k, -2.0, 2.0, shape) / np.sqrt(fan_in)
        node[name] = value
    return theta


def packaged_project_weights() -> pathlib.Path | None:
    """The meta-trained weights shipped in `velo_scale/project_weights/`, if any."""
    path = pathlib.Path(
        str(resources.files("velo_scale") / "project_weights" / "params")
    )
    return path if path.exists() else None


def resolve(weights: Any) -> Any:
    """What `velo(weights=...)` means, as a theta dict (or the dict given).

    Args:
      weights: `"auto"` (the official file when `$VELO_SCALE_WEIGHTS` or the
        cache has it, else the project's own weights from
        `$VELO_SCALE_PROJECT_WEIGHTS` or shipped in the package, with a notice
        on stderr: works offline); `"official"` or None (`load_weights()`:
        env, cache, else a download); `"project"` (the shipped project
        weights); a path or URL; or a theta dict (validated).

    Raises:
      WeightsError: nothing found, or a bad file; the message says what to set.
    """
    if weights is None or weights == "official":
        return load_weights()
    if weights == "project":
        packaged = packaged_project_weights()
        if packaged is None:
            raise WeightsError("this install of velo_scale ships no project weights.")
        return load_weights(packaged)
    if isinstance(weights, Mapping):
        validate(weights)
        return weights
    if weights != "auto":
        return load_weights(weights)
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return load_weights(env)
    cached = default_cache_path()
    if cached.exists():
        return load_weights(cached)
    project = os.environ.get(PROJECT_WEIGHTS_ENV)
    if project:
        return load_weights(project)
    packaged = packaged_project_weights()
    if packaged is not None:
        print(
            f"velo: no official VeLO weights found (${WEIGHTS_ENV}, {cached}); "
            f"using velo_scale's own meta-trained weights {packaged} (small "
            "network, much weaker than the official VeLO; see params.json beside "
            "it).",
            file=sys.stderr,
            flush=True,
        )
        return load_weights(packaged)
    raise WeightsError(
        "weights='auto' found no VeLO weights: "
        f"${WEIGHTS_ENV} is unset, the cache {cached} is empty and "
        f"${PROJECT_WEIGHTS_ENV} (weights made by velo_scale's meta-training) is "
        "unset. Give the official 'params' file with "
        f"`export {WEIGHTS_ENV}=/path/to/params`, or weights='official' to "
        "download it (needs internet), or a path."
    )
