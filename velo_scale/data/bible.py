"""Translation data: Bible verse pairs (small, offline) and WMT17 de-en (full).

`load_translation` ("bible_en_es"): English -> Spanish verse pairs read from
the SWORD Bible modules that Debian ships (`sword-text-kjv` for the King
James Version `engKJV2006eb`, `sword-text-sparv` for the Reina-Valera 1909
`spaRV1909eb`; `sword-text-web` for the World English Bible `engWEB2015eb`)
with the `pysword` package. Both default modules use the KJV versification,
so a verse reference ("Gen.1.1") names the same verse in both; pairs are
aligned on it. About 31,000 pairs:

  * split: a verse is in "test" when `crc32(reference) % 100 < 5` (about
    5%, spread over every book), else in "train"; the split of a verse never
    depends on which books are loaded.
  * text: OSIS markup removed (notes and non-canonical headings dropped,
    canonical psalm titles kept, as the Spanish text has them inline),
    whitespace collapsed.
  * tokens: a joint English+Spanish SentencePiece unigram vocabulary
    (AlgoPerf's WMT tokeniser type) trained deterministically on the train
    split's sentences only; ids `0` = padding, `1` = unknown, `2` = EOS.
    Every sequence ends with EOS (AlgoPerf's convention); a pair longer than
    `max_len` tokens on either side is dropped (AlgoPerf's length filter).

Parsing every verse takes one to three minutes; the pairs and the vocabulary
are cached under `$VELO_SCALE_CACHE` (default `~/.cache/velo_scale`)/bible,
written atomically. `books=(...)` loads a few books only (seconds, not
cached), e.g. for tests.

`load_wmt` ("wmt17_de_en"): AlgoPerf's WMT workload data, German -> English:
train = `wmt17_translate/de-en` "train", test = `wmt14_translate/de-en`
"validation" (newstest2013, the split AlgoPerf's BLEU target 30.8491 is
measured on), read from prepared TFDS array_record directories with
`velo_scale.data.load_tfds` and tokenised on read with AlgoPerf's
SentencePiece model (`wmt_sentencepiece_model`, 32k pieces).

Batches: `{"inputs": int32[n, max_len], "targets": int32[n, max_len]}`,
padded with 0.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pathlib
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from velo_scale.data import cache as cache_lib

SWORD_DIR = "/usr/share/sword"
SWORD_ENV = "VELO_SCALE_SWORD"
ENGLISH = "engKJV2006eb"
SPANISH = "spaRV1909eb"
# Debian package that ships each SWORD module.
SWORD_PACKAGES = {
    "engKJV2006eb": "sword-text-kjv",
    "engWEB2015eb": "sword-text-web",
    "spaRV1909eb": "sword-text-sparv",
}
TEST_PERCENT = 5
VOCAB_SIZE = 2000
MAX_LEN = 48
PAD_ID, UNK_ID, EOS_ID = 0, 1, 2
CACHE_VERSION = 1

WMT_MAX_LEN = 256
WMT_VOCAB_FILE = "wmt_sentencepiece_model"
WMT_TFDS = {"train": ("wmt17_translate/de-en", "train")}
WMT_TFDS["test"] = ("wmt14_translate/de-en", "validation")

PYSWORD_MISSING_MSG = (
    "The 'bible_en_es' dataset is read with the pysword package, which is not "
    "installed. Install it with `pip install pysword` (or `pip install "
    "velo-scale[recipes]`)."
)
SENTENCEPIECE_MISSING_MSG = (
    "Translation tokenisation needs the sentencepiece package, which is not "
    "installed. Install it with `pip install sentencepiece`."
)


# -- text ---------------------------------------------------------------------

_NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.S)
_HEADING = re.compile(r'<title\b(?![^>]*canonical="true")[^>]*>.*?</title>', re.S)
_TAG = re.compile(r"<[^>]+>")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?’”)\]])")


def clean_osis(text: str) -> str:
    """Plain verse text from OSIS markup.

    Notes and non-canonical headings (e.g. Psalm 119's acrostic letters) are
    dropped, canonical titles and every other element keep their text, and
    whitespace is collapsed. A dropped note leaves a space (the WEB module
    relies on its notes to separate some words), removed again before
    closing punctuation.

    >>> clean_osis('<w lemma="x">God</w><note>fn</note><w>created</w> it .')
    'God created it.'
    """
    text = _NOTE.sub(" ", text)
    text = _HEADING.sub(" ", text)
    text = _TAG.sub("", text)
    text = " ".join(text.split())
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


def is_test_verse(reference: str) -> bool:
    """Whether a verse ("Gen.1.1") is in the held-out "test" split."""
    return zlib.crc32(reference.encode("utf-8")) % 100 < TEST_PERCENT


# -- SWORD modules --------------------------------------------------------------


def _sword_dir(data_dir: str | None) -> pathlib.Path:
    return pathlib.Path(data_dir or os.environ.get(SWORD_ENV) or SWORD_DIR).expanduser()


def _open_bible(module: str, sword_dir: pathlib.Path):
    try:
        from pysword.modules import SwordModules
    except ImportError as e:
        raise ImportError(PYSWORD_MISSING_MSG) from e
    package = SWORD_PACKAGES.get(module, "the package providing it")
    conf_dir = sword_dir / "mods.d"
    swords = SwordModules(str(sword_dir))
    modules = swords.parse_modules() if conf_dir.is_dir() else {}
    if module not in modules:
        raise FileNotFoundError(
            f"SWORD module {module!r} not found under {sword_dir} (looked in "
            f"{conf_dir}). Install it with `apt-get install {package}` "
            f"(Debian/Ubuntu, files in {SWORD_DIR}) or point ${SWORD_ENV} / "
            "train.data_dir at a SWORD data directory holding it."
        )
    return swords.get_bible_from_module(module)


def read_verses(
    module: str, *, books: Sequence[str] | None = None, data_dir: str | None = None
) -> dict[str, str]:
    """`{reference: plain text}` of a SWORD Bible module, in canonical order.

    Args:
      module: SWORD module name, e.g. "engKJV2006eb".
      books: OSIS book names ("Gen", "Ruth", "Matt", ...) to read; all when
        None. Books the module lacks are skipped.
      data_dir: the SWORD data directory (default `$VELO_SCALE_SWORD` or
        /usr/share/sword).

    Returns:
      References "Book.chapter.verse" -> text (empty verses left out).
    """
    bible = _open_bible(module, _sword_dir(data_dir))
    structure = bible.get_structure().get_books()
    wanted = None if books is None else set(books)
    verses: dict[str, str] = {}
    for testament in ("ot", "nt"):
        for book in structure.get(testament, []):
            if wanted is not None and book.osis_name not in wanted:
                continue
            refs = [
                f"{book.osis_name}.{c + 1}.{v + 1}"
                for c, n in enumerate(book.chapter_lengths)
                for v in range(n)
            ]
            texts = list(bible.get_iter(books=[book.osis_name], clean=False))
            if len(texts) != len(refs):  # A missing record: read verse by verse.
                texts = [
                    bible.get(
                        books=[book.osis_name],
                        chapters=[int(c)],
                        verses=[int(v)],
                        clean=False,
                    )
                    for c, v in (r.split(".")[1:] for r in refs)
                ]
            for ref, raw in zip(refs, texts):
                text = clean_osis(raw)
                if text:
                    verses[ref] = text
    return verses


def cache_dir() -> pathlib.Path:
    """The Bible cache: `velo_scale.data.cache.cache_dir("bible")`."""
    return cache_lib.cache_dir("bible")


def verse_pairs(
    *,
    english: str = ENGLISH,
    spanish: str = SPANISH,
    books: Sequence[str] | None = None,
    data_dir: str | None = None,
) -> list[tuple[str, str, str]]:
    """Verse-aligned `(reference, english, spanish)` triples, canonical order.

    Only verses present (non-empty) in both modules are kept. The whole Bible
    (`books=None`) is parsed once and cached; a subset is parsed each time.
    """
    if books is None:
        path = cache_dir() / f"pairs-{english}-{spanish}-v{CACHE_VERSION}.json.gz"
        if path.exists():
            return [tuple(p) for p in json.loads(gzip.decompress(path.read_bytes()))]
    if books is not None:  # a subset: parsed each time, not cached
        src = read_verses(english, books=books, data_dir=data_dir)
        tgt = read_verses(spanish, books=books, data_dir=data_dir)
        return [(ref, text, tgt[ref]) for ref, text in src.items() if ref in tgt]
    with cache_lib.preparing(f"Bible verse pairs {english} -> {spanish}", "~1 min"):
        src = read_verses(english, books=books, data_dir=data_dir)
        tgt = read_verses(spanish, books=books, data_dir=data_dir)
        pairs = [(ref, text, tgt[ref]) for ref, text in src.items() if ref in tgt]
        blob = json.dumps(pairs, ensure_ascii=False).encode("utf-8")
        cache_lib.atomic_write_bytes(path, gzip.compress(blob, mtime=0))
    return pairs


# -- SentencePiece --------------------------------------------------------------


def _spm():
    try:
        import sentencepiece
    except ImportError as e:
        raise ImportError(SENTENCEPIECE_MISSING_MSG) from e
    return sentencepiece


class SentencePieceVocab:
    """A SentencePiece model as the translation workloads use it.

    `encode` appends EOS; `decode` reads up to the first EOS and skips
    padding (id 0), as AlgoPerf's WMT detokenisation does.

    Args:
      model: path to a `.model` file or its serialized bytes.
    """

    def __init__(self, model: str | os.PathLike | bytes):
        spm = _spm()
        if isinstance(model, bytes):
            self.processor = spm.SentencePieceProcessor(model_proto=model)
        else:
            path = pathlib.Path(model).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"SentencePiece model {path} not found.")
            self.processor = spm.SentencePieceProcessor(model_file=str(path))
        self.eos_id = int(self.processor.eos_id())
        self.vocab_size = int(self.processor.get_piece_size())

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, EOS appended."""
        return list(self.processor.encode(text)) + [self.eos_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` up to (not including) the first EOS, padding skipped."""
        out = []
        for i in np.asarray(list(ids), np.int64).tolist():
            if i == self.eos_id:
                break
            if i != PAD_ID:
                out.append(int(i))
        return self.processor.decode(out)


def train_sentencepiece(sentences: Sequence[str], vocab_size: int) -> bytes:
    """A unigram SentencePiece model (serialized) trained on `sentences`.

    Deterministic: one thread, every sentence, no sampling. Ids: 0 padding,
    1 unknown, 2 EOS, no BOS; character coverage 1.0 (AlgoPerf's setting).
    """
    spm = _spm()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        eos_id=EOS_ID,
        bos_id=-1,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return model.getvalue()


def _books_key(books: Sequence[str] | None) -> str:
    if books is None:
        return "all"
    return hashlib.sha1(",".join(sorted(books)).encode()).hexdigest()[:10]


def vocab_file(
    *,
    vocab_size: int = VOCAB_SIZE,
    english: str = ENGLISH,
    spanish: str = SPANISH,
    books: Sequence[str] | None = None,
) -> pathlib.Path:
    """Where `bible_vocab` (same arguments) caches its `.model` file (which
    exists only once `bible_vocab` has run)."""
    name = (
        f"spm-{english}-{spanish}-{_books_key(books)}-{vocab_size}"
        f"-v{CACHE_VERSION}.model"
    )
    return cache_dir() / name


def bible_vocab(
    *,
    vocab_size: int = VOCAB_SIZE,
    english: str = ENGLISH,
    spanish: str = SPANISH,
    books: Sequence[str] | None = None,
    data_dir: str | None = None,
) -> SentencePieceVocab:
    """The joint English+Spanish vocabulary of `load_translation` (same
    arguments), trained on the train split's sentences and cached."""
    path = vocab_file(
        vocab_size=vocab_size, english=english, spanish=spanish, books=books
    )
    if path.exists():
        return SentencePieceVocab(path)
    pairs = verse_pairs(
        english=english, spanish=spanish, books=books, data_dir=data_dir
    )
    sentences = [s for ref, en, es in pairs if not is_test_verse(ref) for s in (en, es)]
    with cache_lib.preparing(
        f"the SentencePiece vocabulary ({vocab_size} pieces)", "~1 min"
    ):
        blob = train_sentencepiece(sentences, vocab_size)
        cache_lib.atomic_write_bytes(path, blob)
    return SentencePieceVocab(blob)


def encode_pairs(
    pairs: Iterable[tuple[str, str]], vocab: SentencePieceVocab, max_len: int
) -> dict[str, np.ndarray]:
    """`{"inputs", "targets"}`: int32[n, max_len] token ids padded with 0.

    Each side ends with EOS; pairs with more than `max_len` tokens on either
    side are dropped (AlgoPerf's length filter).
    """
    rows_in, rows_out = [], []
    for source, target in pairs:
        a, b = vocab.encode(source), vocab.encode(target)
        if len(a) <= max_len and len(b) <= max_len:
            rows_in.append(a)
            rows_out.append(b)
    out = {}
    for key, rows in (("inputs", rows_in), ("targets", rows_out)):
        array = np.zeros((len(rows), max_len), np.int32)
        for i, row in enumerate(rows):
            array[i, : len(row)] = row
        out[key] = array
    return out


def load_translation(
    split: str,
    data_dir: str | None = None,
    *,
    books: Sequence[str] | None = None,
    max_len: int = MAX_LEN,
    vocab_size: int = VOCAB_SIZE,
    english: str = ENGLISH,
    spanish: str = SPANISH,
) -> dict[str, np.ndarray]:
    """Bible English -> Spanish verse pairs ("bible_en_es"), tokenised.

    Args:
      split: "train" or "test" (about 5% of verses, chosen by a hash of the
        reference; see the module docstring).
      data_dir: SWORD data directory (default `$VELO_SCALE_SWORD` or
        /usr/share/sword).
      books: OSIS book names to load (all when None; a few books load in
        seconds, for tests). The vocabulary is trained on these books' train
        verses.
      max_len: fixed sequence length; longer pairs are dropped.
      vocab_size: SentencePiece vocabulary size.
      english, spanish: the SWORD modules of the two sides.

    Returns:
      `{"inputs": int32[n, max_len] (English), "targets": int32[n, max_len]
      (Spanish)}`, in canonical verse order, padded with 0, each sequence
      ending with EOS (id 2). With every book and the defaults (vocabulary
      2,000, `max_len=48`): 21,238 of the 31,084 pairs fit, 20,131 train
      and 1,107 test.

    Raises:
      ValueError: unknown split.
      ImportError: pysword or sentencepiece missing (the message says how to
        install it).
      FileNotFoundError: a SWORD module is missing (the message names the
        Debian package).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}.")
    kw = dict(english=english, spanish=spanish, books=books, data_dir=data_dir)
    pairs = verse_pairs(**kw)
    vocab = bible_vocab(vocab_size=vocab_size, **kw)
    want_test = split == "test"
    chosen = ((en, es) for ref, en, es in pairs if is_test_verse(ref) == want_test)
    return encode_pairs(chosen, vocab, max_len)


# -- WMT ------------------------------------------------------------------------


def find_wmt_vocab(data_dir: str | os.PathLike) -> pathlib.Path:
    """AlgoPerf's SentencePiece model: `<data_dir>/wmt_sentencepiece_model`
    or `<data_dir>/wmt/wmt_sentencepiece_model` (AlgoPerf's dataset_setup
    layout)."""
    root = pathlib.Path(data_dir).expanduser()
    candidates = [root / WMT_VOCAB_FILE, root / "wmt" / WMT_VOCAB_FILE]
    for path in candidates:
        if path.exists():
            return path
    raise FileNotFoundError(
        f"No WMT SentencePiece model under {root} (looked for "
        f"{' and '.join(map(str, candidates))}). Prepare the WMT data as AlgoPerf "
        "does (`python datasets/dataset_setup.py --data_dir=DIR --wmt` in "
        "mlcommons/algorithmic-efficiency writes DIR/wmt/wmt_sentencepiece_model "
        "and the wmt14/wmt17 TFDS datasets; rebuild those with "
        "`--file_format=array_record` for random access)."
    )


class TokenizePair:
    """Maps a TFDS WMT record (`{"de": bytes, "en": bytes}`) to padded ids.

    `inputs` (German) and `targets` (English) are int32[max_len]: the
    SentencePiece ids plus EOS, truncated to `max_len` (AlgoPerf filters
    training pairs longer than 256 tokens instead, about 0.1% of them; a
    random-access source cannot drop records), then padded with 0.
    """

    def __init__(
        self,
        vocab: SentencePieceVocab,
        max_len: int = WMT_MAX_LEN,
        source: str = "de",
        target: str = "en",
    ):
        self.vocab, self.max_len = vocab, max_len
        self.source, self.target = source, target

    def _ids(self, text: Any) -> np.ndarray:
        if isinstance(text, np.ndarray):
            text = text.item()
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        ids = self.vocab.encode(str(text))[: self.max_len]
        out = np.zeros((self.max_len,), np.int32)
        out[: len(ids)] = ids
        return out

    def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {
            "inputs": self._ids(record[self.source]),
            "targets": self._ids(record[self.target]),
        }


def load_wmt(
    split: str,
    data_dir: str | None,
    *,
    max_len: int = WMT_MAX_LEN,
    vocab_path: str | os.PathLike | None = None,
):
    """AlgoPerf's WMT German -> English data ("wmt17_de_en"), random access.

    Args:
      split: "train" (`wmt17_translate/de-en` train, 5,906,184 pairs) or
        "test" (`wmt14_translate/de-en` validation = newstest2013, 3,000
        pairs: AlgoPerf's validation split).
      data_dir: holds the prepared TFDS datasets (array_record) either
        directly or under `wmt/`, and `wmt_sentencepiece_model`.
      max_len: sequence length (AlgoPerf: 256).
      vocab_path: the SentencePiece model (default: found under data_dir).

    Returns:
      A random-access source of `{"inputs": int32[max_len], "targets":
      int32[max_len]}` records (see `TokenizePair`).

    Raises:
      FileNotFoundError: no data_dir, SentencePiece model or prepared dataset.
      ImportError: sentencepiece or tensorflow_datasets missing.
    """
    from velo_scale.data.datasets import MappedSource, load_tfds

    if split not in WMT_TFDS:
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}.")
    if data_dir is None:
        raise FileNotFoundError(
            "The 'wmt17_de_en' dataset needs train.data_dir: the directory of the "
            "prepared wmt14/wmt17 TFDS datasets and wmt_sentencepiece_model "
            "(see velo_scale.data.bible.find_wmt_vocab for how to prepare it)."
        )
    vocab = SentencePieceVocab(vocab_path or find_wmt_vocab(data_dir))
    name, tfds_split = WMT_TFDS[split]
    root = pathlib.Path(data_dir).expanduser()
    nested = root / "wmt"
    tfds_dir = nested if (nested / name.split("/")[0]).is_dir() else root
    source = load_tfds(name, tfds_split, data_dir=str(tfds_dir), normalize=False)
    return MappedSource(source, TokenizePair(vocab, max_len))
