"""Speech recognition data: log-mel features, transcripts and CTC targets.

Two datasets, both in the batch format of `velo_scale.workloads.speech`:

  {"inputs": float32[n, T, 80]        normalised log-mel filterbank frames,
   "input_paddings": float32[n, T]    1.0 on padding frames, 0.0 on audio,
   "targets": int32[n, L]             token ids (0 is the CTC blank),
   "target_paddings": float32[n, L]}  1.0 after the transcript's end.

- `load_asterisk` ("asterisk_speech"): the 568 English prompts of the Asterisk
  PBX recorded by one speaker (Allison Smith), 8 kHz mono wav files from
  Debian's `asterisk-core-sounds-en-wav`, with the transcripts of
  `asterisk-core-sounds-en` (`core-sounds-en.txt`). Characters as tokens.
- `load_librispeech` ("librispeech"): LibriSpeech 960 h as prepared by
  AlgoPerf's `datasets/dataset_setup.py --librispeech` (per-utterance
  `<id>_audio.npy` 16 kHz samples and `<id>_targets.npy` SentencePiece ids),
  read on demand; features are computed on the host per utterance.

The features follow AlgoPerf's (lingvo's) frontend, recomputed in numpy: 25 ms
periodic-Hann frames every 10 ms, HTK pre-emphasis 0.97, power spectrum,
80 HTK-mel triangular bands (DC bin excluded), `log(max(., 1e-5))`, then a
per-band mean / standard deviation normalisation.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pathlib
import re
from collections.abc import Sequence

import numpy as np

from velo_scale.data import cache as cache_lib

# -- log-mel filterbank -------------------------------------------------------

MEL_BREAK_HZ = 700.0
MEL_HIGH_Q = 1127.0
LOG_FLOOR = 1e-5
PCM_SCALE = 2.0**-15  # int16 PCM -> [-1, 1).


def hertz_to_mel(hertz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: `1127 ln(1 + f / 700)`."""
    return MEL_HIGH_Q * np.log1p(np.asarray(hertz, np.float64) / MEL_BREAK_HZ)


