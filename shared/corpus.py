"""Corpus loading (local file or verified download) and the character tokenizer."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MASK_TOKEN = "[MASK]"


class CorpusError(Exception):
    """The corpus cannot be loaded; the message says what to do instead."""


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download_corpus(
    url: str, sha256: str, cache_dir: Path, name: str, timeout: float = 60.0
) -> Path:
    """Return the cached copy of ``url``, downloading it once and checking its hash."""
    target = cache_dir / f"{name}.txt"
    if target.is_file() and sha256_of(target.read_bytes()) == sha256:
        return target
    hint = (
        "Pass a local UTF-8 text file instead: --corpus_path=/path/to/file.txt "
        "or CORPUS_PATH=/path/to/file.txt."
    )
    log.info("downloading corpus %s from %s", name, url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise CorpusError(
            f"could not download the {name} corpus from {url}: {exc}. {hint}"
        ) from exc
    actual = sha256_of(data)
    if actual != sha256:
        raise CorpusError(
            f"the {name} corpus downloaded from {url} has sha256 {actual}, expected {sha256}; "
            f"it was not saved. {hint}"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write then rename, so concurrent replicas never read a half-written file.
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{name}.", suffix=".part")
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, target)
    return target


def load_text(path: Path) -> str:
    """The file's characters exactly (no newline translation), so every window
    is a substring of the file."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise CorpusError(f"corpus_path {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise CorpusError(f"corpus_path {path} is not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise CorpusError(f"corpus_path {path} cannot be read: {exc}") from None
    if not text:
        raise CorpusError(f"corpus_path {path} is empty")
    return text


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding every id plus one spare value (the label
    sentinel for "ignore")."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max:  # ids 0..vocab_size-1, sentinel = max
            return np.dtype(dtype).newbyteorder("<")
    raise CorpusError(f"vocabulary of {vocab_size} symbols is too large")


@dataclass(frozen=True)
class CharTokenizer:
    """Sorted characters of the corpus plus ``[MASK]`` as the last id."""

    chars: tuple[str, ...]

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(tuple(sorted(set(text))))

    @property
    def itos(self) -> list[str]:
        return [*self.chars, MASK_TOKEN]

    @property
    def mask_id(self) -> int:
        return len(self.chars)

    @property
    def n_real(self) -> int:
        return len(self.chars)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    @property
    def ignore_value(self) -> int:
        """Label sentinel on the wire: the largest value of the token dtype."""
        return int(np.iinfo(self.dtype).max)

    def encode(self, text: str) -> np.ndarray:
        if self.vocab_size <= 256 and all(ord(c) < 256 for c in self.chars):
            # Fast path: a 256-entry lookup table over the Latin-1 bytes.
            table = np.zeros(256, dtype=self.dtype)
            table[[ord(c) for c in self.chars]] = np.arange(self.n_real, dtype=self.dtype)
            return table[np.frombuffer(text.encode("latin-1"), dtype=np.uint8)]
        index = {c: i for i, c in enumerate(self.chars)}
        return np.fromiter((index[c] for c in text), dtype=self.dtype, count=len(text))


@dataclass(frozen=True)
class Corpus:
    name: str
    sha256: str
    tokenizer: CharTokenizer
    train: np.ndarray
    val: np.ndarray


def load_corpus(
    *,
    corpus_path: Path | None,
    corpus: str,
    corpus_url: str,
    corpus_sha256: str,
    cache_dir: Path,
    train_val_split: float,
) -> Corpus:
    """Read the corpus and split it: the first ``train_val_split`` of the text
    trains, the rest validates."""
    if corpus_path is not None:
        path, name = corpus_path, corpus_path.stem
    else:
        path, name = download_corpus(corpus_url, corpus_sha256, cache_dir, corpus), corpus
    text = load_text(path)
    tokenizer = CharTokenizer.from_text(text)
    ids = tokenizer.encode(text)
    cut = int(len(ids) * train_val_split)
    return Corpus(
        name=name,
        sha256=sha256_of(text.encode("utf-8")),
        tokenizer=tokenizer,
        train=ids[:cut],
        val=ids[cut:],
    )


def corpus_of(settings: Any) -> Corpus:
    """:func:`load_corpus` with the data settings of ``settings`` (any config
    that holds the ``[data]`` group)."""
    return load_corpus(
        corpus_path=settings.corpus_path,
        corpus=settings.corpus,
        corpus_url=settings.corpus_url,
        corpus_sha256=settings.corpus_sha256,
        cache_dir=settings.cache_dir,
        train_val_split=settings.train_val_split,
    )


def evenly_spaced_windows(ids: np.ndarray, n: int, length: int) -> np.ndarray:
    """``n`` windows of ``length`` ids (int64, (n, length)) whose starts are
    evenly spaced over ``ids``: the fixed windows likelihoods are measured on."""
    starts = np.linspace(0, len(ids) - length, n).round().astype(np.int64)
    return np.stack([ids[s : s + length] for s in starts]).astype(np.int64)
