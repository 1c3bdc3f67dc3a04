"""Example Pax experiments with VeLO: a byte-level Transformer LM on the Bible.

What it trains: a praxis `LanguageModel` (`TransformerLm`, causal, repeated
layers) predicting the next byte of the King James Bible (SWORD module
`engKJV2006eb`, Debian package `sword-text-kjv`; read with `pysword`), with
VeLO through paxml's `Learner` path: the only VeLO-specific line of the task
is `pax_learner.configure_velo(task_p)`.

Data: the verses of `BOOKS` (test split: `bible.is_test_verse`, ~5% of verses
spread over the books), joined with newlines, as bytes (vocabulary 256);
random windows of `SEQ_LEN + 1` bytes, inputs and next-byte labels.

Run with paxml's own trainer (see `.ci/paxml_trainer.sh` for an install that
works here):

    python -m paxml.main --exp=velo_scale.integrations.pax_experiments.BibleLmVeLOTiny \
        --job_log_dir=/tmp/bible_lm --mode=train

`BibleLmVeLO` is the same at a size worth a few CPU minutes; swap
`configure_velo` for paxml's `model_params.set_default_adam` to compare.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from paxml import base_experiment, experiment_registry, tasks_lib
from praxis import base_input, layers, pax_fiddle, py_utils
from praxis.layers import models, transformer_models

from velo_scale.data import bible
from velo_scale.integrations import pax_learner

NestedMap = py_utils.NestedMap
VOCAB_SIZE = 256  # bytes


def bible_bytes(
    books: Sequence[str] | None,
    split: str,
    *,
    module: str = bible.ENGLISH,
    data_dir: str | None = None,
) -> np.ndarray:
    """The verses of `books` in `split` ("train"/"test"), joined by newlines.

    Returns:
      int32[n], the UTF-8 bytes of the text.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    verses = bible.read_verses(module, books=books, data_dir=data_dir)
    wanted = split == "test"
    text = "\n".join(t for r, t in verses.items() if bible.is_test_verse(r) == wanted)
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


class BibleBytesInput(base_input.BaseInput):
    """Random windows of Bible bytes as LM batches (praxis input).

    Batches: NestedMap(ids, labels: int32[batch_size, seq_len]; weights,
    paddings: float32[batch_size, seq_len]). Deterministic in
    `input_random_seed` and the host index; the position is checkpointed with
    the input (`get_state`).

    Attributes:
      seq_len: tokens per example.
      books: OSIS book names to read (None: the whole Bible, ~2 min to parse).
      split: "train" or "test".
      module: the SWORD module.
      data_dir: the SWORD directory (default `$VELO_SCALE_SWORD` or
        /usr/share/sword).
    """

    seq_len: int = 64
    books: Sequence[str] | None = ("Gen",)
    split: str = "train"
    module: str = bible.ENGLISH
    data_dir: str | None = None
    _tokens: Any = dataclasses.field(init=False, repr=False)
    _batches: Any = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        self._tokens = bible_bytes(
            self.books, self.split, module=self.module, data_dir=self.data_dir
        )
        if self._tokens.size <= self.seq_len + 1:
            raise ValueError(
                f"{self.books=} / {self.split=} give {self._tokens.size} bytes, too "
                f"few for {self.seq_len=}."
            )
        self._batches = 0

    def _seed(self) -> int:
        return (self.input_random_seed or 0) * 1009 + self.infeed_host_index

    def get_next(self) -> NestedMap:
        rng = np.random.default_rng([self._seed(), self._batches])
        self._batches += 1
        starts = rng.integers(0, self._tokens.size - self.seq_len - 1, self.batch_size)
        windows = np.stack([self._tokens[s : s + self.seq_len + 1] for s in starts])
        shape = (self.batch_size, self.seq_len)
        return NestedMap(
            ids=windows[:, :-1],
            labels=windows[:, 1:],
            weights=np.ones(shape, np.float32),
            paddings=np.zeros(shape, np.float32),
        )

    def reset(self) -> None:
        self._batches = 0

    def _get_state_internal(self) -> bytes:
        return str(self._batches).encode()

    def _set_state_internal(self, state: bytes) -> None:
        self._batches = int(state.decode())


