"""seqio Tasks on the Bible text (velo_scale.data.seqio_tasks) and the T5X
pieces around them that do not need t5x: the vocabulary, the translation and
span-corruption tasks, T5X's feature converter on them, and the gin recipes'
settings.

The tasks are registered over a few books with a temporary cache, so the
SentencePiece model trains in seconds. Skipped only when seqio is not
installed (`pip install velo-scale[seqio]`; CI installs it).
"""

import importlib.util
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

if importlib.util.find_spec("seqio") is None:
    pytest.skip(
        "seqio is not installed (pip install velo-scale[seqio])",
        allow_module_level=True,
    )

import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

from velo_scale.data import bible  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
GIN_DIR = REPO / "gin_configs" / "t5x"
BOOKS = ("Ruth", "Jonah", "Titus", "Phlm")
SUFFIX = "_ci_books"
LENGTHS = {"inputs": 128, "targets": 32}


@pytest.fixture(scope="module")
def st(tmp_path_factory):
    """The module, with tasks over BOOKS registered against a temp cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VELO_SCALE_CACHE", str(tmp_path_factory.mktemp("cache")))
        from velo_scale.data import seqio_tasks

        names = seqio_tasks.register_tasks(books=BOOKS, suffix=SUFFIX, overwrite=True)
        translate, corrupt = (seqio.get_mixture_or_task(n) for n in names)
        vocab = translate.output_features["targets"].vocabulary
        vocab.load_model()  # trains and caches the model inside the temp cache
        pairs = bible.verse_pairs(books=BOOKS)
        yield seqio_tasks, translate, corrupt, vocab, pairs


def _examples(task, split, lengths, seed=0, shuffle=False):
    ds = task.get_dataset(lengths, split=split, shuffle=shuffle, seed=seed)
    return list(ds.as_numpy_iterator())


def test_tasks_are_registered_at_import(st):
    seqio_tasks = st[0]
    names = seqio.TaskRegistry.names()
    assert seqio_tasks.TRANSLATION_TASK in names
    assert seqio_tasks.SPAN_CORRUPTION_TASK in names
    task = seqio.get_mixture_or_task(seqio_tasks.TRANSLATION_TASK)
    assert sorted(task.splits) == ["train", "validation"]
    assert [f.__name__ for f in task.metric_fns] == ["bleu"]


def test_vocabulary_round_trips_and_matches_the_project_model(st):
    seqio_tasks, _, _, vocab, pairs = st
    sp = bible.bible_vocab(books=BOOKS)
    assert (vocab.pad_id, vocab.unk_id, vocab.eos_id) == (0, 1, 2)
    assert vocab.vocab_size == sp.vocab_size + seqio_tasks.EXTRA_IDS
    for _, en, es in pairs[:20]:
        for text in (en, es):
            ids = vocab.encode(text)
            assert ids == sp.encode(text)[:-1]  # the project's ids, without EOS
            assert all(0 < i < sp.vocab_size for i in ids)
            assert vocab.decode(ids) == text
            tf_ids = vocab.encode_tf(tf.constant(text)).numpy().tolist()
            assert tf_ids == ids
            assert vocab.decode_tf(tf.constant(ids)).numpy().decode() == text
    # Sentinels: <extra_id_0> is the highest id.
    assert vocab.encode("<extra_id_0>")[-1] == vocab.vocab_size - 1
    assert vocab.encode("<extra_id_1>")[-1] == vocab.vocab_size - 2


def test_translation_examples(st):
    seqio_tasks, translate, _, vocab, pairs = st
    lengths = {"inputs": 64, "targets": 64}
    for split in ("train", "validation"):
        want = [
            (en, es)
            for ref, en, es in pairs
            if bible.is_test_verse(ref) == (split == "validation")
        ]
        got = _examples(translate, split, lengths)
        assert len(got) == len(want) > 0
        for ex, (en, es) in zip(got, want):
            assert (
                ex["inputs_pretokenized"].decode()
                == seqio_tasks.TRANSLATION_PREFIX + en
            )
            assert ex["targets_pretokenized"].decode() == es
            for key in ("inputs", "targets"):
                ids = ex[key]
                assert ids.dtype == np.int32 and ids.ndim == 1
                assert 0 < len(ids) <= lengths[key]
                assert ids.min() > 0 and ids.max() < vocab.vocab_size
                assert ids[-1] == vocab.eos_id  # appended after trimming
            full = vocab.encode(es)
            if len(full) < lengths["targets"]:
                assert ex["targets"].tolist() == full + [vocab.eos_id]


def test_span_corruption_reconstructs_the_text(st):
    seqio_tasks, _, corrupt, vocab, _ = st
    got = _examples(corrupt, "train", LENGTHS)
    docs = seqio_tasks.chapter_documents("train", books=BOOKS)
    n_tokens, _ = seqio_tasks.span_corruption_lengths(LENGTHS["inputs"])
    segments = []
    for doc in docs:
        ids = vocab.encode(doc)
        segments += [ids[i : i + n_tokens] for i in range(0, len(ids), n_tokens)]
    assert len(got) == len(segments)
    sentinel_min = vocab.vocab_size - seqio_tasks.EXTRA_IDS
    noise = total = 0
    for ex, segment in zip(got, segments):
        inputs, targets = ex["inputs"].tolist(), ex["targets"].tolist()
        assert ex["inputs"].dtype == np.int32 and ex["targets"].dtype == np.int32
        assert len(inputs) <= LENGTHS["inputs"] and len(targets) <= LENGTHS["targets"]
        assert inputs[-1] == targets[-1] == vocab.eos_id
        assert 0 < min(inputs + targets) and max(inputs + targets) < vocab.vocab_size
        # Put each sentinel's hidden tokens back: the original segment.
        spans, current = {}, None
        for t in targets[:-1]:
            if t >= sentinel_min:
                current = t
                spans[current] = []
            else:
                spans[current].append(t)
        rebuilt = []
        for t in inputs[:-1]:
            rebuilt += spans.pop(t) if t >= sentinel_min else [t]
        assert rebuilt == segment and not spans
        sentinels = [t for t in inputs if t >= sentinel_min]
        assert sentinels == list(
            range(vocab.vocab_size - 1, vocab.vocab_size - 1 - len(sentinels), -1)
        )
        noise += len(targets) - 1 - len(sentinels)
        total += len(segment)
    assert abs(noise / total - seqio_tasks.NOISE_DENSITY) < 0.02
    # Full segments fill the inputs exactly.
    assert max(len(ex["inputs"]) for ex in got) == LENGTHS["inputs"]


def test_span_corruption_is_deterministic_given_the_seed(st):
    _, _, corrupt, _, _ = st
    a = _examples(corrupt, "validation", LENGTHS, seed=3, shuffle=True)
    b = _examples(corrupt, "validation", LENGTHS, seed=3, shuffle=True)
    c = _examples(corrupt, "validation", LENGTHS, seed=4, shuffle=True)
    assert len(a) > 0
    assert all((x["inputs"] == y["inputs"]).all() for x, y in zip(a, b))
    assert any(
        len(x["inputs"]) != len(y["inputs"]) or (x["inputs"] != y["inputs"]).any()
        for x, y in zip(a, c)
    )


def test_noise_mask_and_lengths(st):
    seqio_tasks = st[0]
    assert seqio_tasks.span_corruption_lengths(512) == (568, 114)  # T5's numbers
    assert seqio_tasks.span_corruption_lengths(128) == (141, 29)
    assert seqio_tasks.task_feature_lengths(128) == LENGTHS
    with pytest.raises(ValueError, match="inputs_length"):
        seqio_tasks.span_corruption_lengths(2)
    seeds = tf.constant([[1, 2], [3, 4]])
    mask = seqio_tasks.random_spans_noise_mask(568, seeds).numpy()
    assert mask.shape == (568,) and mask.sum() == 85 and not mask[0]
    starts = np.flatnonzero(mask & ~np.r_[False, mask[:-1]])
    assert len(starts) == 28  # round(85 / 3) spans
    assert seqio_tasks.random_spans_noise_mask(1, seeds).numpy().tolist() == [False]
    out = seqio_tasks.noise_span_to_unique_sentinel(
        tf.constant([5, 6, 7, 8, 9]), tf.constant([False, True, True, False, True]), 100
    )
    assert out.numpy().tolist() == [5, 99, 8, 98]


def test_t5x_feature_converter_packs_the_tasks(st):
    _, translate, corrupt, vocab, _ = st
    for task, lengths in (
        (corrupt, LENGTHS),
        (translate, {"inputs": 64, "targets": 64}),
    ):
        ds = task.get_dataset(lengths, split="train", shuffle=False, seed=0)
        converted = seqio.EncDecFeatureConverter(pack=True)(ds, lengths)
        ex = next(converted.as_numpy_iterator())
        assert ex["encoder_input_tokens"].shape == (lengths["inputs"],)
        assert ex["decoder_target_tokens"].shape == (lengths["targets"],)
        assert ex["decoder_input_tokens"][0] == 0  # T5X's decoder start token
        assert ex["encoder_segment_ids"].max() >= 1
        assert ex["decoder_target_tokens"].max() < vocab.vocab_size


def test_bleu_metric(st):
    seqio_tasks = st[0]
    refs = [
        "En el principio creó Dios los cielos y la tierra.",
        "Y la tierra estaba desordenada.",
    ]
    assert seqio_tasks.bleu(refs, refs) == {"bleu": pytest.approx(100.0)}
    import sacrebleu

    preds = ["En el principio Dios creó los cielos.", "la tierra estaba vacía."]
    want = sacrebleu.corpus_bleu(preds, [refs]).score
    assert seqio_tasks.bleu(refs, preds)["bleu"] == pytest.approx(want)


def test_bad_split_is_refused(st):
    seqio_tasks = st[0]
    with pytest.raises(ValueError, match="'test'"):
        seqio_tasks.translation_pairs("test", books=BOOKS)


def _gin_values(name):
    return (GIN_DIR / name).read_text()


def test_gin_recipes_match_the_tasks(st):
    seqio_tasks, *_ = st
    full_vocab_size = bible.VOCAB_SIZE + seqio_tasks.EXTRA_IDS
    for name, task in (
        ("bible_pretrain.gin", seqio_tasks.SPAN_CORRUPTION_TASK),
        ("bible_finetune.gin", seqio_tasks.TRANSLATION_TASK),
    ):
        text = _gin_values(name)
        assert "import velo_scale.data.seqio_tasks" in text
        assert f"MIXTURE_OR_TASK_NAME = '{task}'" in text
        vocab_size = int(re.search(r"vocab_size = (\d+)", text).group(1))
        assert vocab_size >= full_vocab_size and vocab_size % 128 == 0
    lengths = re.search(
        r"TASK_FEATURE_LENGTHS = (\{[^}]*\})", _gin_values("bible_pretrain.gin")
    )
    assert eval(lengths.group(1)) == seqio_tasks.task_feature_lengths(128)  # noqa: S307
    # The optimizer switch is one include of velo.gin / velo_finetune.gin.
    for name in ("velo.gin", "velo_finetune.gin"):
        assert "train_script.train.trainer_cls = @velo_t5x.VeLOTrainer" in _gin_values(
            name
        )


def test_velo_scale_does_not_import_seqio_or_tensorflow():
    code = (
        "import sys, velo_scale, velo_scale.data, velo_scale.train, "
        "velo_scale.integrations.t5x, velo_scale.data.bible; "
        "print(sorted(m for m in ('seqio', 'tensorflow') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_check_scripts_refuse_a_missing_checkout(tmp_path):
    for script in ("t5x_check.py", "algoperf_check.py"):
        path = REPO / "velo_scale" / "integrations" / "checks" / script
        out = subprocess.run(
            [sys.executable, str(path), str(tmp_path / "nowhere")],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 2, out.stderr
        assert "checkout" in out.stderr
