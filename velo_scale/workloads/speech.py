"""Speech recognition with CTC: loss, greedy decoding, word and character
error rates.

AlgoPerf's LibriSpeech workloads (Conformer, DeepSpeech) and their small
variants on the Asterisk prompts. Batches (see `velo_scale.data.speech`):

  {"inputs": float32[b, T, F], "input_paddings": float32[b, T],
   "targets": int32[b, L], "target_paddings": float32[b, L]}

with 1.0 marking padding. The model maps `(inputs, input_paddings, train)` to
`(logits [b, T', V], logit_paddings [b, T'])`; token 0 is the CTC blank.
Training minimises the CTC loss summed over utterances per target token (as
AlgoPerf's `loss_fn`). Evaluation runs on the host: greedy CTC decoding
(best token per frame, repeats merged, blanks dropped), detokenisation and
word / character edit distances against the reference transcripts, summed over
the eval split (corpus WER = word errors / reference words).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from velo_scale.data.iterator import epoch_batches
from velo_scale.data.speech import make_vocab
from velo_scale.workloads.base import FullScale, Workload, gin_configurables

BLANK_ID = 0

# AlgoPerf's published facts (validation WER targets, step hints, batch size).
CONFORMER_FULL_SCALE = FullScale(
    target_metric="wer",
    target_value=0.085884,
    higher_is_better=False,
    step_hint=76_000,
    batch_size=256,
    num_params=32_321_792,
)
DEEPSPEECH_FULL_SCALE = FullScale(
    target_metric="wer",
    target_value=0.119936,
    higher_is_better=False,
    step_hint=38_400,
    batch_size=256,
    num_params=18_381_312,
)


# -- decoding and error rates -------------------------------------------------


def ctc_greedy_decode(
    ids: np.ndarray, paddings: np.ndarray, blank_id: int = BLANK_ID
) -> list[list[int]]:
    """Best-path CTC decoding of per-frame argmax tokens.

    Over the unpadded frames of each row: merge runs of the same token, then
    drop blanks ("a a _ a b b" -> "a a b": a blank separates real repeats).

    Args:
      ids: int[b, T] argmax token per frame.
      paddings: float[b, T], 1.0 on padding frames.

    Returns:
      b lists of token ids.
    """
    ids = np.asarray(ids)
    valid = np.asarray(paddings) < 0.5
    out = []
    for row, keep in zip(ids, valid):
        row = row[keep]
        if row.size == 0:
            out.append([])
            continue
        first_of_run = np.concatenate([[True], row[1:] != row[:-1]])
        out.append([int(t) for t in row[first_of_run] if t != blank_id])
    return out


def edit_distance(reference: Sequence[Any], hypothesis: Sequence[Any]) -> int:
    """Levenshtein distance (substitutions + deletions + insertions, each 1)
    between two sequences (words, characters, token ids).

    Row by row over `reference`; within a row, insertions are a running
    minimum: `d[i, j] = j + min_{k <= j} (t[k] - k)` with
    `t[k] = min(d[i-1, k] + 1, d[i-1, k-1] + (ref[i] != hyp[k]))`.
    """
    ref, hyp = list(reference), list(hypothesis)
    if not ref or not hyp:
        return max(len(ref), len(hyp))
    symbols: dict[Any, int] = {}
    r = np.array([symbols.setdefault(x, len(symbols)) for x in ref])
    h = np.array([symbols.setdefault(x, len(symbols)) for x in hyp])
    j = np.arange(len(h) + 1)
    row = j.copy()  # d[0, j] = j insertions.
    for i, symbol in enumerate(r, start=1):
        t = np.empty_like(row)
        t[0] = i
        t[1:] = np.minimum(row[1:] + 1, row[:-1] + (h != symbol))
        row = j + np.minimum.accumulate(t - j)
    return int(row[-1])


def error_counts(reference: str, hypothesis: str) -> dict[str, int]:
    """Word and character errors of one utterance (whitespace normalised).

    Returns:
      `{"word_errors", "words", "char_errors", "chars"}`: edit distances over
      words and characters (spaces included) and the reference's lengths.
    """
    ref_words, hyp_words = reference.split(), hypothesis.split()
    ref, hyp = " ".join(ref_words), " ".join(hyp_words)
    return {
        "word_errors": edit_distance(ref_words, hyp_words),
        "words": len(ref_words),
        "char_errors": edit_distance(ref, hyp),
        "chars": len(ref),
    }


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER: total word edit distance / total reference words."""
    if len(references) != len(hypotheses):
        raise ValueError(
            f"{len(references)} references but {len(hypotheses)} hypotheses."
        )
    errors = words = 0
    for ref, hyp in zip(references, hypotheses):
        counts = error_counts(ref, hyp)
        errors += counts["word_errors"]
        words += counts["words"]
    return errors / max(words, 1)


# -- the workload ----------------------------------------------------------------


