"""The translation workload: AlgoPerf's WMT Transformer parameter count, the
Bible verse pairs (a few books, so no full two-minute parse), the loss,
accuracy and BLEU against hand-checked values, cached greedy decoding, the WMT
loader's preprocessing and errors, and the small recipe end to end."""

import dataclasses
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.reference_data import CHECKPOINT
from velo_scale import cli
from velo_scale.data import bible
from velo_scale.models.transformer import (
    WMT_NUM_PARAMS,
    Transformer,
    shift_right,
    sinusoidal_positions,
)
from velo_scale.workloads import abstract_variables, count_params
from velo_scale.workloads import translation as tr_wl

REPO = pathlib.Path(__file__).resolve().parent.parent
BOOKS = ("Ruth", "Joel", "Jonah", "Hag", "Titus", "Phlm", "Jude", "2John", "3John")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Train/test pairs and vocabulary of a few books, cached in a temp dir."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VELO_SCALE_CACHE", str(tmp_path_factory.mktemp("cache")))
        train = bible.load_translation("train", books=BOOKS)
        test = bible.load_translation("test", books=BOOKS)
        vocab = bible.bible_vocab(books=BOOKS)
        pairs = bible.verse_pairs(books=BOOKS)
    return train, test, vocab, pairs


def _tiny(vocab_size, max_len=16, **kw):
    return Transformer(
        vocab_size=vocab_size, width=16, num_layers=1, num_heads=2, mlp_dim=32,
        max_len=max_len, **kw,
    )  # fmt: skip


# -- (a) the full-scale recipe -------------------------------------------------


def test_full_recipe_builds_with_algoperf_parameter_count(monkeypatch):
    import gin

    monkeypatch.chdir(REPO)
    cli.parse_gin(["recipes/wmt_transformer.gin"], [])
    workload = cli.configured_value("train.workload")
    assert isinstance(workload, tr_wl.Translation)
    variables = abstract_variables(workload)
    # AlgoPerf's wmt_jax Transformer (TransformerConfig defaults) has exactly
    # 133,521,408 parameters: 32,768,000 shared embedding + 37,787,648
    # encoder + 62,965,760 decoder.
    assert count_params(variables["params"]) == WMT_NUM_PARAMS == 133_521_408
    assert workload.full_scale.num_params == WMT_NUM_PARAMS
    params = variables["params"]
    assert params["shared_embedding"].shape == (32000, 1024)
    assert params["encoderblock_5"]["mlp"]["wi"]["kernel"].shape == (1024, 1024)
    assert params["encoderdecoderblock_5"]["cross_attention"]["query"][
        "kernel"
    ].shape == (1024, 16, 64)
    assert "encoderblock_6" not in params and "encoderdecoderblock_6" not in params
    fs = workload.full_scale
    assert (fs.target_metric, fs.target_value, fs.higher_is_better) == (
        "bleu", 30.8491, True,
    )  # fmt: skip
    assert (fs.step_hint, fs.batch_size) == (120_000, 128)
    assert gin.query_parameter("train.num_steps") == 120_000
    assert gin.query_parameter("train.batch_size") == 128
    assert gin.query_parameter("train.data") == "wmt17_de_en"
    assert workload.label_smoothing == 0.1


def test_parameters_carry_logical_axes():
    model = _tiny(50)
    x = jnp.zeros((2, 8), jnp.int32)
    specs = nn.get_partition_spec(jax.eval_shape(model.init, jax.random.key(0), x, x))
    p = specs["params"]
    assert tuple(p["shared_embedding"]) == ("vocab", "embed")
    block = p["encoderdecoderblock_0"]
    assert tuple(block["self_attention"]["query"]["kernel"]) == ("embed", "heads", "kv")
    assert tuple(block["cross_attention"]["out"]["kernel"]) == ("heads", "kv", "embed")
    assert tuple(block["mlp"]["wi"]["kernel"]) == ("embed", "mlp")


# -- (b) the small data ----------------------------------------------------------


