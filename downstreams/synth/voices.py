"""Synthetic speakers: an English accent x an espeak voice variant x pitch/range/rate x a vocal-tract warp.

A speaker is a frozen set of synthesis parameters. Each utterance jitters them a little (see ``tasks.py``) so the
same speaker never says the same text twice in exactly the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from speechbench.downstreams.synth.espeak import EspeakError, data_path

# The eight English accents of espeak-ng (lang/gmw/en*), by voice name.
ACCENTS = ("en", "en-us", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc")

# Voice variants (espeak-ng-data/voices/!v) as "name:gender:family". Gender is the file's own, or guessed from its
# base pitch when the file gives none; family "klatt" marks the Klatt-synthesiser variants, which sound alike.
# Left out: whisper/whisperf/caleb (unvoiced: no pitch, so no prosody for emotions), robosoft6/robosoft8 (flat
# monotone), Demonic (not speech-like), "Mr serious" (space in the name).
_VARIANT_TABLE = """
Alex:m:std Alicia:f:std Andrea:f:std Andy:m:std Annie:f:std AnxiousAndy:m:std Denis:m:std Diogo:m:std
Gene:m:std Gene2:m:std Henrique:m:std Hugo:m:std Jacky:m:std Lee:m:std Marco:m:std Mario:m:std Michael:m:std
Mike:m:std Nguyen:m:std Reed:m:klatt RicishayMax:m:std RicishayMax2:m:std RicishayMax3:m:std Storm:m:std
Tweaky:m:std UniRobot:m:klatt adam:m:klatt anika:f:std anikaRobot:f:std announcer:m:klatt antonio:m:std
aunty:f:std belinda:f:std benjamin:m:klatt boris:m:std croak:m:std david:m:klatt ed:m:std edward:m:klatt
edward2:m:klatt f1:f:std f2:f:std f3:f:std f4:f:std f5:f:std fast:m:std grandma:f:std grandpa:m:std
gustave:m:std ian:m:std iven:m:std iven2:m:std iven3:m:std iven4:m:std john:m:std kaukovalta:m:std klatt:m:klatt
klatt2:m:klatt klatt3:m:klatt klatt4:m:klatt klatt5:m:klatt klatt6:m:klatt linda:f:std m1:m:std m2:m:std
m3:m:std m4:m:std m5:m:std m6:m:std m7:m:std m8:m:std marcelo:m:std max:m:std michel:m:std miguel:m:std
mike2:m:klatt norbert:m:std pablo:m:std paul:m:std pedro:m:std quincy:m:std rob:m:std robert:m:std
robosoft:m:klatt robosoft2:m:klatt robosoft3:m:klatt robosoft4:m:std robosoft5:m:std robosoft7:m:std
sandro:m:std shelby:f:std steph:f:std steph2:f:std steph3:f:std travis:m:std victor:m:std zac:f:std
"""


@dataclass(frozen=True)
class Variant:
    name: str
    gender: str  # "m" | "f"
    family: str  # "std" | "klatt"


VARIANTS: tuple[Variant, ...] = tuple(Variant(*item.split(":")) for item in _VARIANT_TABLE.split())


@dataclass(frozen=True)
class Speaker:
    """Baseline synthesis parameters of one synthetic speaker."""

    id: str
    accent: str
    variant: str
    gender: str
    family: str
    pitch: float  # espeak pitch parameter, 0-100 (50 = the variant's own base pitch)
    pitch_range: float  # espeak range parameter, 0-100
    rate: float  # words per minute
    warp: float  # vocal-tract length factor: >1 raises formants (and pitch), <1 lowers them
    word_gap: int  # extra pause between words, in 10 ms units

    @property
    def voice(self) -> str:
        return f"{self.accent}+{self.variant}"

    def to_dict(self) -> dict:
        return asdict(self)


def check_variants() -> None:
    """Fail early, with one line, if the installed espeak-ng-data lacks a variant the corpus relies on."""
    folder = data_path() / "voices" / "!v"
    missing = [v.name for v in VARIANTS if not (folder / v.name).is_file()]
    if missing:
        raise EspeakError(f"espeak-ng-data at {folder} lacks voice variants {missing[:5]}; the synthetic "
                                "corpus needs the data shipped with espeakng-loader>=0.2.4")


def _draw(rng: np.random.Generator, sid: str, accent: str, variant: Variant) -> Speaker:
    return Speaker(
        id=sid, accent=accent, variant=variant.name, gender=variant.gender, family=variant.family,
        pitch=float(rng.uniform(25, 75)), pitch_range=float(rng.uniform(30, 75)), rate=float(rng.uniform(145, 205)),
        warp=float(rng.uniform(0.91, 1.09)), word_gap=int(rng.integers(0, 3)),
    )


def sample_speakers(rng: np.random.Generator, prefix: str, n: int) -> list[Speaker]:
    """``n`` speakers whose (accent, variant) pairs are all different (while the 8 x ~100 pairs last)."""
    pairs = [(a, v) for a in ACCENTS for v in VARIANTS]
    order = rng.permutation(len(pairs))
    speakers = []
    for i in range(n):
        accent, variant = pairs[int(order[i % len(pairs)])]
        speakers.append(_draw(rng, f"{prefix}{i:04d}", accent, variant))
    return speakers


def twin_of(rng: np.random.Generator, sid: str, other: Speaker) -> Speaker:
    """A different speaker who is easy to confuse with ``other``: same accent, gender and variant family, a
    different variant, and pitch, range, rate and warp all close. Used for hard negative ASV trials."""
    pool = [v for v in VARIANTS if v.gender == other.gender and v.family == other.family and v.name != other.variant]
    pool = pool or [v for v in VARIANTS if v.name == other.variant]  # a family of one: same variant, other params
    variant = pool[int(rng.integers(len(pool)))]
    return Speaker(
        id=sid, accent=other.accent, variant=variant.name, gender=variant.gender, family=variant.family,
        pitch=float(np.clip(other.pitch + rng.uniform(-5, 5), 15, 85)),
        pitch_range=float(np.clip(other.pitch_range + rng.uniform(-8, 8), 20, 85)),
        rate=float(other.rate * rng.uniform(0.94, 1.06)), warp=float(other.warp * rng.uniform(0.98, 1.02)),
        word_gap=other.word_gap,
    )
