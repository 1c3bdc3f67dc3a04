"""Speech recognition: AlgoPerf Conformer / DeepSpeech sizes, the Asterisk
prompts and LibriSpeech readers, log-mel features, greedy CTC decoding, WER /
CER, and the `_small` recipes end to end (real recordings, 8 fake CPU devices).
"""

import math
import pathlib

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.reference_data import CHECKPOINT
from velo_scale import cli
from velo_scale.data import load_dataset
from velo_scale.data import speech as data
from velo_scale.models.conformer import Conformer, MaskedBatchNorm, spec_augment
from velo_scale.models.deepspeech import DeepSpeech, reverse_padded
from velo_scale.workloads import abstract_variables, count_params, speech

REPO = pathlib.Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"

# -- full-scale recipes ---------------------------------------------------------


@pytest.mark.parametrize(
    "recipe, full_scale, model, num_stats",
    [
        ("librispeech_conformer", speech.CONFORMER_FULL_SCALE, Conformer, 4_096),
        ("librispeech_deepspeech", speech.DEEPSPEECH_FULL_SCALE, DeepSpeech, 9_216),
    ],
)
def test_full_scale_recipe_matches_algoperf(recipe, full_scale, model, num_stats):
    """Parameter counts measured on AlgoPerf's own jax models (commit 2c90454):
    Conformer 32,321,792 (+4,096 BatchNorm statistics), DeepSpeech 18,381,312
    (+9,216)."""
    cli.parse_gin([str(RECIPES / f"{recipe}.gin")], [])
    workload = cli.configured_value("train.workload")
    assert isinstance(workload, speech.SpeechRecognition)
    assert isinstance(workload.model, model)
    assert workload.full_scale == full_scale
    assert gin.query_parameter("train.num_steps") == full_scale.step_hint
    assert gin.query_parameter("train.batch_size") == full_scale.batch_size == 256
    assert gin.query_parameter("train.data") == "librispeech"
    assert workload.model.vocab_size == 1024
    variables = abstract_variables(workload)
    assert count_params(variables["params"]) == full_scale.num_params
    assert count_params(variables["batch_stats"]) == num_stats
    gin.clear_config()


# -- features --------------------------------------------------------------------


def _band_centres(sample_rate, num_bins, lower, upper):
    mel = np.linspace(data.hertz_to_mel(lower), data.hertz_to_mel(upper), num_bins + 2)
    return data.MEL_BREAK_HZ * np.expm1(mel[1:-1] / data.MEL_HIGH_Q)