def mel_weight_matrix(
    num_bins: int,
    num_fft_bins: int,
    sample_rate: float,
    lower_hz: float,
    upper_hz: float,
) -> np.ndarray:
    """Triangular mel filters: float64[num_fft_bins, num_bins].

    `num_fft_bins = fft_size // 2 + 1` bins evenly spaced from 0 Hz to the
    Nyquist frequency; `num_bins + 2` edges evenly spaced on the mel scale
    between `lower_hz` and `upper_hz`; the DC bin gets no weight (as in
    `tf.signal.linear_to_mel_weight_matrix`).
    """
    if not 0.0 <= lower_hz < upper_hz <= sample_rate / 2:
        raise ValueError(
            f"Need 0 <= lower_hz < upper_hz <= sample_rate / 2; got {lower_hz=}, "
            f"{upper_hz=}, {sample_rate=}."
        )
    fft_mel = hertz_to_mel(np.linspace(0.0, sample_rate / 2, num_fft_bins))[1:, None]
    edges = np.linspace(hertz_to_mel(lower_hz), hertz_to_mel(upper_hz), num_bins + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (fft_mel - lower) / (center - lower)
    falling = (upper - fft_mel) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return np.concatenate([np.zeros((1, num_bins)), weights], axis=0)


def num_feature_frames(num_samples: int, sample_rate: float, step_ms: float = 10.0):
    """Frames holding at least one audio sample: `ceil(num_samples / hop)`."""
    return math.ceil(num_samples / round(sample_rate * step_ms / 1000.0))


def log_mel_filterbank(
    audio: np.ndarray,
    sample_rate: float,
    *,
    num_bins: int = 80,
    frame_ms: float = 25.0,
    step_ms: float = 10.0,
    lower_hz: float = 125.0,
    upper_hz: float | None = None,
    fft_size: int | None = None,
    preemphasis: float = 0.97,
) -> np.ndarray:
    """Log-mel filterbank energies of a waveform.

    Frame `k` covers samples `[k * hop, k * hop + window)` (zeros past the
    end), with hop = `step_ms` and window = `frame_ms` in samples; there are
    `num_feature_frames(len(audio), sample_rate)` frames, every frame that
    holds at least one sample (AlgoPerf's frames on zero-padded audio that are
    not padding). Each frame is pre-emphasised HTK style (`y[0] = (1-p) x[0]`,
    `y[j] = x[j] - p x[j-1]`), multiplied by a periodic Hann window, zero-padded
    to `fft_size` (default: the power of two above window + 1) and its power
    spectrum is pooled by `mel_weight_matrix`.

    Args:
      audio: float[num_samples], in [-1, 1) for PCM (see `PCM_SCALE`).
      sample_rate: Hz.
      num_bins: mel bands.
      frame_ms, step_ms: window length and hop (ms).
      lower_hz, upper_hz: band edges (default upper: 0.475 * sample_rate,
        i.e. 7,600 Hz at 16 kHz as in AlgoPerf, 3,800 Hz at 8 kHz).
      fft_size: FFT length (>= window).
      preemphasis: pre-emphasis coefficient p.

    Returns:
      float32[num_frames, num_bins]: `log(max(mel power, 1e-5))`.
    """
    audio = np.asarray(audio, np.float64).reshape(-1)
    hop = round(sample_rate * step_ms / 1000.0)
    window = round(sample_rate * frame_ms / 1000.0)
    fft_size = fft_size or 2 ** math.ceil(math.log2(window + 1))
    if fft_size < window:
        raise ValueError(f"fft_size {fft_size} is shorter than the window {window}.")
    upper_hz = 0.475 * sample_rate if upper_hz is None else upper_hz
    num_frames = num_feature_frames(audio.size, sample_rate, step_ms)
    padded = np.zeros((num_frames - 1) * hop + window, np.float64)
    padded[: audio.size] = audio
    starts = np.arange(num_frames)[:, None] * hop
    frames = padded[starts + np.arange(window)[None, :]]
    emphasised = np.concatenate(
        [
            frames[:, :1] * (1.0 - preemphasis),
            frames[:, 1:] - preemphasis * frames[:, :-1],
        ],
        axis=1,
    )
    hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(window) / window)
    power = np.abs(np.fft.rfft(emphasised * hann, fft_size, axis=1)) ** 2
    mel = power @ mel_weight_matrix(
        num_bins, fft_size // 2 + 1, sample_rate, lower_hz, upper_hz
    )
    return np.log(np.maximum(mel, LOG_FLOOR)).astype(np.float32)


def pad_features(
    features: np.ndarray, num_frames: int
) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pads `[t, bins]` features to `[num_frames, bins]`; returns them
    with `paddings` float32[num_frames] (1.0 past `t`). Raises if `t` is
    longer than `num_frames`."""
    t = features.shape[0]
    if t > num_frames:
        raise ValueError(f"{t} feature frames do not fit in {num_frames}.")
    out = np.zeros((num_frames, features.shape[1]), np.float32)
    out[:t] = features
    paddings = np.ones((num_frames,), np.float32)
    paddings[:t] = 0.0
    return out, paddings


def pad_targets(ids: Sequence[int], length: int) -> tuple[np.ndarray, np.ndarray]:
    """`(int32[length], paddings float32[length])` for a token sequence."""
    ids = np.asarray(ids, np.int32).reshape(-1)
    if ids.size > length:
        raise ValueError(f"{ids.size} target tokens do not fit in {length}.")
    out = np.zeros((length,), np.int32)
    out[: ids.size] = ids
    paddings = np.ones((length,), np.float32)
    paddings[: ids.size] = 0.0
    return out, paddings


def ctc_min_frames(ids: Sequence[int]) -> int:
    """Fewest CTC frames that can emit `ids`: one per token plus one blank
    between each pair of equal neighbours."""
    ids = list(ids)
    return len(ids) + sum(a == b for a, b in zip(ids, ids[1:]))


# -- vocabularies ------------------------------------------------------------

CHARACTERS = " '" + "abcdefghijklmnopqrstuvwxyz"


class CharacterVocab:
    """Characters as tokens: id 0 is the CTC blank, then space, apostrophe,
    a-z (`size` = 29)."""

    size = len(CHARACTERS) + 1

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - set(CHARACTERS))
        if unknown:
            raise ValueError(
                f"{text!r} has characters {unknown} outside the vocabulary; "
                "normalise it with normalize_transcript first."
            )
        return [CHARACTERS.index(c) + 1 for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (blanks and unknown ids are dropped)."""
        return "".join(CHARACTERS[i - 1] for i in ids if 0 < i <= len(CHARACTERS))


