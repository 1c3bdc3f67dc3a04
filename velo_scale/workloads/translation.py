"""Machine translation: teacher-forced cross-entropy, token accuracy, BLEU.

AlgoPerf's WMT workload and its small Bible variant. Batches:
`{"inputs": int32[b, Ls], "targets": int32[b, Lt]}` of token ids, 0 =
padding (masked out of the loss, the accuracy and every attention), each
sequence ending with EOS.

Training loss: cross-entropy per non-padding target token with label
smoothing (AlgoPerf's loss function: smoothed targets `(1 - a) * onehot + a
/ V`, a = 0.1), averaged over the batch's target tokens.

Evaluation (`evaluate`, host side): over the whole eval set, the unsmoothed
per-token loss and token accuracy; then greedy decoding of the first
`bleu_examples` examples and corpus BLEU (sacrebleu, its default 13a
tokenisation, as AlgoPerf's `bleu.corpus_bleu`) of the detokenised
predictions against the detokenised targets. AlgoPerf decodes with a beam
of 4 (length penalty 0.6); greedy decoding scores somewhat lower.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from velo_scale.data.iterator import as_source, epoch_batches
from velo_scale.workloads.base import FullScale, Workload, gin_configurables

SACREBLEU_MISSING_MSG = (
    "BLEU needs the sacrebleu package, which is not installed. Install it with "
    "`pip install sacrebleu` (or `pip install velo-scale[recipes]`)."
)


def smoothed_cross_entropy(
    logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
    """Per-token cross-entropy against label-smoothed one-hot targets.

    Equals `-sum(optax.smooth_labels(onehot(targets, V), a) * log_softmax(
    logits))` without building the one-hot: `(1 - a) * nll + a * mean_v(
    -log p_v)`.

    Args:
      logits: float [..., V].
      targets: int [...] in [0, V).
      label_smoothing: a in [0, 1).

    Returns:
      float32 [...] losses.
    """
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
    if not label_smoothing:
        return nll
    uniform = -jnp.mean(log_p, axis=-1)
    return (1.0 - label_smoothing) * nll + label_smoothing * uniform


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU in [0, 100] (sacrebleu defaults: 13a tokenisation,
    exponential smoothing), one reference per sentence."""
    try:
        import sacrebleu
    except ImportError as e:
        raise ImportError(SACREBLEU_MISSING_MSG) from e
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def resolve_vocab(vocab: Any) -> Any:
    """A detokeniser from `Translation.vocab`.

    `None` -> None (no BLEU); "bible_en_es" -> the Bible loader's cached
    vocabulary; another string -> a SentencePiece model file (e.g.
    AlgoPerf's `wmt_sentencepiece_model`); anything with `decode(ids) ->
    str` and `eos_id` is used as it is.
    """
    if vocab is None or hasattr(vocab, "decode"):
        return vocab
    from velo_scale.data import bible

    if vocab == "bible_en_es":
        return bible.bible_vocab()
    return bible.SentencePieceVocab(vocab)