def test_bible_pairs_load_as_padded_token_ids(small):
    train, test, vocab, pairs = small
    for data in (train, test):
        assert set(data) == {"inputs", "targets"}
        for x in data.values():
            assert x.dtype == np.int32 and x.shape == (len(data["inputs"]), 48)
            assert x.min() >= 0 and x.max() < vocab.vocab_size
            # Exactly one EOS per row, the last nonzero token, then padding.
            length = (x > 0).sum(1)
            assert np.all(length >= 2)
            assert np.all(x[np.arange(len(x)), length - 1] == bible.EOS_ID)
            assert np.all((x == bible.EOS_ID).sum(1) == 1)
            assert not np.any((x[:, 1:] > 0) & (x[:, :-1] == 0))  # No holes.
    assert len(train["inputs"]) > 200 and len(test["inputs"]) > 5
    # Canonical order: Ruth 1:1 comes first but is too long for 48 tokens;
    # the first train example is the first train verse that fits, Ruth 1:3.
    assert pairs[0][0] == "Ruth.1.1"
    assert len(vocab.encode(pairs[0][1])) > 48
    ref, english, spanish = pairs[2]
    assert ref == "Ruth.1.3" and not bible.is_test_verse(ref)
    assert (
        english
        == "And Elimelech Naomi’s husband died; and she was left, and her two sons."
    )
    assert vocab.decode(train["inputs"][0]) == english
    assert vocab.decode(train["targets"][0]) == spanish


def test_split_is_a_deterministic_disjoint_partition(small):
    _, _, _, pairs = small
    refs = [ref for ref, _, _ in pairs]
    assert len(set(refs)) == len(refs)
    test_refs = {r for r in refs if bible.is_test_verse(r)}
    assert 0 < len(test_refs) < 0.15 * len(refs)
    # About 5% of any large set of verses is held out.
    assert sum(bible.is_test_verse(f"Ps.{c}.{v}") for c in range(1, 151)
               for v in range(1, 7)) in range(20, 70)  # fmt: skip
    # Train and test share no sentence pair.
    train, test, _, _ = small

    def rows(d):
        return {a.tobytes() + b.tobytes() for a, b in zip(d["inputs"], d["targets"])}

    assert not rows(train) & rows(test)


def test_loading_is_deterministic_and_cached(small, tmp_path, monkeypatch):
    train, _, vocab, _ = small
    monkeypatch.setenv("VELO_SCALE_CACHE", str(tmp_path))
    again = bible.load_translation("train", books=BOOKS)
    np.testing.assert_array_equal(again["inputs"], train["inputs"])
    np.testing.assert_array_equal(again["targets"], train["targets"])
    assert list((tmp_path / "bible").glob("spm-*.model"))
    short = bible.load_translation("train", books=BOOKS, max_len=24)
    assert short["inputs"].shape[1] == 24 and len(short["inputs"]) < len(
        train["inputs"]
    )


def test_clean_osis_drops_notes_and_headings():
    raw = (
        '<title canonical="true" type="psalm">A <w lemma="x">Psalm</w>.</title> '
        "<title><foreign>BETH.</foreign></title>"
        '<w lemma="strong:H1">God</w><note placement="foot">a note</note>'
        "<w>created</w> <transChange>the</transChange> heaven ."
    )
    assert bible.clean_osis(raw) == "A Psalm. God created the heaven."


def test_missing_sword_modules_and_wmt_data_raise_clear_errors(small, tmp_path):
    with pytest.raises(FileNotFoundError, match="sword-text-kjv"):
        bible.read_verses("engKJV2006eb", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data_dir"):
        bible.load_wmt("train", None)
    with pytest.raises(FileNotFoundError, match="wmt_sentencepiece_model"):
        bible.load_wmt("test", str(tmp_path))
    with pytest.raises(ValueError, match="split"):
        bible.load_translation("validation")
    # With the vocabulary present, the prepared TFDS data are looked for next.
    (tmp_path / "wmt").mkdir()
    (tmp_path / "wmt" / "wmt_sentencepiece_model").write_bytes(
        small[2].processor.serialized_model_proto()
    )
    with pytest.raises((FileNotFoundError, ImportError), match="tfds|tensorflow"):
        bible.load_wmt("train", str(tmp_path))


def test_wmt_records_are_tokenised_padded_and_truncated(small):
    vocab = small[2]
    tokenize = bible.TokenizePair(vocab, max_len=12)
    record = {"de": np.array(b"Und Gott sprach"), "en": b"And God said"}
    out = tokenize(record)
    assert out["inputs"].shape == out["targets"].shape == (12,)
    assert out["targets"].dtype == np.int32
    assert vocab.decode(out["targets"]) == "And God said"
    n = int((out["targets"] > 0).sum())
    assert out["targets"][n - 1] == vocab.eos_id and not out["targets"][n:].any()
    long = tokenize({"de": b"a " * 40, "en": b"b " * 40})
    assert (long["inputs"] > 0).all()  # Truncated to max_len, no padding left.


# -- (c) the metrics -------------------------------------------------------------


def test_smoothed_cross_entropy_hand_checked():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
    targets = jnp.array([0])
    # nll = ln 2; mean_v(-log p_v) = (ln 2 + 2 ln 4) / 3.
    np.testing.assert_allclose(
        tr_wl.smoothed_cross_entropy(logits, targets), [np.log(2)], rtol=1e-6
    )
    expected = 0.9 * np.log(2) + 0.1 * (np.log(2) + 2 * np.log(4)) / 3
    np.testing.assert_allclose(
        tr_wl.smoothed_cross_entropy(logits, targets, 0.1), [expected], rtol=1e-6
    )
    np.testing.assert_allclose(expected, 0.739357, rtol=1e-5)
    # Same as optax's smoothed one-hot cross-entropy (AlgoPerf's formula).
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 5, 7)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 7, (4, 5)))
    reference = optax.softmax_cross_entropy(
        logits, optax.smooth_labels(jax.nn.one_hot(targets, 7), 0.1)
    )
    np.testing.assert_allclose(
        tr_wl.smoothed_cross_entropy(logits, targets, 0.1), reference, rtol=1e-5
    )