def lm_task(
    *,
    num_layers: int,
    model_dims: int,
    hidden_dims: int,
    num_heads: int,
    num_train_steps: int,
    ici_mesh_shape: Sequence[int] = (1, 1, 1),
    use_repeated_layer: bool = True,
    weights: Any = "auto",
) -> pax_fiddle.Config[tasks_lib.SingleTask]:
    """A paxml task: causal byte-level `TransformerLm`, trained with VeLO.

    Args:
      num_layers, model_dims, hidden_dims, num_heads: the Transformer's size.
      num_train_steps: the run's length (also VeLO's horizon).
      ici_mesh_shape: (replica, data, mdl) mesh; the model's weights are
        sharded over it with praxis' `set_sharding_params_v1`.
      use_repeated_layer: stack the layers (`StackedTransformerRepeated`,
        variables with a `repeat_prefix`); else `StackedTransformer`.
      weights: `pax_learner.VeLO.weights`.

    Returns:
      The task config.
    """
    task_p = pax_fiddle.Config(tasks_lib.SingleTask, name="bible_lm_task")
    model_p = pax_fiddle.Config(models.LanguageModel, name="bible_lm")
    lm_p = model_p.lm_tpl
    lm_p.packed_input = False
    lm_p.model_dims = model_dims
    lm_p.vocab_size = VOCAB_SIZE
    lm_p.softmax_tpl.scale_sqrt_depth = True
    stacked_p = pax_fiddle.Config(
        layers.StackedTransformer,
        model_dims=model_dims,
        hidden_dims=hidden_dims,
        num_heads=num_heads,
        dim_per_head=model_dims // num_heads,
        num_layers=num_layers,
        dropout_prob=0.0,
    )
    if use_repeated_layer:
        stacked_p.num_layers = 1
        lm_p.stacked_transformer_tpl = pax_fiddle.Config(
            layers.StackedTransformerRepeated, block=stacked_p, x_times=num_layers
        )
    else:
        lm_p.stacked_transformer_tpl = stacked_p
    axes = ["replica", "data", "mdl"]
    model_p.ici_mesh_shape = list(ici_mesh_shape)
    model_p.mesh_axis_names = axes
    model_p.lm_tpl = transformer_models.TransformerLm.set_sharding_params_v1(
        lm_p,
        replica_axis="replica",
        data_axis="data",
        mdl_axis="mdl",
        ici_mesh_shape=model_p.ici_mesh_shape,
        mesh_axis_names=axes,
        training_optimized=True,
    )
    task_p.model = model_p
    task_p.train.inputs_split_mapping = NestedMap(
        map_1d=(("replica", "data"),), map_2d=(("replica", "data"), None)
    )
    task_p.train.num_train_steps = num_train_steps
    # The one VeLO line: learner -> VeLOLearner, optimizer -> VeLO.
    pax_learner.configure_velo(task_p, weights=weights)
    return task_p


@experiment_registry.register
class BibleLmVeLO(base_experiment.BaseExperiment):
    """Byte-level LM on Genesis+Exodus (KJV), 4 layers of 128, VeLO, 1000 steps."""

    BOOKS = ("Gen", "Exod")
    NUM_LAYERS = 4
    MODEL_DIMS = 128
    HIDDEN_DIMS = 512
    NUM_HEADS = 4
    SEQ_LEN = 128
    PERCORE_BATCH_SIZE = 16
    NUM_TRAIN_STEPS = 1000
    ICI_MESH_SHAPE = (1, 1, 1)
    USE_REPEATED_LAYER = True
    WEIGHTS = "auto"
    SAVE_INTERVAL_STEPS = 500
    SUMMARY_INTERVAL_STEPS = 50
    EVAL_INTERVAL_STEPS = 250
    EVAL_BATCHES = 4

    def _input(self, split: str) -> pax_fiddle.Config[BibleBytesInput]:
        return pax_fiddle.Config(
            BibleBytesInput,
            name=f"bible_{split}",
            books=self.BOOKS,
            split=split,
            seq_len=self.SEQ_LEN,
            batch_size=self.PERCORE_BATCH_SIZE * jax.local_device_count(),
            is_training=split == "train",
            reset_for_eval=split != "train",
            eval_loop_num_batches=self.EVAL_BATCHES,
            input_random_seed=0 if split == "train" else 1,
        )

    def datasets(self) -> list[pax_fiddle.Config[base_input.BaseInput]]:
        return [self._input("train"), self._input("test")]

    def task(self) -> pax_fiddle.Config[tasks_lib.SingleTask]:
        task_p = lm_task(
            num_layers=self.NUM_LAYERS,
            model_dims=self.MODEL_DIMS,
            hidden_dims=self.HIDDEN_DIMS,
            num_heads=self.NUM_HEADS,
            num_train_steps=self.NUM_TRAIN_STEPS,
            ici_mesh_shape=self.ICI_MESH_SHAPE,
            use_repeated_layer=self.USE_REPEATED_LAYER,
            weights=self.WEIGHTS,
        )
        task_p.train.save_interval_steps = self.SAVE_INTERVAL_STEPS
        task_p.train.summary_interval_steps = self.SUMMARY_INTERVAL_STEPS
        task_p.train.eval_interval_steps = self.EVAL_INTERVAL_STEPS
        return task_p


@experiment_registry.register
class BibleLmVeLOTiny(BibleLmVeLO):
    """The same on Genesis, 2 layers of 32, 40 steps: paxml's trainer in ~1 min."""

    BOOKS = ("Gen",)
    NUM_LAYERS = 2
    MODEL_DIMS = 32
    HIDDEN_DIMS = 64
    NUM_HEADS = 4
    SEQ_LEN = 32
    PERCORE_BATCH_SIZE = 2
    NUM_TRAIN_STEPS = 40
    SAVE_INTERVAL_STEPS = 20
    SUMMARY_INTERVAL_STEPS = 5
    EVAL_INTERVAL_STEPS = 20
    EVAL_BATCHES = 2


__all__ = [
    "BibleBytesInput",
    "BibleLmVeLO",
    "BibleLmVeLOTiny",
    "bible_bytes",
    "lm_task",
]
