"""seqio Tasks on the offline Bible text, for T5X (`pip install velo-scale[seqio]`).

Importing this module registers two `seqio.Task`s (T5X gin files do it with
`import velo_scale.data.seqio_tasks`):

* `"bible_en_es_translate"` (WMT-like): English (King James Version) ->
  Spanish (Reina-Valera 1909) verse pairs of `velo_scale.data.bible`
  (Debian's `sword-text-kjv` and `sword-text-sparv`), inputs prefixed with
  `"translate English to Spanish: "` as T5 does for WMT. Splits: "train"
  (about 29,500 verses) and "validation" (the held-out ~5%, `bible.is_test_verse`,
  about 1,550). Metric: corpus BLEU (sacreBLEU defaults), `bleu`.
* `"bible_en_span_corruption"`: T5's span-corruption pre-training objective
  (Raffel et al. 2020, Section 3.1.4: noise density 0.15, mean span length 3,
  one sentinel per span) on the English side, one document per chapter
  (train verses only for "train", the held-out verses for "validation"), each
  document's tokens split into segments that fill `inputs` exactly.

Both use `bible_vocabulary()`: the project's joint English+Spanish
SentencePiece model (`bible.bible_vocab`, 2,000 pieces; ids 0 pad, 1 unk,
2 EOS) as a `seqio.SentencePieceVocabulary` with 100 sentinel ids
(`<extra_id_0>` = the highest id), 2,100 ids in all. The verse pairs and the
vocabulary are built on first use (1-3 min) and cached under
`$VELO_SCALE_CACHE`; registering the tasks reads nothing.

seqio 0.0.20 has no span-corruption preprocessor (it lives in the `t5`
package), so `span_corruption` and its pieces (`random_spans_noise_mask`,
`noise_span_to_unique_sentinel`, `span_corruption_lengths`) implement T5's
algorithm here with stateless TF ops, seeded by seqio.

This module imports seqio and TensorFlow; nothing else in velo_scale imports
it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

try:
    import seqio
    import tensorflow as tf
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "velo_scale.data.seqio_tasks needs seqio and TensorFlow, which are not "
        "installed. Install them with `pip install velo-scale[seqio]` (about "
        f"2 minutes, 3.2 GB). ({e})"
    ) from e

from velo_scale.data import bible

TRANSLATION_TASK = "bible_en_es_translate"
SPAN_CORRUPTION_TASK = "bible_en_span_corruption"
TRANSLATION_PREFIX = "translate English to Spanish: "
EXTRA_IDS = 100
SPLITS = ("train", "validation")
NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
# Inputs length used when seqio passes no sequence lengths (e.g. inference).
DEFAULT_INPUTS_LENGTH = 128

BAD_SPLIT_MSG = "split must be one of {}; got {!r}."


# -- vocabulary -----------------------------------------------------------------


class BibleVocabulary(seqio.SentencePieceVocabulary):
    """The Bible SentencePiece model as a seqio vocabulary, built on first use.

    A `seqio.SentencePieceVocabulary` of `bible.vocab_file(...)`; the model is
    trained and cached by `bible.bible_vocab(...)` the first time the
    vocabulary is loaded (not when it is constructed, so gin files and task
    registration stay cheap).

    Args:
      extra_ids: sentinel ids appended after the SentencePiece pieces
        (`<extra_id_0>` is the highest id, as T5's span corruption expects).
      books: OSIS book names the model is trained on (all when None).
      vocab_size: SentencePiece pieces (without the extra ids).

    Example:
      >>> vocab = BibleVocabulary()  # doctest: +SKIP
      >>> vocab.vocab_size, vocab.eos_id, vocab.pad_id  # doctest: +SKIP
      (2100, 2, 0)
    """

    def __init__(
        self,
        extra_ids: int = EXTRA_IDS,
        *,
        books: Sequence[str] | None = None,
        vocab_size: int = bible.VOCAB_SIZE,
    ):
        self._books = None if books is None else tuple(books)
        self._sp_vocab_size = vocab_size
        path = bible.vocab_file(vocab_size=vocab_size, books=self._books)
        super().__init__(str(path), extra_ids=extra_ids)

    def _model_context(self):
        if not self._model:
            bible.bible_vocab(vocab_size=self._sp_vocab_size, books=self._books)
        return super()._model_context()


def bible_vocabulary(
    extra_ids: int = EXTRA_IDS, *, books: Sequence[str] | None = None
) -> BibleVocabulary:
    """The tasks' vocabulary (gin: `VOCABULARY = @velo_seqio.bible_vocabulary()`)."""
    return BibleVocabulary(extra_ids, books=books)


# -- data sources ---------------------------------------------------------------


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(BAD_SPLIT_MSG.format(SPLITS, split))


def _in_split(reference: str, split: str) -> bool:
    return bible.is_test_verse(reference) == (split == "validation")


def translation_pairs(
    split: str, *, books: Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """English and Spanish verse texts of `split`, in canonical order."""
    _check_split(split)
    pairs = bible.verse_pairs(books=books)
    chosen = [(en, es) for ref, en, es in pairs if _in_split(ref, split)]
    return [en for en, _ in chosen], [es for _, es in chosen]


def chapter_documents(split: str, *, books: Sequence[str] | None = None) -> list[str]:
    """English chapters of `split` (its verses joined by spaces), in order."""
    _check_split(split)
    chapters: dict[str, list[str]] = {}
    for ref, en, _ in bible.verse_pairs(books=books):
        if _in_split(ref, split):
            chapters.setdefault(ref.rsplit(".", 1)[0], []).append(en)
    return [" ".join(verses) for verses in chapters.values()]


def _shuffled(columns: Mapping[str, list[str]], shuffle: bool, seed: int | None):
    """A tf.data.Dataset of the columns' rows, permuted when `shuffle` (the
    source is one "file": shuffling it stands in for file shuffling)."""
    import numpy as np

    n = len(next(iter(columns.values())))
    order = np.arange(n)
    if shuffle:
        order = np.random.default_rng(seed).permutation(n)
    return tf.data.Dataset.from_tensor_slices(
        {k: tf.constant([v[i] for i in order], tf.string) for k, v in columns.items()}
    )


def _translation_source(books: Sequence[str] | None) -> seqio.FunctionDataSource:
    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None):
        english, spanish = translation_pairs(split, books=books)
        return _shuffled({"en": english, "es": spanish}, shuffle_files, seed)

    return seqio.FunctionDataSource(dataset_fn, splits=SPLITS)


def _chapter_source(books: Sequence[str] | None) -> seqio.FunctionDataSource:
    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None):
        return _shuffled(
            {"text": chapter_documents(split, books=books)}, shuffle_files, seed
        )

    return seqio.FunctionDataSource(dataset_fn, splits=SPLITS)