def test_corpus_bleu_hand_checked():
    same = tr_wl.corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"])
    np.testing.assert_allclose(same, 100.0)
    # All n-gram precisions 1, hypothesis 6 tokens vs reference 7: BP = e^(1-7/6).
    bleu = tr_wl.corpus_bleu(
        ["the cat sat on the mat"], ["the cat sat on the mat today"]
    )
    np.testing.assert_allclose(bleu, 100 * np.exp(1 - 7 / 6), rtol=1e-6)
    assert tr_wl.corpus_bleu(["a b c d"], ["w x y z"]) == 0.0


class _Echo(nn.Module):
    """Predicts the input token at every position (for hand-checked metrics)."""

    vocab_size: int = 10

    @nn.compact
    def __call__(self, inputs, targets, train=False):
        bias = self.param("bias", nn.initializers.zeros, (self.vocab_size,))
        return 10.0 * jax.nn.one_hot(inputs, self.vocab_size) + bias


def test_loss_accuracy_and_eval_ignore_padding():
    inputs = np.array([[5, 1, 7, 2, 0], [3, 3, 0, 0, 0], [4, 4, 4, 0, 0]], np.int32)
    targets = np.array([[5, 6, 7, 2, 0], [3, 2, 0, 0, 0], [4, 2, 0, 0, 0]], np.int32)
    batch = {"inputs": inputs, "targets": targets}
    workload = tr_wl.Translation(_Echo(), label_smoothing=0.0, max_len=5)
    params = workload.init(jax.random.key(0), batch)["params"]
    loss, (metrics, _) = workload.loss(params, {}, batch, jax.random.key(1))
    # Correct target tokens: row 0: 5, 7, 2 (3 of 4); row 1: 3 (1 of 2);
    # row 2: 4 (1 of 2): 5 of 8 non-padding tokens.
    np.testing.assert_allclose(metrics["accuracy"], 5 / 8)
    log_p = jax.nn.log_softmax(10.0 * jax.nn.one_hot(inputs, 10))
    nll = -np.take_along_axis(np.asarray(log_p), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss, nll[targets > 0].mean(), rtol=1e-6)
    # evaluate: the same numbers over uneven, padded batches.
    result = workload.evaluate(params, {}, batch, batch_size=2)
    np.testing.assert_allclose(result["accuracy"], 5 / 8)
    np.testing.assert_allclose(result["loss"], nll[targets > 0].mean(), rtol=1e-6)
    assert "bleu" not in result  # No vocabulary set.


def test_model_masks_padding_and_future_targets():
    model = _tiny(30, dropout_rate=0.0, attention_dropout_rate=0.0)
    rng = np.random.default_rng(0)
    inputs = np.array(rng.integers(1, 30, (2, 10)), np.int32)
    inputs[:, 7:] = 0
    targets = np.array(rng.integers(1, 30, (2, 9)), np.int32)
    targets[:, 6:] = 0
    params = model.init(jax.random.key(0), inputs, targets)["params"]
    apply = jax.jit(model.apply)
    logits = apply({"params": params}, inputs, targets)
    assert logits.shape == (2, 9, 30) and logits.dtype == jnp.float32
    # Changing target 4 changes nothing at positions 0..4 (causal, shifted
    # right) but changes position 5.
    other_t = targets.copy()
    other_t[:, 4] = (targets[:, 4] % 29) + 1
    logits2 = apply({"params": params}, inputs, other_t)
    np.testing.assert_allclose(logits2[:, :5], logits[:, :5], atol=1e-5)
    assert not np.allclose(logits2[:, 5], logits[:, 5])
    # More input padding is invisible.
    padded_in = np.concatenate([inputs, np.zeros((2, 6), np.int32)], 1)
    logits3 = apply({"params": params}, padded_in, targets)
    np.testing.assert_allclose(logits3[targets > 0], logits[targets > 0], atol=1e-5)