def _pad_batch(batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Zero rows appended up to `size` (all-padding examples weigh nothing)."""
    n = len(next(iter(batch.values())))
    return {
        k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)])
        if n < size
        else np.asarray(v)
        for k, v in batch.items()
    }


@dataclasses.dataclass(frozen=True, eq=False)
class Translation(Workload):
    """Sequence-to-sequence translation with an encoder-decoder model.

    The model maps `(inputs, targets, train=...)` to logits [b, Lt, V] and
    has `encode`, `decode_step` and a `decode` field
    (`velo_scale.models.Transformer`).

    Attributes:
      model: the encoder-decoder.
      label_smoothing: of the training loss (AlgoPerf's WMT loss: 0.1).
      vocab: the detokeniser for BLEU (see `resolve_vocab`); None: no BLEU.
      eos_id: end-of-sequence id (decoding stops there).
      bleu_examples: decode the first this many eval examples for BLEU (None:
        all of them; 0: no BLEU).
      decode_batch_size: examples per greedy-decoding call.
      max_len: sequence length of `dummy_batch`.
      full_scale: the published workload facts, if any.
    """

    model: nn.Module
    label_smoothing: float = 0.1
    vocab: Any = None
    eos_id: int = 2
    bleu_examples: int | None = None
    decode_batch_size: int = 128
    max_len: int = 256
    full_scale: FullScale | None = None

    def init_inputs(self, batch):
        return (batch["inputs"], batch["targets"])

    def init_kwargs(self):
        return {"train": False}

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        shape = (batch_size, self.max_len)
        return {
            "inputs": np.zeros(shape, np.int32),
            "targets": np.zeros(shape, np.int32),
        }

    # -- training ----------------------------------------------------------
    def loss(self, params, model_state, batch, rng):
        logits = self.model.apply(
            {"params": params, **model_state},
            batch["inputs"],
            batch["targets"],
            train=True,
            rngs={"dropout": rng},
        )
        targets = batch["targets"]
        weights = (targets > 0).astype(jnp.float32)
        tokens = jnp.maximum(jnp.sum(weights), 1.0)
        losses = smoothed_cross_entropy(logits, targets, self.label_smoothing)
        loss = jnp.sum(losses * weights) / tokens
        accuracy = jnp.sum((jnp.argmax(logits, -1) == targets) * weights) / tokens
        return loss, ({"accuracy": accuracy}, dict(model_state))

    # -- evaluation --------------------------------------------------------
    def eval_sums(self, params, model_state, batch):
        logits = self.model.apply(
            {"params": params, **model_state},
            batch["inputs"],
            batch["targets"],
            train=False,
        )
        targets = batch["targets"]
        weights = (targets > 0).astype(jnp.float32)
        losses = smoothed_cross_entropy(logits, targets)
        return {
            "loss": jnp.sum(losses * weights),
            "correct": jnp.sum((jnp.argmax(logits, -1) == targets) * weights),
            "tokens": jnp.sum(weights),
        }

    def eval_finalize(self, sums: Mapping[str, float]) -> dict[str, float]:
        tokens = max(float(sums["tokens"]), 1.0)
        return {
            "loss": float(sums["loss"]) / tokens,
            "accuracy": float(sums["correct"]) / tokens,
        }

    def greedy_decode(self, params: Any, inputs: jax.Array, length: int) -> jax.Array:
        """Greedy translations: int32 [b, length], zeros after EOS.

        Encodes once, then predicts one token per step with the decoder's
        key/value cache; stops early when every row has emitted EOS.
        `length` must not exceed the model's `max_len`.
        """
        decoder = self.model.clone(decode=True)
        encoded = self.model.apply({"params": params}, inputs, method="encode")
        b = inputs.shape[0]

        def step(cache, tokens, index):
            variables = {"params": params}
            if cache is not None:
                variables["cache"] = cache
            logits, state = decoder.apply(
                variables,
                encoded,
                inputs,
                tokens,
                index,
                method="decode_step",
                mutable=["cache"],
            )
            return jnp.argmax(logits, -1).astype(jnp.int32), state["cache"]

        first, cache = step(None, jnp.zeros((b, 1), jnp.int32), jnp.asarray(0))
        out = jnp.zeros((b, length), jnp.int32).at[:, 0].set(first)

        def cond(carry):
            index, _, _, done = carry
            return (index < length) & ~jnp.all(done)

        def body(carry):
            index, cache, out, done = carry
            previous = jax.lax.dynamic_slice_in_dim(out, index - 1, 1, axis=1)
            token, cache = step(cache, previous, index)
            token = jnp.where(done, 0, token)
            out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], index, 1)
            return index + 1, cache, out, done | (token == self.eos_id)

        carry = (jnp.asarray(1), cache, out, first == self.eos_id)
        return jax.lax.while_loop(cond, body, carry)[2]

    def translate(
        self, params: Any, inputs: np.ndarray, length: int | None = None
    ) -> np.ndarray:
        """Greedy translations of `inputs` (int [n, Ls]) in batches of
        `decode_batch_size`: int32 [n, length] (default length Ls)."""
        length = inputs.shape[1] if length is None else int(length)
        cache = self.__dict__.setdefault("_jit_cache", {})
        if "greedy_decode" not in cache:
            cache["greedy_decode"] = jax.jit(
                self.greedy_decode, static_argnames="length"
            )
        fn = cache["greedy_decode"]
        size = min(self.decode_batch_size, len(inputs))
        outs = []
        for start in range(0, len(inputs), size):
            chunk = _pad_batch({"x": inputs[start : start + size]}, size)["x"]
            pred = np.asarray(fn(params, jnp.asarray(chunk), length=length))
            outs.append(pred[: min(size, len(inputs) - start)])
        return np.concatenate(outs)

    def bleu(self, params: Any, source: Any) -> float:
        """Corpus BLEU of greedy translations of the first `bleu_examples`."""
        vocab = self._vocab()
        data = as_source(source)
        n = (
            len(data)
            if self.bleu_examples is None
            else min(self.bleu_examples, len(data))
        )
        batch = data.gather(np.arange(n))
        targets = np.asarray(batch["targets"])
        predicted = self.translate(
            params, np.asarray(batch["inputs"]), targets.shape[1]
        )
        hypotheses = [vocab.decode(row) for row in predicted]
        references = [vocab.decode(row) for row in targets]
        return corpus_bleu(hypotheses, references)

    def _vocab(self):
        cache = self.__dict__.setdefault("_jit_cache", {})
        if "vocab" not in cache:
            cache["vocab"] = resolve_vocab(self.vocab)
        return cache["vocab"]

    def evaluate(self, params, model_state, source, batch_size):
        """Loss and token accuracy over every example; BLEU over the first
        `bleu_examples` (when a vocabulary is set). Batches are padded to
        `batch_size` so that one compiled step serves them all."""
        fn = self._jitted("eval_sums")
        totals: dict[str, float] = {}
        for batch in epoch_batches(source, batch_size):
            padded = _pad_batch(batch, batch_size)
            sums = fn(
                params, model_state, {k: jnp.asarray(v) for k, v in padded.items()}
            )
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        metrics = self.eval_finalize(totals)
        if self.vocab is not None and self.bleu_examples != 0:
            metrics["bleu"] = self.bleu(params, source)
        return metrics


GIN_CONFIGURABLES = gin_configurables(Translation, FullScale)
