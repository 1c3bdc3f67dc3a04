"""Character-level language-model tasks on Bible text (meta-training family).

Text: English verses of a SWORD Bible module (`engWEB2015eb`, the World
English Bible, by default) read with `velo_scale.data.bible.read_verses`
for a few books only (`DEFAULT_BOOKS`, ~100k characters, a few seconds),
joined with newlines and cached per process (`bible_text`).

Vocabulary (`VOCAB`, fixed, 96 ids): id 0 = unknown, then newline and the 95
printable ASCII characters 32..126; curly quotes and dashes are mapped to
their ASCII forms first (`encode`).

Batches: `{"tokens": i32[batch_size, seq_len + 1]}`, windows starting at
uniform random offsets of the text; the model reads tokens[:, :-1] and
predicts tokens[:, 1:]. Loss: mean next-character cross entropy (nats).

Two models, both pure JAX (the compute dtype follows the params' dtype, so
the bfloat16 augmentation of `AugmentedTask` applies):
  * `LSTMLMTask`: embedding -> `depth` LSTM layers of `width` -> logits.
  * `TransformerLMTask`: embedding + learned positions -> `depth` pre-LN
    causal self-attention blocks (`num_heads`, MLP 4 * width) -> LN -> logits.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

DEFAULT_MODULE = "engWEB2015eb"
DEFAULT_BOOKS = ("Ruth", "Jonah", "Mark")
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB_SIZE = len(VOCAB) + 1  # + unknown (id 0)
_ASCII = str.maketrans({"‘": "'", "’": "'", "“": '"', "”": '"', "—": "-", "–": "-"})
_IDS = {c: i + 1 for i, c in enumerate(VOCAB)}


def encode(text: str) -> np.ndarray:
    """uint8[len(text)] character ids of `VOCAB` (0 = unknown)."""
    text = text.translate(_ASCII)
    return np.fromiter((_IDS.get(c, 0) for c in text), np.uint8, len(text))


def decode(ids: Sequence[int]) -> str:
    """The inverse of `encode` (unknown ids read as '?')."""
    return "".join(VOCAB[i - 1] if i > 0 else "?" for i in ids)


@functools.cache
def bible_text(
    module: str = DEFAULT_MODULE, books: tuple[str, ...] = DEFAULT_BOOKS
) -> np.ndarray:
    """uint8[n] encoded verses of `books`, joined with newlines (cached)."""
    from velo_scale.data.bible import read_verses

    verses = read_verses(module, books=books)
    if not verses:
        raise ValueError(f"No verses of books {books} found in SWORD module {module}.")
    return encode("\n".join(verses.values()))


def _dense(key: jax.Array, n_in: int, n_out: int, scale: float) -> dict:
    return {
        "w": jax.random.normal(key, (n_in, n_out)) * (scale / np.sqrt(n_in)),
        "b": jnp.zeros((n_out,)),
    }


@dataclasses.dataclass(frozen=True, eq=False)
class CharLMTask:
    """Base of the character LMs: data, batches, loss from `logits`.

    Attributes:
      text: uint8[n] encoded text (`bible_text()`).
      width: hidden size (embedding size too).
      depth: recurrent / transformer layers.
      seq_len: characters read per window (predictions per example).
      batch_size: windows per inner step.
      init_scale: multiplies the LeCun-normal initial weights.
      name: for logs and provenance.
    """

    text: np.ndarray
    width: int = 32
    depth: int = 1
    seq_len: int = 32
    batch_size: int = 16
    init_scale: float = 1.0
    name: str = "char_lm"

    def __post_init__(self):
        if len(self.text) <= self.seq_len + 1:
            raise ValueError(
                f"text of {len(self.text)} characters is too short for "
                f"seq_len={self.seq_len}."
            )

    @property
    def tokens_per_example(self) -> int:
        """Predictions per example (the cost model's multiplier)."""
        return self.seq_len

    def batch(self, key: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
        """{"tokens": i32[batch_size, seq_len + 1]} at random offsets."""
        starts = jax.random.randint(
            jax.random.fold_in(key, step),
            (self.batch_size,),
            0,
            len(self.text) - self.seq_len - 1,
        )
        idx = starts[:, None] + jnp.arange(self.seq_len + 1)
        return {"tokens": jnp.asarray(self.text)[idx].astype(jnp.int32)}

    def logits(self, params: Any, inputs: jax.Array) -> jax.Array:
        """inputs: i32[b, t] -> logits [b, t, VOCAB_SIZE]."""
        raise NotImplementedError

    def loss(self, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        tokens = batch["tokens"]
        logits = self.logits(params, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, tokens[:, 1:]
        ).mean()


@dataclasses.dataclass(frozen=True, eq=False)
class LSTMLMTask(CharLMTask):
    """`depth` stacked LSTMs (gates i, f, g, o; forget bias 1) over embeddings."""

    name: str = "bible_lstm"

    def init(self, key: jax.Array) -> dict[str, Any]:
        keys = jax.random.split(key, self.depth + 2)
        d, s = self.width, self.init_scale
        params = {"embed": jax.random.normal(keys[0], (VOCAB_SIZE, d)) * s}
        for i in range(self.depth):
            cell = _dense(keys[i + 1], 2 * d, 4 * d, s)
            cell["b"] = cell["b"].at[d : 2 * d].set(1.0)  # forget-gate bias
            params[f"lstm{i}"] = cell
        params["head"] = _dense(keys[-1], d, VOCAB_SIZE, s)
        return params

    def logits(self, params: Any, inputs: jax.Array) -> jax.Array:
        x = params["embed"][inputs]  # [b, t, d]
        dtype, (b, _, d) = x.dtype, x.shape
        for i in range(self.depth):
            cell = params[f"lstm{i}"]

            def step(carry, x_t, cell=cell):
                h, c = carry
                z = jnp.concatenate([x_t, h], -1) @ cell["w"] + cell["b"]
                i_, f, g, o = jnp.split(z, 4, axis=-1)
                c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i_) * jnp.tanh(g)
                h = jax.nn.sigmoid(o) * jnp.tanh(c)
                return (h, c), h

            zeros = jnp.zeros((b, d), dtype)
            _, hs = jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(x, 0, 1))
            x = jnp.swapaxes(hs, 0, 1)
        return x @ params["head"]["w"] + params["head"]["b"]


def _layer_norm(x: jax.Array, p: dict) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + 1e-5)).astype(x.dtype)
    return y * p["scale"] + p["bias"]