def _pad_rows(batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Repeats the first row until the batch has `size` rows (one compiled
    shape for a short last eval batch; the extra rows are ignored)."""
    n = len(next(iter(batch.values())))
    if n == size:
        return dict(batch)
    index = np.concatenate([np.arange(n), np.zeros(size - n, np.int64)])
    return {k: np.asarray(v)[index] for k, v in batch.items()}


@dataclasses.dataclass(frozen=True, eq=False)
class SpeechRecognition(Workload):
    """CTC speech recognition (AlgoPerf LibriSpeech Conformer / DeepSpeech).

    Attributes:
      model: `(inputs, input_paddings, train) -> (logits, logit_paddings)`
        with BatchNorm statistics in `batch_stats`, e.g. `Conformer`,
        `DeepSpeech`.
      vocab: "characters" (`CharacterVocab`) or the path of a SentencePiece
        model (LibriSpeech: `<data_dir>/spm_model.vocab`) to turn ids into text.
      num_frames, num_features, max_target_length: shapes of `dummy_batch`
        (LibriSpeech: 1998 frames of 80 bins, 256 tokens).
      full_scale: the published workload facts, if any.
    """

    model: nn.Module
    vocab: str = "characters"
    num_frames: int = 320
    num_features: int = 80
    max_target_length: int = 48
    full_scale: FullScale | None = None

    def init_inputs(self, batch):
        return (batch["inputs"], batch["input_paddings"])

    def init_kwargs(self):
        return {"train": False}

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        b, t, length = batch_size, self.num_frames, self.max_target_length
        return {
            "inputs": np.zeros((b, t, self.num_features), np.float32),
            "input_paddings": np.zeros((b, t), np.float32),
            "targets": np.zeros((b, length), np.int32),
            "target_paddings": np.zeros((b, length), np.float32),
        }

    def _apply(self, params, model_state, batch, train, rng=None):
        variables = {"params": params, **model_state}
        args = (batch["inputs"], batch["input_paddings"])
        if not train:
            logits, paddings = self.model.apply(variables, *args, train=False)
            return logits, paddings, dict(model_state)
        rngs = {"dropout": rng}
        if not model_state:  # No BatchNorm statistics to update.
            logits, paddings = self.model.apply(variables, *args, train=True, rngs=rngs)
            return logits, paddings, {}
        (logits, paddings), new_state = self.model.apply(
            variables, *args, train=True, rngs=rngs, mutable=list(model_state)
        )
        return logits, paddings, {**model_state, **dict(new_state)}

    @staticmethod
    def _ctc(logits, logit_paddings, batch) -> jax.Array:
        """Per-utterance CTC negative log-likelihood, float32[b]."""
        return optax.ctc_loss(
            logits,
            logit_paddings,
            batch["targets"],
            batch["target_paddings"],
            blank_id=BLANK_ID,
        )

    def loss(self, params, model_state, batch, rng):
        logits, logit_paddings, new_state = self._apply(
            params, model_state, batch, train=True, rng=rng
        )
        per_utterance = self._ctc(logits, logit_paddings, batch)
        num_tokens = jnp.sum(1.0 - batch["target_paddings"])
        loss = jnp.sum(per_utterance) / jnp.maximum(num_tokens, 1.0)
        metrics = {"ctc_per_utterance": jnp.mean(per_utterance)}
        return loss, (metrics, new_state)

    def eval_outputs(self, params, model_state, batch) -> dict[str, jax.Array]:
        """Per-utterance CTC, best token per frame and the frame paddings."""
        logits, logit_paddings, _ = self._apply(params, model_state, batch, False)
        return {
            "ctc": self._ctc(logits, logit_paddings, batch),
            "ids": jnp.argmax(logits, axis=-1).astype(jnp.int32),
            "paddings": logit_paddings,
        }

    def transcribe(
        self, params, model_state, batch: Mapping[str, np.ndarray]
    ) -> list[tuple[str, str]]:
        """`(reference, hypothesis)` texts of a batch (greedy decoding)."""
        vocab = self._vocab()
        out = jax.device_get(
            self._jitted("eval_outputs")(params, model_state, _as_jax(batch))
        )
        hyps = ctc_greedy_decode(out["ids"], out["paddings"])
        pairs = []
        for i, hyp in enumerate(hyps):
            ref = np.asarray(batch["targets"][i])[
                np.asarray(batch["target_paddings"][i]) < 0.5
            ]
            pairs.append((vocab.decode(ref.tolist()), vocab.decode(hyp)))
        return pairs

    def evaluate(self, params, model_state, source, batch_size):
        """CTC loss per target token, WER and CER over every example."""
        vocab = self._vocab()
        fn = self._jitted("eval_outputs")
        totals = dict.fromkeys(
            ("ctc", "tokens", "word_errors", "words", "char_errors", "chars"), 0.0
        )
        size = None
        for batch in epoch_batches(source, batch_size):
            n = len(batch["targets"])
            size = size or n  # The first batch is full (or the whole split).
            out = jax.device_get(
                fn(params, model_state, _as_jax(_pad_rows(batch, size)))
            )
            hyps = ctc_greedy_decode(out["ids"][:n], out["paddings"][:n])
            valid = np.asarray(batch["target_paddings"]) < 0.5
            totals["ctc"] += float(np.sum(out["ctc"][:n]))
            totals["tokens"] += float(valid.sum())
            for i, hyp in enumerate(hyps):
                ref = vocab.decode(np.asarray(batch["targets"][i])[valid[i]].tolist())
                for k, v in error_counts(ref, vocab.decode(hyp)).items():
                    totals[k] += v
        return {
            "loss": totals["ctc"] / max(totals["tokens"], 1.0),
            "wer": totals["word_errors"] / max(totals["words"], 1.0),
            "cer": totals["char_errors"] / max(totals["chars"], 1.0),
        }

    def _vocab(self):
        cache = self.__dict__.setdefault("_vocab_cache", {})
        if self.vocab not in cache:
            cache[self.vocab] = make_vocab(self.vocab)
        return cache[self.vocab]


def _as_jax(batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in batch.items()}


GIN_CONFIGURABLES = gin_configurables(SpeechRecognition, FullScale)