@pytest.mark.parametrize(
    "sample_rate, kwargs, upper",
    [(16000, {}, 7600.0), (8000, data.ASTERISK_FEATURES, 3800.0)],
)
def test_log_mel_of_a_pure_tone(sample_rate, kwargs, upper):
    """A 1 kHz tone: 1 s gives 100 frames; its energy sits in the band whose
    centre is nearest 1 kHz; silence is the log floor everywhere."""
    t = np.arange(sample_rate) / sample_rate
    tone = 0.5 * np.sin(2 * np.pi * 1000.0 * t)
    features = data.log_mel_filterbank(tone, sample_rate, **kwargs)
    assert features.shape == (100, 80) and features.dtype == np.float32
    centres = _band_centres(sample_rate, 80, 125.0, upper)
    peak = np.argmax(features[10:90].mean(0))
    assert peak == np.argmin(np.abs(centres - 1000.0))
    # Far bands hold only window leakage: many nats below the peak.
    assert features[50, peak] - features[50, -1] > 8.0
    # Power: doubling the amplitude adds log(4) to every band above the floor.
    loud = data.log_mel_filterbank(2 * tone, sample_rate, **kwargs)
    np.testing.assert_allclose(
        loud[10:90, peak] - features[10:90, peak], np.log(4.0), atol=1e-4
    )
    silence = data.log_mel_filterbank(np.zeros(sample_rate), sample_rate, **kwargs)
    np.testing.assert_allclose(silence, np.log(data.LOG_FLOOR), rtol=1e-6)
    # Frames: one per started 10 ms hop.
    short = data.log_mel_filterbank(tone[: sample_rate // 100 * 3 + 1], sample_rate)
    assert short.shape[0] == 4


def test_mel_filters_cover_every_band():
    for fft_bins, rate, upper in ((257, 16000, 7600.0), (257, 8000, 3800.0)):
        weights = data.mel_weight_matrix(80, fft_bins, rate, 125.0, upper)
        assert weights.shape == (fft_bins, 80)
        assert np.all(weights[0] == 0.0)  # No DC.
        assert np.all(weights.max(0) > 0.3)  # Every band sees an FFT bin.
        assert np.all(np.diff(np.argmax(weights, 0)) >= 0)  # Ordered peaks.
    with pytest.raises(ValueError, match="upper_hz"):
        data.mel_weight_matrix(80, 129, 8000, 125.0, 7600.0)


# -- transcripts and vocabularies ----------------------------------------------


def test_normalize_transcript():
    norm = data.normalize_transcript
    assert norm("Please press 1, or dial 500 now.") == (
        "please press one or dial five hundred now"
    )
    assert norm("press * to pause, press # to exit") == (
        "press star to pause press pound to exit"
    )
    assert norm("That's all.  [beep] (2 seconds of silence)") == "that's all"
    assert norm("Call-Forward on No Answer") == "call forward on no answer"
    assert norm("[ascending tones]") == ""
    assert data.number_words(1234) == "one thousand two hundred thirty four"
    assert data.number_words(40) == "forty"


def test_character_vocab_round_trip():
    vocab = data.CharacterVocab()
    ids = vocab.encode("don't go")
    assert vocab.size == 29 and min(ids) >= 1 and max(ids) <= 28
    assert vocab.decode([0, *ids, 0]) == "don't go"
    with pytest.raises(ValueError, match="normalise"):
        vocab.encode("Hello!")


def test_sentencepiece_vocab(tmp_path):
    """A SentencePiece model (trained here on the Asterisk transcripts) decodes
    its own ids, dropping eos and the CTC blank (0); as AlgoPerf's targets,
    `encode` appends eos."""
    spm = pytest.importorskip("sentencepiece")
    texts = [
        data.normalize_transcript(t) for t in data.asterisk_utterances()["transcript"]
    ]
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n".join(t for t in texts if t))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "spm"), vocab_size=100,
        model_type="unigram", character_coverage=1.0,
    )  # fmt: skip
    vocab = data.SentencePieceVocab(tmp_path / "spm.model")
    ids = vocab.encode("please press the pound key")
    assert ids[-1] == 2 and len(ids) > 2
    assert vocab.decode([0, *ids]) == "please press the pound key"
    with pytest.raises(FileNotFoundError, match="dataset_setup"):
        data.SentencePieceVocab(tmp_path / "missing.model")


# -- the Asterisk dataset ------------------------------------------------------


@pytest.fixture(scope="module")
def asterisk():
    return {
        split: load_dataset("asterisk_speech", split) for split in ("train", "test")
    }


def test_asterisk_splits(asterisk):
    train_set, test_set = asterisk["train"], asterisk["test"]
    assert len(train_set["inputs"]) == 367 and len(test_set["inputs"]) == 67
    for split in (train_set, test_set):
        n = len(split["inputs"])
        assert split["inputs"].shape == (n, 320, 80)
        assert split["input_paddings"].shape == (n, 320)
        assert split["targets"].shape == (n, 48)
        assert split["inputs"].dtype == split["input_paddings"].dtype == np.float32
        assert split["targets"].dtype == np.int32
        assert 0 <= split["targets"].min() and split["targets"].max() < 29
        valid_t = split["target_paddings"] < 0.5
        assert np.all(split["targets"][~valid_t] == 0)
        assert np.all(split["targets"][valid_t] > 0)  # No blank inside a transcript.
        assert np.all(split["inputs"][split["input_paddings"] > 0.5] == 0.0)
        for xp, y in zip(split["input_paddings"], split["targets"]):
            frames = int((xp < 0.5).sum())
            assert np.all(xp[:frames] == 0.0)  # Padding only at the end.
            assert data.ctc_min_frames(y[y > 0]) <= math.ceil(frames / 4)
    # Normalised with train statistics.
    valid = train_set["input_paddings"] < 0.5
    np.testing.assert_allclose(train_set["inputs"][valid].mean(0), 0.0, atol=1e-3)
    np.testing.assert_allclose(train_set["inputs"][valid].std(0), 1.0, atol=1e-2)
    # Disjoint: no test recording is also in train.
    key = lambda x: x[:, :8].tobytes()  # noqa: E731
    assert not {key(x) for x in test_set["inputs"]} & {
        key(x) for x in train_set["inputs"]
    }
    names = data.asterisk_utterances()["name"]
    held_out = data.asterisk_split(names)
    assert held_out.sum() == round(0.15 * 568) and len(names) == 568
    np.testing.assert_array_equal(held_out, data.asterisk_split(names[::-1])[::-1])


def test_asterisk_transcripts_are_real(asterisk):
    vocab = data.CharacterVocab()
    texts = {vocab.decode(y) for y in asterisk["train"]["targets"]}
    assert "please enter your password followed by the pound key" not in texts  # > 48.
    assert {"goodbye", "thank you", "zero", "alpha"} <= texts


def test_asterisk_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="asterisk-core-sounds-en-wav"):
        data.load_asterisk("train", str(tmp_path))


