"""The phone set of the synthetic corpus' ``phonemes`` field (PR task).

Phonemes come from ``espeak_TextToPhonemes`` in IPA, for the same text and accent as the audio. Stress marks
(ˈ ˌ), length marks (ː ˑ and espeak's ASCII ``:``), palatalisation (ʲ) and combining diacritics are stripped and a
doubled vowel letter is collapsed, which leaves the 73 phones below: the union over the eight English accents,
so some phones only occur in some accents (e.g. ``ɚ``/``ɾ`` in en-us, ``ʍ``/``ʉ`` in en-gb-scotland).
"""

from __future__ import annotations

import unicodedata

PHONE_SET: tuple[str, ...] = (
    # consonants
    "b", "d", "dʒ", "f", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "tʃ", "v", "w", "z",
    "ð", "ŋ", "ɡ", "ɹ", "ɾ", "ʃ", "ʍ", "θ",
    # monophthongs
    "a", "e", "i", "o", "u", "æ", "ɐ", "ɑ", "ɒ", "ɔ", "ə", "ɚ", "ɛ", "ɜ", "ɪ", "ʉ", "ʊ", "ʌ", "ᵻ",
    # diphthongs, triphthongs, r-coloured and syllabic units espeak emits as one phoneme
    "aɪ", "aɪə", "aɪɚ", "aʊ", "eɪ", "ei", "eə", "iə", "oɪ", "oʊ", "oə", "æʊ", "ɑɹ", "ɑə", "ɔɪ", "ɔɹ", "ɔə",
    "əl", "əu", "əɪ", "əɹ", "əʊ", "ɛɹ", "ɛə", "ɪɹ", "ʌɹ", "ʌʉ", "ʌʊ",
)
_PHONES = frozenset(PHONE_SET)
_STRIP = frozenset("ˈˌːˑ:ʲ")


def normalise_phone(phone: str) -> str:
    """Strip stress, length and diacritic marks from one espeak IPA phoneme ("" if nothing is left)."""
    p = "".join(c for c in phone if c not in _STRIP and not unicodedata.combining(c))
    if len(p) == 2 and p[0] == p[1]:  # espeak writes some long vowels as a doubled letter ("aa")
        p = p[0]
    return p


def phone_string(raw_phones: list[str], text: str = "") -> str:
    """Space-separated normalised phones; refuses a phone outside PHONE_SET (the set must then be extended)."""
    phones = [p for p in (normalise_phone(r) for r in raw_phones) if p]
    unknown = sorted({p for p in phones if p not in _PHONES})
    if unknown:
        raise ValueError(f"espeak produced phones {unknown} outside PHONE_SET for {text!r}; extend "
                         "downstreams/synth/phones.py (and bump CORPUS_VERSION)")
    return " ".join(phones)