class SentencePieceVocab:
    """A SentencePiece model (AlgoPerf's LibriSpeech `spm_model.vocab`, a
    1,024-piece unigram model despite its name)."""

    def __init__(self, path: str | os.PathLike):
        try:
            import sentencepiece as spm
        except ImportError as e:
            raise ImportError(
                "SentencePiece vocabularies need `pip install sentencepiece`."
            ) from e
        path = pathlib.Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"No SentencePiece model at {path}. AlgoPerf's "
                "`python datasets/dataset_setup.py --librispeech` writes it to "
                "<data_dir>/librispeech/spm_model.vocab."
            )
        self.path = str(path)
        self._sp = spm.SentencePieceProcessor(model_file=self.path)
        self.size = int(self._sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        """Ids of `text` followed by the end-of-sentence id (as AlgoPerf's
        `librispeech_tokenizer`, add_eos=True)."""
        return list(self._sp.encode(text)) + [int(self._sp.eos_id())]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids; control ids (unk/bos/eos, and 0, the CTC blank) are
        dropped."""
        keep = [int(i) for i in ids if 0 < int(i) < self.size]
        keep = [i for i in keep if not self._sp.is_control(i)]
        return self._sp.decode(keep)


def make_vocab(spec: str) -> CharacterVocab | SentencePieceVocab:
    """`"characters"` or the path of a SentencePiece model."""
    return CharacterVocab() if spec == "characters" else SentencePieceVocab(spec)


# -- transcripts -------------------------------------------------------------

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve "
    "thirteen fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English cardinal of 0 <= n < 1,000,000 ("five hundred", "forty two")."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_words supports 0 <= n < 1e6; got {n}.")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = "" if n % 100 == 0 else " " + number_words(n % 100)
        return _ONES[n // 100] + " hundred" + rest
    rest = "" if n % 1000 == 0 else " " + number_words(n % 1000)
    return number_words(n // 1000) + " thousand" + rest


def normalize_transcript(text: str) -> str:
    """Spoken-form text over `CHARACTERS`: lowercase letters, apostrophe, space.

    Drops annotations in brackets (`[ascending tones]`, `<beep>`,
    `(10 seconds of silence)`), says keypad symbols (`*` -> star, `#` ->
    pound) and numbers in words, turns every other character into a word
    break and collapses spaces.
    """
    text = re.sub(r"\[[^\]]*\]|<[^>]*>|\([^)]*\)", " ", text)
    text = text.replace("*", " star ").replace("#", " pound ")
    text = re.sub(r"\d+", lambda m: f" {number_words(int(m.group()))} ", text)
    text = re.sub(r"[^a-z' ]", " ", text.lower())
    return " ".join(w.strip("'") for w in text.split() if w.strip("'"))


# -- Asterisk prompts ----------------------------------------------------------

ASTERISK_SOUNDS = "/usr/share/asterisk/sounds/en_US_f_Allison"
ASTERISK_TRANSCRIPTS = "/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz"
ASTERISK_ENV = "VELO_SCALE_ASTERISK_SOUNDS"
ASTERISK_SAMPLE_RATE = 8000
# Features at the recordings' own 8 kHz (no resampling): 25 ms = 200 samples,
# hop 80, a 512-point FFT (15.6 Hz bins, so that the 80 narrow low-frequency
# bands each cover at least one bin), bands 125-3,800 Hz.
ASTERISK_FEATURES = dict(num_bins=80, fft_size=512, lower_hz=125.0, upper_hz=3800.0)
ASTERISK_MAX_FRAMES = 320  # 3.2 s of audio; longer prompts are left out.
ASTERISK_MAX_TARGET_LENGTH = 48  # Characters.
ASTERISK_SUBSAMPLING = 4  # The models' time reduction (CTC feasibility check).
ASTERISK_TEST_FRACTION = 0.15
ASTERISK_SPLIT_SEED = 0
_CACHE_VERSION = 1


def read_asterisk_transcripts(path: str | os.PathLike) -> dict[str, str]:
    """`{prompt name: transcript}` from `core-sounds-en.txt[.gz]` ("name: text"
    lines; names may hold a folder, e.g. "digits/7")."""
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    transcripts = {}
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip() or line.startswith(";"):
                continue
            name, sep, text = line.partition(":")
            if sep:
                transcripts[name.strip()] = text.strip()
    return transcripts


def _asterisk_paths(data_dir: str | None) -> tuple[pathlib.Path, pathlib.Path]:
    sounds = pathlib.Path(data_dir or os.environ.get(ASTERISK_ENV) or ASTERISK_SOUNDS)
    transcripts = pathlib.Path(ASTERISK_TRANSCRIPTS)
    for candidate in (sounds / "core-sounds-en.txt", sounds / "core-sounds-en.txt.gz"):
        if candidate.exists():
            transcripts = candidate
    if not sounds.is_dir() or not any(sounds.glob("*.wav")):
        raise FileNotFoundError(
            f"No Asterisk prompt recordings (*.wav) in {sounds}. Install them with "
            "`apt-get install asterisk-core-sounds-en-wav` (Debian/Ubuntu), or "
            f"point data_dir / ${ASTERISK_ENV} at a folder of 8 kHz en wav prompts."
        )
    if not transcripts.exists():
        raise FileNotFoundError(
            f"No Asterisk transcripts at {transcripts}. Install them with "
            "`apt-get install asterisk-core-sounds-en` (it ships "
            "core-sounds-en.txt.gz), or put core-sounds-en.txt next to the wavs."
        )
    return sounds, transcripts


def _read_wav(path: pathlib.Path) -> np.ndarray:
    from scipy.io import wavfile

    rate, audio = wavfile.read(path)
    if rate != ASTERISK_SAMPLE_RATE or audio.dtype != np.int16 or audio.ndim != 1:
        raise ValueError(
            f"{path}: expected 8 kHz mono 16-bit PCM, got {rate} Hz {audio.dtype} "
            f"{audio.shape}."
        )
    return audio


def asterisk_utterances(data_dir: str | None = None) -> dict[str, np.ndarray]:
    """Every prompt with its raw transcript and unnormalised log-mel features,
    cached under `$VELO_SCALE_CACHE` (default `~/.cache/velo_scale`).

    Returns:
      `{"name": str[568], "transcript": str[568], "features":
      float32[total_frames, 80] (all prompts, concatenated), "offsets":
      int64[569] (prompt i is features[offsets[i]:offsets[i + 1]]),
      "num_samples": int64[568]}`, sorted by name.
    """
    sounds, transcripts_path = _asterisk_paths(data_dir)
    wavs = sorted(sounds.rglob("*.wav"))
    names = [str(p.relative_to(sounds).with_suffix("")) for p in wavs]
    key = hashlib.sha256(
        repr(
            (_CACHE_VERSION, str(sounds), names, sorted(ASTERISK_FEATURES.items()))
        ).encode()
    ).hexdigest()[:16]
    cache = cache_lib.cache_dir(f"asterisk_speech_{key}.npz")
    if cache.exists():
        with np.load(cache) as f:
            return {k: f[k] for k in f.files}
    with cache_lib.preparing(f"speech features of {len(wavs)} Asterisk prompts"):
        transcripts = read_asterisk_transcripts(transcripts_path)
        missing = [n for n in names if n not in transcripts]
        if missing:
            raise ValueError(
                f"{len(missing)} recordings have no line in {transcripts_path}, e.g. "
                f"{missing[:3]}; the sounds and transcripts packages do not match."
            )
        features, num_samples = [], []
        for path in wavs:
            audio = _read_wav(path)
            num_samples.append(audio.size)
            features.append(
                log_mel_filterbank(
                    audio.astype(np.float64) * PCM_SCALE,
                    ASTERISK_SAMPLE_RATE,
                    **ASTERISK_FEATURES,
                )
            )
        lengths = [f.shape[0] for f in features]
        arrays = {
            "name": np.array(names),
            "transcript": np.array([transcripts[n] for n in names]),
            "features": np.concatenate(features, axis=0),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "num_samples": np.array(num_samples, np.int64),
        }
        cache_lib.save_npz_atomic(cache, arrays)
    return arrays


def asterisk_split(names: Sequence[str]) -> np.ndarray:
    """bool[len(names)]: True for the held-out "test" prompts.

    A fixed permutation (seed `ASTERISK_SPLIT_SEED`) of the sorted names puts
    the first 15% in "test" and the rest in "train", before any filtering, so
    the split of a prompt never depends on the length limits.
    """
    order = np.argsort(np.asarray(names))
    perm = np.random.default_rng(ASTERISK_SPLIT_SEED).permutation(len(names))
    test = np.zeros(len(names), bool)
    num_test = round(ASTERISK_TEST_FRACTION * len(names))
    test[order[perm[:num_test]]] = True
    return test


def load_asterisk(split: str, data_dir: str | None = None) -> dict[str, np.ndarray]:
    """The Asterisk prompts as a small speech recognition dataset.

    568 recordings; 85% "train", 15% "test" (`asterisk_split`). Kept: prompts
    with speech (the normalised transcript is not empty: no silences, tones,
    beeps), at most `ASTERISK_MAX_FRAMES` frames (3.2 s), at most
    `ASTERISK_MAX_TARGET_LENGTH` characters, and short enough in characters
    to be emitted by CTC from the 4x subsampled frames. Features are
    normalised per band by the mean and standard deviation of the kept train
    frames (the same statistics for both splits).

    Args:
      split: "train" or "test".
      data_dir: folder of the wav files (default
        /usr/share/asterisk/sounds/en_US_f_Allison or $VELO_SCALE_ASTERISK_SOUNDS).

    Returns:
      `{"inputs": float32[n, 320, 80], "input_paddings": float32[n, 320],
      "targets": int32[n, 48] in [0, 29), "target_paddings": float32[n, 48]}`
      (ids: `CharacterVocab`; padding positions hold 0 and paddings 1.0).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}.")
    utts = asterisk_utterances(data_dir)
    vocab = CharacterVocab()
    offsets = utts["offsets"]
    test = asterisk_split(utts["name"])
    keep = {"train": [], "test": []}
    for i, raw in enumerate(utts["transcript"]):
        text = normalize_transcript(str(raw))
        ids = vocab.encode(text)
        frames = int(offsets[i + 1] - offsets[i])
        out_frames = math.ceil(frames / ASTERISK_SUBSAMPLING)
        if (
            text
            and frames <= ASTERISK_MAX_FRAMES
            and len(ids) <= ASTERISK_MAX_TARGET_LENGTH
            and ctc_min_frames(ids) <= out_frames
        ):
            keep["test" if test[i] else "train"].append((i, ids))
    train_frames = np.concatenate(
        [utts["features"][offsets[i] : offsets[i + 1]] for i, _ in keep["train"]]
    )
    mean, std = train_frames.mean(0), train_frames.std(0) + 1e-5
    inputs, input_paddings, targets, target_paddings = [], [], [], []
    for i, ids in keep[split]:
        features = (utts["features"][offsets[i] : offsets[i + 1]] - mean) / std
        x, xp = pad_features(features, ASTERISK_MAX_FRAMES)
        x *= 1.0 - xp[:, None]
        y, yp = pad_targets(ids, ASTERISK_MAX_TARGET_LENGTH)
        inputs.append(x), input_paddings.append(xp)
        targets.append(y), target_paddings.append(yp)
    return {
        "inputs": np.stack(inputs).astype(np.float32),
        "input_paddings": np.stack(input_paddings),
        "targets": np.stack(targets),
        "target_paddings": np.stack(target_paddings),
    }