# -- LibriSpeech ------------------------------------------------------------------


def test_librispeech_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset_setup.py"):
        data.load_librispeech("train", None)
    with pytest.raises(FileNotFoundError, match="train-clean-100.csv"):
        data.load_librispeech("train", str(tmp_path))


def test_librispeech_reader_layout(tmp_path):
    """AlgoPerf's layout (`<subset>.csv` with an index and an `id` column,
    `<subset>/<id>_{audio,targets}.npy`), filled with a synthetic tone to test
    the reader and the frontend shapes."""
    n = 16000 * 3 + 37
    audio = (8000 * np.sin(np.arange(n) * 0.3)).astype(np.int64)
    for subset in ("dev-clean", "dev-other"):
        (tmp_path / subset).mkdir()
        (tmp_path / f"{subset}.csv").write_text(",id\n0,84-121123-0000\n")
        np.save(tmp_path / subset / "84-121123-0000_audio.npy", audio)
        np.save(tmp_path / subset / "84-121123-0000_targets.npy", np.array([5, 9, 2]))
    source = data.load_librispeech("test", str(tmp_path))
    assert len(source) == 2
    example = source[1]
    assert example["inputs"].shape == (1998, 80)
    assert example["targets"].shape == (256,) and example["targets"].dtype == np.int32
    assert int((example["input_paddings"] < 0.5).sum()) == math.ceil(n / 160)
    assert example["targets"][:4].tolist() == [5, 9, 2, 0]
    assert example["target_paddings"][:4].tolist() == [0.0, 0.0, 0.0, 1.0]
    full = data.librispeech_example(np.ones(320_000, np.int64), np.array([3]))
    assert full["input_paddings"].sum() == 0.0  # 20 s fill all 1,998 frames.


# -- decoding and error rates -----------------------------------------------------


def test_ctc_greedy_decode():
    ids = np.array([[1, 1, 0, 1, 2, 2, 0, 0, 3], [0, 0, 0, 0, 0, 0, 0, 4, 4]])
    paddings = np.zeros(ids.shape)
    paddings[1, 7:] = 1.0  # The 4s are padding frames.
    assert speech.ctc_greedy_decode(ids, paddings) == [[1, 1, 2, 3], []]
    assert speech.ctc_greedy_decode(np.array([[5, 5, 5]]), np.zeros((1, 3))) == [[5]]


def test_edit_distance_and_wer():
    assert speech.edit_distance("kitten", "sitting") == 3
    assert speech.edit_distance("", "abc") == 3
    assert speech.edit_distance(["a", "b"], ["a", "b"]) == 0
    assert speech.word_error_rate(["the cat sat"], ["the cat sat down"]) == 1 / 3
    # 1 substitution + 1 deletion over 5 + 0 errors over 2 reference words.
    refs, hyps = (
        ["press one for sales now", "thank you"],
        ["press two for sales", "thank you"],
    )
    assert speech.word_error_rate(refs, hyps) == pytest.approx(2 / 7)
    assert speech.word_error_rate(["goodbye"], [""]) == 1.0
    counts = speech.error_counts("thank you", "thank  yu")
    assert counts == {"word_errors": 1, "words": 2, "char_errors": 1, "chars": 9}
    rng = np.random.default_rng(0)
    for _ in range(50):  # Against the textbook full-table recurrence.
        a, b = (
            rng.integers(0, 3, rng.integers(0, 9)),
            rng.integers(0, 3, rng.integers(0, 9)),
        )
        d = np.zeros((len(a) + 1, len(b) + 1), int)
        d[:, 0], d[0, :] = np.arange(len(a) + 1), np.arange(len(b) + 1)
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                d[i, j] = min(
                    d[i - 1, j] + 1,
                    d[i, j - 1] + 1,
                    d[i - 1, j - 1] + (a[i - 1] != b[j - 1]),
                )
        assert speech.edit_distance(a.tolist(), b.tolist()) == d[-1, -1]