@seqio.map_over_dataset
def _translation_features(x: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return {
        "inputs": tf.strings.join([TRANSLATION_PREFIX, x["en"]]),
        "targets": x["es"],
    }


@seqio.map_over_dataset
def _text_as_targets(x: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return {"targets": x["text"]}


# -- span corruption ------------------------------------------------------------


def span_corruption_lengths(
    inputs_length: int,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tuple[int, int]:
    """Segment length that fills `inputs_length`, and the targets' length.

    A segment of n tokens has `round(n * noise_density)` noise tokens in
    `round(noise / mean_noise_span_length)` spans; its inputs are the other
    tokens, one sentinel per span and EOS, its targets the noise tokens, one
    sentinel per span and EOS. Returns the largest n whose inputs fit, and the
    length of its targets (T5's `random_spans_helper`).

    Args:
      inputs_length: the task's `inputs` length (EOS included).
      noise_density: fraction of tokens masked.
      mean_noise_span_length: mean length of a masked span.

    Returns:
      (tokens per segment, targets length).

    Raises:
      ValueError: `inputs_length` too short to hold one span.

    Example:
      >>> span_corruption_lengths(128)
      (141, 29)
    """

    def lengths(n: int) -> tuple[int, int]:
        noise = int(round(n * noise_density))
        spans = int(round(noise / mean_noise_span_length))
        return n - noise + spans + 1, noise + spans + 1

    if inputs_length < 4:
        raise ValueError(
            f"span corruption needs inputs_length >= 4; got {inputs_length=}."
        )
    n = inputs_length - 1
    while lengths(n + 1)[0] <= inputs_length:
        n += 1
    return n, lengths(n)[1]


def _random_segmentation(num_items, num_segments, seed):
    """Lengths of `num_segments` random non-empty segments summing to
    `num_items` (int32[num_segments])."""
    first_in_segment = tf.cast(tf.range(num_items - 1) < num_segments - 1, tf.int32)
    first_in_segment = seqio.utils.stateless_shuffle(first_in_segment, seed)
    segment_id = tf.cumsum(tf.pad(first_in_segment, [[1, 0]]))
    return tf.math.segment_sum(tf.ones_like(segment_id), segment_id)


def random_spans_noise_mask(
    length,
    seeds,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
):
    """T5's noise mask: bool[length], about `noise_density` of it True, in
    spans of mean length `mean_noise_span_length`, never starting with noise.

    Args:
      length: int32 scalar, the sequence length (>= 1).
      seeds: int32[2, 2], two stateless seeds (span lengths of noise and of
        the rest).
      noise_density, mean_noise_span_length: as `span_corruption_lengths`.

    Returns:
      bool[length]; noise and non-noise spans alternate, starting with
      non-noise.
    """
    original_length = length
    length = tf.maximum(length, 2)
    num_noise = tf.cast(tf.round(tf.cast(length, tf.float32) * noise_density), tf.int32)
    num_noise = tf.clip_by_value(num_noise, 1, length - 1)
    num_spans = tf.cast(
        tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length), tf.int32
    )
    num_spans = tf.maximum(num_spans, 1)
    noise_lengths = _random_segmentation(num_noise, num_spans, seeds[0])
    other_lengths = _random_segmentation(length - num_noise, num_spans, seeds[1])
    interleaved = tf.reshape(tf.stack([other_lengths, noise_lengths], 1), [-1])
    starts = tf.cumsum(interleaved)[:-1]
    start_indicator = tf.math.unsorted_segment_sum(tf.ones_like(starts), starts, length)
    is_noise = tf.equal(tf.math.floormod(tf.cumsum(start_indicator), 2), 1)
    return is_noise[:original_length]


def noise_span_to_unique_sentinel(tokens, noise_mask, vocab_size: int):
    """Each noise span of `tokens` replaced by one sentinel id.

    Sentinels count down from `vocab_size - 1` (`<extra_id_0>`, `<extra_id_1>`,
    ... of a `seqio.SentencePieceVocabulary` with extra ids).

    Args:
      tokens: int32[n].
      noise_mask: bool[n].
      vocab_size: the vocabulary's size, extra ids included.

    Returns:
      int32[m], m = n - noise tokens + noise spans.

    Example:
      >>> noise_span_to_unique_sentinel(
      ...     tf.constant([5, 6, 7, 8]), tf.constant([False, True, True, False]), 100
      ... ).numpy().tolist()  # doctest: +SKIP
      [5, 99, 8]
    """
    previous_is_noise = tf.pad(noise_mask[:-1], [[1, 0]])
    first_noise = tf.logical_and(noise_mask, tf.logical_not(previous_is_noise))
    later_noise = tf.logical_and(noise_mask, previous_is_noise)
    sentinels = vocab_size - tf.cumsum(tf.cast(first_noise, tokens.dtype))
    tokens = tf.where(first_noise, sentinels, tokens)
    return tf.boolean_mask(tokens, tf.logical_not(later_noise))


def split_tokens(dataset: tf.data.Dataset, max_tokens: int, key: str = "targets"):
    """Each example's `key` tokens cut into consecutive segments of at most
    `max_tokens` (the last one shorter); empty sequences dropped."""

    def segments(x):
        tokens = x[key]
        n = tf.size(tokens)
        count = (n + max_tokens - 1) // max_tokens
        padded = tf.pad(tokens, [[0, count * max_tokens - n]])
        return {
            key: tf.reshape(padded, [count, max_tokens]),
            "length": tf.minimum(max_tokens, n - tf.range(count) * max_tokens),
        }

    dataset = dataset.filter(lambda x: tf.size(x[key]) > 0).map(segments)
    return dataset.unbatch().map(lambda x: {key: x[key][: x["length"]]})


@seqio.map_over_dataset(num_seeds=2)
def _denoise(x, seeds, vocab_size, noise_density, mean_noise_span_length):
    tokens = x["targets"]
    mask = random_spans_noise_mask(
        tf.size(tokens), seeds, noise_density, mean_noise_span_length
    )
    return {
        "inputs": noise_span_to_unique_sentinel(tokens, mask, vocab_size),
        "targets": noise_span_to_unique_sentinel(
            tokens, tf.logical_not(mask), vocab_size
        ),
    }


def span_corruption(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int] | None,
    output_features: Mapping[str, seqio.Feature],
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tf.data.Dataset:
    """T5's span corruption of tokenized `targets` (a seqio preprocessor).

    Splits each document's tokens into segments sized so that the corrupted
    inputs fill `sequence_length["inputs"]` (EOS included, see
    `span_corruption_lengths`), masks random spans (`random_spans_noise_mask`)
    and writes `inputs` (the text with one sentinel per masked span) and
    `targets` (each sentinel followed by the tokens it hides). Place it after
    tokenization and before `seqio.preprocessors.append_eos_after_trim`.

    Args:
      dataset: examples with `targets`, int32[n] token ids (no EOS).
      sequence_length: the task's feature lengths (seqio passes them; None
        uses an inputs length of 128).
      output_features: the task's features (seqio passes them); the
        sentinels come from `output_features["targets"].vocabulary`.
      noise_density, mean_noise_span_length: the objective's settings.

    Returns:
      Examples `{"inputs": int32[<= inputs length - 1], "targets": int32[...]}`.

    References:
      Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a
      Unified Text-to-Text Transformer", Section 3.1.4.
    """
    inputs_length = (sequence_length or {}).get("inputs") or DEFAULT_INPUTS_LENGTH
    tokens_length, _ = span_corruption_lengths(
        inputs_length, noise_density, mean_noise_span_length
    )
    vocab_size = output_features["targets"].vocabulary.vocab_size
    dataset = split_tokens(dataset, tokens_length)
    return _denoise(
        dataset,
        vocab_size=vocab_size,
        noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length,
    )


# -- metrics --------------------------------------------------------------------


def bleu(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU in [0, 100] (sacreBLEU defaults: 13a tokenisation,
    exponential smoothing), one reference per example: `{"bleu": score}`."""
    import sacrebleu

    score = sacrebleu.corpus_bleu(list(predictions), [list(targets)]).score
    return {"bleu": float(score)}


# -- registration ---------------------------------------------------------------


def register_tasks(
    *, books: Sequence[str] | None = None, suffix: str = "", overwrite: bool = False
) -> tuple[str, str]:
    """Registers the translation and span-corruption tasks with seqio.

    Done at import with the defaults; call it with `books=` (and a `suffix`)
    to register tasks over a few books (fast to build, e.g. for tests).

    Args:
      books: OSIS book names (all when None), for the data and the vocabulary.
      suffix: appended to both task names.
      overwrite: replace tasks already registered under these names.

    Returns:
      The (translation, span-corruption) task names.
    """
    vocab = BibleVocabulary(books=books)
    names = (TRANSLATION_TASK + suffix, SPAN_CORRUPTION_TASK + suffix)
    if overwrite:
        for name in names:
            seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        names[0],
        source=_translation_source(books),
        output_features={
            "inputs": seqio.Feature(vocab, add_eos=True),
            "targets": seqio.Feature(vocab, add_eos=True),
        },
        preprocessors=[
            _translation_features,
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            seqio.preprocessors.append_eos_after_trim,
        ],
        metric_fns=[bleu],
    )
    seqio.TaskRegistry.add(
        names[1],
        source=_chapter_source(books),
        output_features={
            "inputs": seqio.Feature(vocab, add_eos=True, required=False),
            "targets": seqio.Feature(vocab, add_eos=True),
        },
        preprocessors=[
            _text_as_targets,
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            span_corruption,
            seqio.preprocessors.append_eos_after_trim,
        ],
        metric_fns=[],
    )
    return names


def task_feature_lengths(inputs_length: int = DEFAULT_INPUTS_LENGTH) -> dict[str, int]:
    """T5X's `TASK_FEATURE_LENGTHS` for the span-corruption task: the inputs
    length and the targets length it implies, rounded up to a multiple of 8."""
    _, targets = span_corruption_lengths(inputs_length)
    return {"inputs": inputs_length, "targets": int(math.ceil(targets / 8) * 8)}


if TRANSLATION_TASK not in seqio.TaskRegistry.names():
    register_tasks()


__all__ = [
    "BibleVocabulary",
    "SPAN_CORRUPTION_TASK",
    "TRANSLATION_TASK",
    "bible_vocabulary",
    "bleu",
    "chapter_documents",
    "noise_span_to_unique_sentinel",
    "random_spans_noise_mask",
    "register_tasks",
    "span_corruption",
    "span_corruption_lengths",
    "split_tokens",
    "task_feature_lengths",
    "translation_pairs",
]