# -- LibriSpeech (AlgoPerf's preprocessed layout) ------------------------------

LIBRISPEECH_SPLITS = {
    "train": ("train-clean-100", "train-clean-360", "train-other-500"),
    # AlgoPerf's validation split, on which its WER targets are set.
    "test": ("dev-clean", "dev-other"),
}
LIBRISPEECH_SAMPLE_RATE = 16000
LIBRISPEECH_MAX_SAMPLES = 320_000  # 20 s; AlgoPerf pads audio to this.
LIBRISPEECH_NUM_FRAMES = 1998  # Frames of 320,000 samples (window 401, hop 160).
LIBRISPEECH_MAX_TARGET_LENGTH = 256
LIBRISPEECH_VOCAB_FILE = "spm_model.vocab"
LIBRISPEECH_HOWTO = (
    "Prepare it with AlgoPerf (github.com/mlcommons/algorithmic-efficiency): "
    "`python datasets/dataset_setup.py --data_dir=DATA --librispeech`, which "
    "downloads LibriSpeech, trains the 1,024-piece SentencePiece model and "
    "writes DATA/librispeech/{spm_model.vocab, <subset>.csv, "
    "<subset>/<id>_audio.npy, <subset>/<id>_targets.npy}; then set "
    "train.data_dir = 'DATA/librispeech'."
)
# Per-band mean and standard deviation of LibriSpeech log-mel features (the
# normalisation of AlgoPerf's / lingvo's LibriSpeech frontend).
LIBRISPEECH_MEAN = np.array([
    -7.6047816, -7.1206226, -6.8864245, -6.8705769, -6.9667721, -7.1084094,
    -6.9528027, -6.7839942, -6.6195521, -6.4876266, -6.4120660, -6.3940477,
    -6.4244871, -6.3993711, -6.5158272, -6.7138000, -6.8476877, -6.9885001,
    -6.9221387, -7.1461487, -7.2040401, -7.0537553, -7.3140383, -7.1223249,
    -7.3025141, -7.1212144, -7.2425733, -7.1730537, -7.0979414, -7.0887475,
    -6.9849911, -6.8787732, -6.7602754, -6.6300945, -6.5145769, -6.4245057,
    -6.3565135, -6.3178763, -6.2660770, -6.2468328, -6.2821527, -6.1908388,
    -6.2484355, -6.1472640, -6.0924726, -6.0171003, -5.9250402, -5.8535833,
    -5.8209109, -5.8118930, -5.8078375, -5.7714629, -5.7453732, -5.7705655,
    -5.7765641, -5.7831674, -5.7954087, -5.7994823, -5.8023477, -5.8047118,
    -5.8168182, -5.8844800, -5.9727106, -6.0444660, -6.1284866, -6.2257586,
    -6.3157496, -6.3906116, -6.4928598, -6.5498457, -6.6054320, -6.6508379,
    -6.6691761, -6.6726890, -6.6842346, -6.6974578, -6.7547183, -6.7949142,
    -6.8634210, -6.9418654,
], np.float32)  # fmt: skip
LIBRISPEECH_STD = np.array([
    3.4353282, 3.5962932, 3.7012472, 3.7369206, 3.7535105, 3.6936293,
    3.6922498, 3.7641523, 3.8419716, 3.8999848, 3.9294240, 3.9317410,
    3.9139585, 3.9031599, 3.8692000, 3.8155081, 3.7644970, 3.7099106,
    3.6965086, 3.6003766, 3.5493226, 3.5465121, 3.4500360, 3.4712813,
    3.4084611, 3.4408135, 3.4104881, 3.4217639, 3.4312851, 3.4199209,
    3.4305806, 3.4382665, 3.4580367, 3.4817991, 3.4958711, 3.5036793,
    3.5047574, 3.4988735, 3.4930561, 3.4822943, 3.4594305, 3.4612770,
    3.4559064, 3.4755423, 3.4971550, 3.5326557, 3.5705199, 3.5920312,
    3.5969074, 3.5913501, 3.5865932, 3.5826809, 3.5837743, 3.5895791,
    3.5819314, 3.5837870, 3.5861185, 3.5889590, 3.5922148, 3.5939455,
    3.5856631, 3.5884113, 3.5921023, 3.5870490, 3.5806570, 3.5731068,
    3.5617533, 3.5498073, 3.5527375, 3.5475366, 3.5387850, 3.5256178,
    3.5031836, 3.4922726, 3.4879646, 3.4725595, 3.4558389, 3.4351828,
    3.4284294, 3.4299171,
], np.float32)  # fmt: skip