def test_ctc_loss_of_a_perfect_alignment():
    """Logits peaked on the path [1, blank, 2, 2] give a CTC loss near 0 for
    targets [1, 2]; the wrong targets [2, 1] a large one."""

    class Fixed(nn.Module):
        @nn.compact
        def __call__(self, inputs, input_paddings, train=False):
            path = jnp.array([1, 0, 2, 2])
            return 20.0 * jax.nn.one_hot(path, 4)[None].repeat(2, 0), jnp.zeros((2, 4))

    workload = speech.SpeechRecognition(Fixed())
    batch = {
        "inputs": jnp.zeros((2, 16, 80)),
        "input_paddings": jnp.zeros((2, 16)),
        "targets": jnp.array([[1, 2, 0], [2, 1, 0]], jnp.int32),
        "target_paddings": jnp.array([[0.0, 0.0, 1.0]] * 2),
    }
    per_utterance = workload._ctc(*workload._apply({}, {}, batch, False)[:2], batch)
    assert per_utterance[0] < 1e-3 and per_utterance[1] > 10.0
    # The training loss: summed over utterances, per target token (4 here).
    loss, (metrics, state) = workload.loss({}, {}, batch, jax.random.PRNGKey(0))
    np.testing.assert_allclose(loss, per_utterance.sum() / 4, rtol=1e-6)
    assert state == {} and "ctc_per_utterance" in metrics


# -- models ------------------------------------------------------------------------


def test_reverse_padded():
    x = jnp.arange(8.0).reshape(2, 4)
    out = reverse_padded(x, jnp.array([2, 4]))
    np.testing.assert_array_equal(out, [[1, 0, 3, 2], [7, 6, 5, 4]])


def test_spec_augment_masks_bands_and_spans():
    x = jnp.ones((4, 200, 80))
    paddings = jnp.zeros((4, 200)).at[:, 160:].set(1.0)  # 160 frames each.
    y = np.asarray(spec_augment(jax.random.PRNGKey(0), x, paddings))
    masked_bins = np.all(y == 0.0, axis=1)  # [b, F]: whole bands zeroed.
    masked_frames = np.all(y == 0.0, axis=2)  # [b, T]: whole frames zeroed.
    assert np.all(y[~masked_bins[:, None, :] & ~masked_frames[:, :, None]] == 1.0)
    assert np.all(masked_bins.sum(1) <= 2 * 26) and masked_bins.sum() > 0
    # 10 spans of < 5% of 160 frames, inside the utterance.
    assert np.all(masked_frames.sum(1) <= 10 * 7) and not masked_frames[:, 160:].any()
    np.testing.assert_array_equal(y, spec_augment(jax.random.PRNGKey(0), x, paddings))