@dataclasses.dataclass(frozen=True, eq=False)
class TransformerLMTask(CharLMTask):
    """A small GPT-style causal transformer (pre-LN, GELU MLP of 4 * width)."""

    num_heads: int = 2
    name: str = "bible_transformer"

    def __post_init__(self):
        super().__post_init__()
        if self.width % self.num_heads:
            raise ValueError(
                f"width={self.width} must be divisible by num_heads={self.num_heads}."
            )

    def init(self, key: jax.Array) -> dict[str, Any]:
        d, s = self.width, self.init_scale
        keys = iter(jax.random.split(key, 4 * self.depth + 3))
        ln = lambda: {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))}  # noqa: E731
        params = {
            "embed": jax.random.normal(next(keys), (VOCAB_SIZE, d)) * s,
            "pos": 0.02 * jax.random.normal(next(keys), (self.seq_len, d)),
        }
        for i in range(self.depth):
            params[f"block{i}"] = {
                "ln_attn": ln(),
                "qkv": _dense(next(keys), d, 3 * d, s),
                "out": _dense(next(keys), d, d, s),
                "ln_mlp": ln(),
                "mlp_in": _dense(next(keys), d, 4 * d, s),
                "mlp_out": _dense(next(keys), 4 * d, d, s),
            }
        params["ln_final"] = ln()
        params["head"] = _dense(next(keys), d, VOCAB_SIZE, s)
        return params

    def logits(self, params: Any, inputs: jax.Array) -> jax.Array:
        x = params["embed"][inputs] + params["pos"][: inputs.shape[1]]
        b, t, d = x.shape
        h, hd = self.num_heads, d // self.num_heads
        mask = jnp.tril(jnp.ones((t, t), bool))
        for i in range(self.depth):
            p = params[f"block{i}"]
            y = _layer_norm(x, p["ln_attn"])
            qkv = (y @ p["qkv"]["w"] + p["qkv"]["b"]).reshape(b, t, 3, h, hd)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
            scores = jnp.where(mask, scores / np.sqrt(hd), -1e9)
            attn = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
            y = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, t, d)
            x = x + y @ p["out"]["w"] + p["out"]["b"]
            y = _layer_norm(x, p["ln_mlp"])
            y = jax.nn.gelu(y @ p["mlp_in"]["w"] + p["mlp_in"]["b"])
            x = x + y @ p["mlp_out"]["w"] + p["mlp_out"]["b"]
        x = _layer_norm(x, params["ln_final"])
        return x @ params["head"]["w"] + params["head"]["b"]


def sample_lm_task(rng: np.random.Generator) -> CharLMTask:
    """Draws an LSTM (p = 0.5) or transformer (p = 0.5) character LM.

    width in {16, 32, 64}, depth in {1, 2}, seq_len in {16, 32, 64},
    batch_size in {8, 16, 32}, init_scale log-uniform in [0.5, 2];
    transformers use 2 heads (width 16, 32) or 4 (width 64).
    """
    text = bible_text()
    family = str(rng.choice(["lstm", "transformer"]))
    common = dict(
        text=text,
        width=int(rng.choice([16, 32, 64])),
        depth=int(rng.integers(1, 3)),
        seq_len=int(rng.choice([16, 32, 64])),
        batch_size=int(rng.choice([8, 16, 32])),
        init_scale=float(np.exp(rng.uniform(np.log(0.5), np.log(2.0)))),
    )
    if family == "lstm":
        return LSTMLMTask(**common)
    return TransformerLMTask(num_heads=4 if common["width"] == 64 else 2, **common)
