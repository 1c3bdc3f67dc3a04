"""Vision Transformer (Dosovitskiy et al. 2021), big_vision layout.

Patch embedding (a conv with stride = patch size), a class token, learned
position embeddings, pre-LayerNorm encoder blocks (multi-head self-attention,
GELU MLP) and a linear head on the class token. Weights carry logical axes
(`embed`, `heads`, `kv`, `mlp`, `vocab`, `patch`) for sharding.

Sizes: `ViT.B16` (86,567,656 params at 224x224, 1000 classes; the paper's
ViT-B), `ViT.S16` (22,050,664; the classic ViT-S/16), `ViT.S16_ALGOPERF` (22,122,472; AlgoPerf's ImageNet ViT: sin-cos positions, mean pooling, tanh pre-logits), and small variants
for CPU runs.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

_INIT = nn.initializers.lecun_normal()


def _init(axes):
    return nn.with_logical_partitioning(_INIT, axes)


def _zeros(axes):
    return nn.with_logical_partitioning(nn.initializers.zeros, axes)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [batch, tokens, width] -> same shape."""
        width = x.shape[-1]
        head_dim = width // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = nn.LayerNorm(
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            bias_init=_zeros(("embed",)), name="ln_attn", **kw,
        )(x)  # fmt: skip
        qkv = [
            nn.DenseGeneral(
                (self.num_heads, head_dim),
                kernel_init=_init(("embed", "heads", "kv")),
                bias_init=_zeros(("heads", "kv")),
                name=name,
                **kw,
            )(y)
            for name in ("query", "key", "value")
        ]
        q, k, v = qkv
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(
            self.dtype
        )
        attn = nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        y = jnp.einsum("bhqk,bkhd->bqhd", attn, v)
        y = nn.DenseGeneral(
            width, axis=(-2, -1), kernel_init=_init(("heads", "kv", "embed")),
            bias_init=_zeros(("embed",)), name="out", **kw,
        )(y)  # fmt: skip
        x = x + y
        y = nn.LayerNorm(
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            bias_init=_zeros(("embed",)), name="ln_mlp", **kw,
        )(x)  # fmt: skip
        y = nn.Dense(
            self.mlp_dim, kernel_init=_init(("embed", "mlp")), bias_init=_zeros(("mlp",)),
            name="mlp_in", **kw,
        )(y)  # fmt: skip
        y = nn.Dense(
            width, kernel_init=_init(("mlp", "embed")), bias_init=_zeros(("embed",)),
            name="mlp_out", **kw,
        )(nn.gelu(y))  # fmt: skip
        return x + y


class ViT(nn.Module):
    """Vision Transformer classifier.

    Attributes:
      patch: patch size (pixels per side).
      width: model width D; depth: blocks; num_heads; mlp_dim.
      num_classes: logits.
      posemb: "learn" (learned, with a class token) or "sincos2d" (fixed 2-D
        sin-cos position embeddings, big_vision / AlgoPerf).
      pool: "token" (the class token) or "gap" (mean over patches).
      rep_size: None, or the width of a tanh pre-logits layer.
      head_zeroinit: start the head at zero (big_vision / AlgoPerf).
      dtype / param_dtype: computation / storage dtypes.
    """

    patch: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    num_classes: int = 1000
    posemb: str = "learn"
    pool: str = "token"
    rep_size: int | None = None
    head_zeroinit: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    # Named sizes, usable from gin as `ViT.width = 768` etc. or with these.
    B16 = dict(patch=16, width=768, depth=12, num_heads=12, mlp_dim=3072)
    S16 = dict(patch=16, width=384, depth=12, num_heads=6, mlp_dim=1536)
    TINY = dict(patch=7, width=64, depth=2, num_heads=4, mlp_dim=128)
    # AlgoPerf's ImageNet ViT-S/16 (big_vision style): sin-cos positions, mean
    # pooling, a 384-wide tanh pre-logits layer, zero-initialised head.
    S16_ALGOPERF = dict(
        S16, posemb="sincos2d", pool="gap", rep_size=384, head_zeroinit=True
    )

    @nn.compact
    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
        """images: [batch, H, W, C] (H, W multiples of patch) -> f32 logits."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Conv(
            self.width,
            (self.patch, self.patch),
            strides=(self.patch, self.patch),
            padding="VALID",
            kernel_init=_init((None, None, "patch", "embed")),
            bias_init=_zeros(("embed",)),
            name="embedding",
            **kw,
        )(images.astype(self.dtype))
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        if self.pool not in ("token", "gap"):
            raise ValueError(f"ViT.pool must be 'token' or 'gap'; got {self.pool!r}.")
        if self.posemb not in ("learn", "sincos2d"):
            raise ValueError(
                f"ViT.posemb must be 'learn' or 'sincos2d'; got {self.posemb!r}."
            )
        if self.pool == "token":
            cls = self.param(
                "cls", _zeros((None, None, "embed")), (1, 1, d), self.param_dtype
            )
            x = jnp.concatenate(
                [jnp.broadcast_to(cls, (b, 1, d)).astype(self.dtype), x], axis=1
            )
        if self.posemb == "learn":
            pos = self.param(
                "pos_embedding",
                nn.with_logical_partitioning(
                    nn.initializers.normal(0.02), (None, None, "embed")
                ),
                (1, x.shape[1], d),
                self.param_dtype,
            )
            x = x + pos.astype(self.dtype)
        else:  # Fixed; the class token (if any) gets no position.
            pos = sincos_2d(h, w, d).astype(self.dtype)
            x = x.at[:, x.shape[1] - h * w :].add(pos[None])
        for i in range(self.depth):
            x = EncoderBlock(self.num_heads, self.mlp_dim, name=f"block{i:02d}", **kw)(
                x
            )
        x = nn.LayerNorm(
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            bias_init=_zeros(("embed",)), name="ln_final", **kw,
        )(x)  # fmt: skip
        x = x[:, 0] if self.pool == "token" else jnp.mean(x, axis=1)
        if self.rep_size is not None:
            x = jnp.tanh(
                nn.Dense(
                    self.rep_size, kernel_init=_init(("embed", "mlp")),
                    bias_init=_zeros(("mlp",)), name="pre_logits", **kw,
                )(x)
            )  # fmt: skip
        head_init = (
            nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "vocab"))
            if self.head_zeroinit
            else _init(("embed", "vocab"))
        )
        head = nn.Dense(
            self.num_classes, kernel_init=head_init,
            bias_init=_zeros(("vocab",)), name="head", **kw,
        )  # fmt: skip
        return head(x).astype(jnp.float32)


def sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0):
    """Fixed 2-D sin-cos position embeddings: f32[h * w, width] (width % 4 == 0).

    A quarter of the channels each for sin/cos of the row and the column
    index, at frequencies `temperature ** -(k / (width / 4))`, k < width / 4.
    """
    if width % 4:
        raise ValueError(
            f"sin-cos position embeddings need width % 4 == 0; got {width}."
        )
    y, x = jnp.mgrid[:h, :w]
    omega = 1.0 / temperature ** (jnp.arange(width // 4) / (width // 4))
    y = y.reshape(-1)[:, None] * omega[None]
    x = x.reshape(-1)[:, None] * omega[None]
    return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