def test_masked_batch_norm_ignores_padding():
    bn = MaskedBatchNorm(axis="embed")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 3))
    paddings = jnp.array([[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]], jnp.float32)
    variables = nn.meta.unbox(bn.init(jax.random.PRNGKey(1), x, paddings, train=False))
    y, state = bn.apply(variables, x, paddings, train=True, mutable=["batch_stats"])
    garbage = jnp.where(paddings[..., None] > 0, 1e3, x)
    y2, state2 = bn.apply(
        variables, garbage, paddings, train=True, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(y, y2, atol=1e-5)
    valid = x[paddings < 0.5]
    np.testing.assert_allclose(y[paddings < 0.5].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(
        state["batch_stats"]["mean"], 0.001 * valid.mean(0), rtol=1e-4, atol=1e-7
    )
    assert np.all(y[paddings > 0.5] == 0.0)


@pytest.mark.parametrize(
    "model",
    [
        Conformer(
            vocab_size=7,
            encoder_dim=16,
            num_layers=1,
            num_heads=2,
            conv_kernel_size=3,
            subsampling_channels=4,
        ),
        DeepSpeech(
            vocab_size=7,
            encoder_dim=16,
            num_lstm_layers=1,
            num_ffn_layers=1,
            subsampling_channels=4,
        ),
    ],  # fmt: skip
    ids=["conformer", "deepspeech"],
)
def test_models_ignore_padding(model):
    """The same utterance padded to 64 or 96 frames gives the same logits on
    its frames (attention masks, masked BatchNorm, length-aware BiLSTM)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 40, 80))
    pad = lambda t: (  # noqa: E731
        jnp.pad(x, ((0, 0), (0, t - 40), (0, 0))),
        jnp.pad(jnp.zeros((1, 40)), ((0, 0), (0, t - 40)), constant_values=1.0),
    )
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), *pad(64)))
    apply = jax.jit(model.apply)
    (a, pa), (b, pb) = (apply(variables, *pad(t)) for t in (64, 96))
    assert a.shape == (1, 16, 7) and b.shape == (1, 24, 7)
    np.testing.assert_array_equal(pa[0, :10], 0.0)
    np.testing.assert_array_equal(pa[0, 10:], 1.0)
    np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-5)


# -- the small recipes end to end --------------------------------------------------

SMALL_RECIPES = [
    ("librispeech_conformer_small", ["Conformer.encoder_dim = 32", "Conformer.num_layers = 1"]),
    ("librispeech_deepspeech_small", ["DeepSpeech.encoder_dim = 32", "DeepSpeech.num_lstm_layers = 1"]),
]  # fmt: skip


def _run_small(recipe, tiny, workdir, optimizer):
    cli.parse_gin(
        [str(RECIPES / f"{recipe}.gin")],
        [
            f"velo.weights = '{CHECKPOINT}'",
            f"train.optimizer = @{optimizer}",
            "train.num_steps = 3",
            "train.batch_size = 8",
            "train.eval_every = None",
            "train.progress = False",
            *tiny,
        ],
    )
    try:
        result = gin.get_configurable("train")(workdir=workdir)
    finally:
        gin.clear_config()
    assert result.state.step == 3
    assert np.isfinite(result.final_loss) and result.final_loss > 0
    metrics = result.eval_metrics
    assert set(metrics) == {"loss", "wer", "cer"}
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
    # Untrained: (nearly) every word wrong, but WER is really computed.
    assert 0.5 <= metrics["wer"] and 0.5 <= metrics["cer"]
    assert "batch_stats" in result.state.model_state
    assert (workdir / "metrics.jsonl").exists()


@pytest.mark.parametrize("recipe, tiny", SMALL_RECIPES, ids=["conformer", "deepspeech"])
def test_small_recipe_trains_and_evaluates(recipe, tiny, tmp_path):
    """A few steps of the `_small` recipe (narrowed; AdamW, which compiles in
    a fraction of VeLO's time) on the real prompts, then a WER/CER evaluation
    of the 67 test prompts."""
    _run_small(recipe, tiny, tmp_path, "adamw")


@pytest.mark.slow
@pytest.mark.parametrize("recipe, tiny", SMALL_RECIPES, ids=["conformer", "deepspeech"])
def test_small_recipe_with_velo(recipe, tiny, tmp_path):
    """The same with the recipe's own optimizer, VeLO (~1 min of compiling)."""
    _run_small(recipe, tiny, tmp_path, "velo")


@pytest.mark.slow
def test_small_conformer_learns():
    """AdamW on the train prompts for 300 steps of 32: the CTC loss per
    character falls far below the blank plateau (~3) and the model emits
    characters (CER < 0.9)."""
    cli.parse_gin(
        [str(RECIPES / "librispeech_conformer_small.gin")],
        ["train.optimizer = @adamw", "adamw.learning_rate = 3e-3",
         "train.num_steps = 300", "train.batch_size = 32", "train.eval_every = None", "train.progress = False"],
    )  # fmt: skip
    try:
        result = gin.get_configurable("train")()
    finally:
        gin.clear_config()
    assert result.final_loss < 2.5
    assert result.eval_metrics["cer"] < 0.9