def librispeech_example(
    audio: np.ndarray, targets: np.ndarray
) -> dict[str, np.ndarray]:
    """One prepared LibriSpeech utterance in the batch format.

    Args:
      audio: int[num_samples] 16 kHz PCM (at most 320,000 samples).
      targets: int[num_tokens] SentencePiece ids (ending in the eos id).

    Returns:
      `{"inputs": float32[1998, 80], "input_paddings": float32[1998],
      "targets": int32[256], "target_paddings": float32[256]}`: AlgoPerf's
      frontend (features normalised by `LIBRISPEECH_MEAN`/`_STD`), padding
      frames set to 0.
    """
    audio = np.asarray(audio).reshape(-1)
    if audio.size > LIBRISPEECH_MAX_SAMPLES:
        raise ValueError(
            f"{audio.size} samples exceed AlgoPerf's {LIBRISPEECH_MAX_SAMPLES}."
        )
    features = log_mel_filterbank(
        audio.astype(np.float64) * PCM_SCALE, LIBRISPEECH_SAMPLE_RATE
    )[:LIBRISPEECH_NUM_FRAMES]
    features = (features - LIBRISPEECH_MEAN) / LIBRISPEECH_STD
    x, xp = pad_features(features, LIBRISPEECH_NUM_FRAMES)
    x *= 1.0 - xp[:, None]
    y, yp = pad_targets(targets, LIBRISPEECH_MAX_TARGET_LENGTH)
    return {"inputs": x, "input_paddings": xp, "targets": y, "target_paddings": yp}