def test_positions_and_shift_right():
    table = sinusoidal_positions(4, 6)
    np.testing.assert_allclose(table[0], [0, 0, 0, 1, 1, 1])
    # Frequencies 1, 10000^-1/2, 10000^-1 at width 6.
    np.testing.assert_allclose(table[1, :3], np.sin([1.0, 0.01, 1e-4]), rtol=1e-6)
    np.testing.assert_array_equal(shift_right(jnp.array([[4, 5, 2]])), [[0, 4, 5]])


def test_greedy_decoding_matches_full_recomputation():
    eos = 3
    model = _tiny(12, max_len=8)
    workload = tr_wl.Translation(model, eos_id=eos, max_len=8, decode_batch_size=2)
    rng = np.random.default_rng(1)
    inputs = np.array(rng.integers(1, 12, (3, 8)), np.int32)
    inputs[0, 5:] = 0
    params = workload.init(jax.random.key(2), {"inputs": inputs, "targets": inputs})[
        "params"
    ]
    params = nn.meta.unbox(params)
    # Padding (id 0) gets logit 0 from a zero embedding row, below the best
    # of the other 11 logits here; teacher forcing masks 0 tokens out.
    params["shared_embedding"] = params["shared_embedding"].at[0].set(0.0)
    got = workload.translate(params, inputs, length=6)
    # Reference: run the whole teacher-forced model on the prefix each step
    # (a nonzero placeholder at the position being predicted).
    apply = jax.jit(model.apply)
    out = np.zeros((3, 6), np.int32)
    done = np.zeros(3, bool)
    for t in range(6):
        prefix = out.copy()
        prefix[:, t] = 1
        logits = apply({"params": params}, inputs, prefix)
        token = np.where(done, 0, np.argmax(np.asarray(logits[:, t]), -1))
        out[:, t] = token
        done |= token == eos
    np.testing.assert_array_equal(got, out)


# -- (d) the small recipe end to end ---------------------------------------------


def _train_small_recipe(small, workdir, optimizer_bindings):
    import gin

    train, test, vocab, _ = small
    cli.parse_gin(
        ["recipes/wmt_transformer_small.gin"],
        [
            *optimizer_bindings,
            f"Transformer.vocab_size = {vocab.vocab_size}",
            "Transformer.width = 32",
            "Transformer.mlp_dim = 64",
            "Transformer.num_layers = 1",
            "Translation.bleu_examples = 16",
            "Translation.decode_batch_size = 16",
            "train.num_steps = 4",
            "train.eval_every = 2",
            "train.batch_size = 16",
            "train.eval_batch_size = 32",
            "train.progress = False",
        ],
    )
    workload = cli.configured_value("train.workload")
    assert workload.vocab == "bible_en_es" and workload.max_len == 48
    # The few-book data need the vocabulary trained on those books.
    workload = dataclasses.replace(workload, vocab=vocab)
    result = gin.get_configurable("train")(
        workload=workload, data=train, eval_data=test, workdir=str(workdir)
    )
    assert int(result.state.step) == 4 and np.isfinite(result.final_loss)
    metrics = result.eval_metrics
    assert set(metrics) == {"loss", "accuracy", "bleu"}
    assert np.isfinite(metrics["loss"]) and 0 <= metrics["accuracy"] <= 1
    assert 0.0 <= metrics["bleu"] <= 100.0
    rows = (workdir / "metrics.jsonl").read_text()
    assert rows.count('"bleu"') == 2  # Steps 2 and 4.


def test_small_recipe_trains_and_evaluates_on_bible(small, tmp_path, monkeypatch):
    # AdamW keeps this fast; the recipe's own optimizer (VeLO) runs in the
    # slow test below.
    monkeypatch.chdir(REPO)
    _train_small_recipe(small, tmp_path, ["train.optimizer = @adamw"])


@pytest.mark.slow
def test_small_recipe_with_velo(small, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    _train_small_recipe(small, tmp_path, [f"velo.weights = '{CHECKPOINT}'"])