class LibriSpeechSource:
    """Random-access utterances of AlgoPerf's prepared LibriSpeech.

    Reads `<data_dir>/<subset>.csv` (a pandas index column and an `id`
    column) and, per utterance, `<data_dir>/<subset>/<id>_audio.npy` and
    `<id>_targets.npy`; `source[i]` is `librispeech_example` of them.
    """

    def __init__(self, data_dir: str | os.PathLike, subsets: Sequence[str]):
        import csv

        self.root = pathlib.Path(data_dir).expanduser()
        self.ids: list[str] = []
        for subset in subsets:
            path = self.root / f"{subset}.csv"
            if not path.is_file():
                raise FileNotFoundError(
                    f"No prepared LibriSpeech subset {subset!r} under {self.root} "
                    f"(missing {path.name}). {LIBRISPEECH_HOWTO}"
                )
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            column = rows[0].index("id") if rows and "id" in rows[0] else 1
            self.ids += [f"{subset}/{row[column]}" for row in rows[1:]]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        stem = self.root / self.ids[index]
        return librispeech_example(
            np.load(f"{stem}_audio.npy"), np.load(f"{stem}_targets.npy")
        )


def load_librispeech(split: str, data_dir: str | None) -> LibriSpeechSource:
    """LibriSpeech 960 h in AlgoPerf's preprocessed layout (read on demand).

    "train": train-clean-100 + train-clean-360 + train-other-500 (AlgoPerf:
    263,840 utterances); "test": dev-clean + dev-other, AlgoPerf's validation
    split (5,348), on which its WER targets are defined. The SentencePiece
    model for decoding is `<data_dir>/spm_model.vocab` (`SentencePieceVocab`).

    Raises:
      FileNotFoundError: `data_dir` is not given or not prepared (the message
        says how to prepare it).
    """
    if split not in LIBRISPEECH_SPLITS:
        raise ValueError(
            f"split must be one of {tuple(LIBRISPEECH_SPLITS)}; got {split!r}."
        )
    if data_dir is None:
        raise FileNotFoundError(
            "LibriSpeech needs train.data_dir (the prepared AlgoPerf folder). "
            + LIBRISPEECH_HOWTO
        )
    return LibriSpeechSource(data_dir, LIBRISPEECH_SPLITS[split])
