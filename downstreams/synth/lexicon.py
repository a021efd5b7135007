"""Words, commands and sentences the synthetic corpus speaks: KS vocabulary, IC intents with paraphrases, ER
sentences and the ASR sentence grammar. Pure data plus samplers driven by a numpy Generator."""

from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------- KS (Speech Commands v0.01 vocabulary)
KS_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
KS_UNKNOWN_WORDS = ("bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow",
                    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
KS_UNKNOWN, KS_SILENCE = "_unknown_", "_silence_"
KS_CLASSES = KS_WORDS + (KS_UNKNOWN, KS_SILENCE)

# ---------------------------------------------------------------- IC (Fluent Speech Commands-like, 31 intents)
IC_LOCATIONS = ("kitchen", "bedroom", "washroom")
IC_LANGUAGES = ("Chinese", "Korean", "English", "German")

# (action, object) -> paraphrase templates; "{loc}" marks templates that name the location. Templates without
# "{loc}" serve location "none".
_SWITCHABLE = {
    "activate": ("turn on the {obj}", "switch on the {obj}", "turn the {obj} on", "{obj} on",
                 "switch the {obj} on please"),
    "deactivate": ("turn off the {obj}", "switch off the {obj}", "turn the {obj} off", "{obj} off",
                   "switch the {obj} off please"),
}
_SWITCHABLE_LOC = {
    "activate": ("turn on the lights in the {loc}", "switch on the {loc} lights", "{loc} lights on",
                 "turn the {loc} lights on"),
    "deactivate": ("turn off the lights in the {loc}", "switch off the {loc} lights", "{loc} lights off",
                   "turn the {loc} lights off"),
}
_HEAT = {
    "increase": ("turn up the heat", "turn the heat up", "make it warmer", "increase the temperature",
                 "heat up"),
    "decrease": ("turn down the heat", "turn the heat down", "make it cooler", "decrease the temperature",
                 "lower the heat"),
}
_HEAT_LOC = {
    "increase": ("turn up the heat in the {loc}", "make the {loc} warmer", "increase the {loc} temperature",
                 "turn the heat up in the {loc}"),
    "decrease": ("turn down the heat in the {loc}", "make the {loc} cooler", "decrease the {loc} temperature",
                 "turn the heat down in the {loc}"),
}
_VOLUME = {
    "increase": ("turn up the volume", "increase the volume", "make it louder", "louder please",
                 "turn the sound up"),
    "decrease": ("turn down the volume", "decrease the volume", "make it quieter", "quieter please",
                 "turn the sound down"),
}
_MUSIC = {
    "activate": ("play the music", "put on some music", "start the music", "play some music please"),
    "deactivate": ("stop the music", "pause the music", "turn off the music", "stop playing music"),
}
_LANGUAGE_NONE = ("change language", "switch the language", "change the language please", "use another language")
_LANGUAGE = ("set the language to {lang}", "switch to {lang}", "change the language to {lang}",
             "I want to use {lang}", "{lang} please")
_BRING = ("bring me the {obj}", "get me my {obj}", "fetch the {obj}", "go get the {obj}", "bring my {obj} please")


def ic_intents() -> list[tuple[str, str, str, tuple[str, ...]]]:
    """All intents as ``(action, object, location, paraphrases)``, in a fixed order."""
    out: list[tuple[str, str, str, tuple[str, ...]]] = []
    for action in ("activate", "deactivate"):
        out.append((action, "music", "none", _MUSIC[action]))
        out.append((action, "lamp", "none", tuple(t.format(obj="lamp") for t in _SWITCHABLE[action])))
        out.append((action, "lights", "none", tuple(t.format(obj="lights") for t in _SWITCHABLE[action])))
        for loc in IC_LOCATIONS:
            out.append((action, "lights", loc, tuple(t.format(loc=loc) for t in _SWITCHABLE_LOC[action])))
    for action in ("increase", "decrease"):
        out.append((action, "volume", "none", _VOLUME[action]))
        out.append((action, "heat", "none", _HEAT[action]))
        for loc in IC_LOCATIONS:
            out.append((action, "heat", loc, tuple(t.format(loc=loc) for t in _HEAT_LOC[action])))
    out.append(("change language", "none", "none", _LANGUAGE_NONE))
    for lang in IC_LANGUAGES:
        out.append(("change language", lang, "none", tuple(t.format(lang=lang) for t in _LANGUAGE)))
    for obj in ("newspaper", "juice", "socks", "shoes"):
        out.append(("bring", obj, "none", tuple(t.format(obj=obj) for t in _BRING)))
    return out


# ---------------------------------------------------------------- ER (emotion-neutral wording)
ER_SENTENCES = (
    "the meeting starts at nine tomorrow", "I left my keys on the kitchen table", "we are going to the station now",
    "she called me this afternoon", "the train was late again", "there is a letter for you",
    "he said he would be here soon", "the shop closes at six", "I saw them at the market",
    "you can take the blue one", "they moved to a new house", "it is raining outside",
    "we need to talk about the plan", "my brother is coming home today", "the results came in this morning",
    "I did not expect that", "dinner is ready", "the car is parked outside", "she bought a new phone",
    "tell me what happened", "we watched the game last night", "the door was open", "I will call you later",
    "they finished the work",
)

# ---------------------------------------------------------------- ASR / SID / ASV sentence grammar
_NAMES = ("mary", "john", "peter", "anna", "david", "sarah", "tom", "lucy", "james", "emma", "paul", "kate",
          "mark", "lisa", "robert", "helen")
_AGENTS = (("dog", "dogs"), ("cat", "cats"), ("bird", "birds"), ("horse", "horses"), ("man", "men"),
           ("woman", "women"), ("child", "children"), ("teacher", "teachers"), ("doctor", "doctors"),
           ("farmer", "farmers"), ("sailor", "sailors"), ("king", "kings"), ("queen", "queens"), ("boy", "boys"),
           ("girl", "girls"), ("friend", "friends"), ("robot", "robots"), ("driver", "drivers"),
           ("baker", "bakers"), ("pilot", "pilots"), ("student", "students"), ("soldier", "soldiers"))
_THINGS = (("box", "boxes"), ("ball", "balls"), ("book", "books"), ("letter", "letters"), ("key", "keys"),
           ("cup", "cups"), ("hat", "hats"), ("coat", "coats"), ("chair", "chairs"), ("apple", "apples"),
           ("cake", "cakes"), ("bottle", "bottles"), ("lamp", "lamps"), ("phone", "phones"), ("bag", "bags"),
           ("picture", "pictures"), ("flower", "flowers"), ("stone", "stones"), ("ring", "rings"),
           ("map", "maps"), ("clock", "clocks"), ("shoe", "shoes"), ("basket", "baskets"), ("candle", "candles"))
_PLACES = ("house", "garden", "river", "school", "market", "station", "kitchen", "forest", "castle", "bridge",
           "tower", "library", "beach", "village", "office", "church", "park", "hill", "road", "field", "window",
           "door", "table", "harbor", "hospital", "farm")
_ADJECTIVES = ("red", "green", "blue", "yellow", "black", "white", "big", "small", "old", "young", "happy",
               "quiet", "tall", "warm", "cold", "bright", "dark", "heavy", "empty", "busy", "clever", "lazy",
               "friendly", "strange", "gentle", "little", "famous", "tired", "brave", "angry")
# verbs as (base, third person singular, past)
_MOTION_VERBS = (("run", "runs", "ran"), ("walk", "walks", "walked"), ("go", "goes", "went"),
                 ("drive", "drives", "drove"), ("jump", "jumps", "jumped"), ("swim", "swims", "swam"),
                 ("hurry", "hurries", "hurried"), ("return", "returns", "returned"), ("move", "moves", "moved"),
                 ("travel", "travels", "travelled"))
_MOTION_PREPS = ("to", "toward", "into", "across", "past", "around")
_STAY_VERBS = (("sleep", "sleeps", "slept"), ("sing", "sings", "sang"), ("wait", "waits", "waited"),
               ("sit", "sits", "sat"), ("play", "plays", "played"), ("read", "reads", "read"),
               ("work", "works", "worked"), ("stand", "stands", "stood"), ("dance", "dances", "danced"),
               ("laugh", "laughs", "laughed"), ("rest", "rests", "rested"))
_STAY_PREPS = ("in", "near", "behind", "beside", "inside", "outside", "by")
_OBJECT_VERBS = (("find", "finds", "found"), ("see", "sees", "saw"), ("hold", "holds", "held"),
                 ("carry", "carries", "carried"), ("buy", "buys", "bought"), ("sell", "sells", "sold"),
                 ("paint", "paints", "painted"), ("open", "opens", "opened"), ("drop", "drops", "dropped"),
                 ("want", "wants", "wanted"), ("like", "likes", "liked"), ("hide", "hides", "hid"),
                 ("clean", "cleans", "cleaned"), ("break", "breaks", "broke"), ("bring", "brings", "brought"),
                 ("watch", "watches", "watched"), ("need", "needs", "needed"), ("take", "takes", "took"))
_OBJECT_PREPS = ("under", "on", "near", "behind", "beside", "in")
_NUMBERS = ("two", "three", "four", "five", "six", "seven", "many", "some")
_TIMES = {
    "present": ("every morning", "every day", "at night", "on sunday", "after lunch", "in the evening", "today",
                "every week"),
    "past": ("yesterday", "last night", "last week", "this morning", "an hour ago", "after dinner",
             "on monday"),
    "future": ("tomorrow", "next week", "tonight", "soon", "on friday", "later"),
}
_ADVERBS = ("slowly", "quickly", "again", "quietly", "happily", "carefully")


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _with_article(det: str, words: list[str]) -> list[str]:
    if det == "a" and words[0][0] in "aeio":
        det = "an"
    return [det, *words]


def _noun_phrase(rng: np.random.Generator, pairs, plural: bool, adj_p: float = 0.5) -> list[str]:
    noun = _pick(rng, pairs)[1 if plural else 0]
    words = ([_pick(rng, _ADJECTIVES)] if rng.random() < adj_p else []) + [noun]
    if plural:
        det = _pick(rng, ("the", "the", "his", "her", "our") + _NUMBERS)
        return [det, *words]
    return _with_article(_pick(rng, ("the", "the", "a", "this", "that", "his", "her", "my")), words)


def _subject(rng: np.random.Generator) -> tuple[list[str], bool]:
    r = rng.random()
    if r < 0.25:
        return [_pick(rng, _NAMES)], False
    if r < 0.35:
        a, b = rng.choice(len(_NAMES), 2, replace=False)
        return [_NAMES[a], "and", _NAMES[b]], True
    plural = rng.random() < 0.35
    return _noun_phrase(rng, _AGENTS, plural), plural


def _verb(rng: np.random.Generator, verbs, tense: str, plural: bool) -> list[str]:
    base, third, past = _pick(rng, verbs)
    if tense == "past":
        return [past]
    if tense == "future":
        return ["will", base]
    return [base if plural else third]


def _place(rng: np.random.Generator) -> list[str]:
    words = ([_pick(rng, _ADJECTIVES)] if rng.random() < 0.4 else []) + [_pick(rng, _PLACES)]
    return ["the", *words]


def sentence(rng: np.random.Generator, min_words: int = 5, max_words: int = 13) -> str:
    """A random grammatical sentence in lowercase, e.g. ``"the red dog runs to the old house"``."""
    for _ in range(100):
        tense = _pick(rng, ("present", "present", "past", "past", "future"))
        subj, plural = _subject(rng)
        kind = rng.random()
        if kind < 0.3:
            words = subj + _verb(rng, _MOTION_VERBS, tense, plural) + [_pick(rng, _MOTION_PREPS)] + _place(rng)
        elif kind < 0.5:
            words = subj + _verb(rng, _STAY_VERBS, tense, plural)
            if rng.random() < 0.3:
                words.append(_pick(rng, _ADVERBS))
            words += [_pick(rng, _STAY_PREPS)] + _place(rng)
        else:
            words = subj + _verb(rng, _OBJECT_VERBS, tense, plural) + _noun_phrase(rng, _THINGS, rng.random() < 0.3)
            r = rng.random()
            if r < 0.2:
                words += ["and"] + _noun_phrase(rng, _THINGS, rng.random() < 0.3, adj_p=0.3)
            elif r < 0.7:
                words += [_pick(rng, _OBJECT_PREPS)] + _place(rng)
        r = rng.random()
        if r < 0.3:
            words += _pick(rng, _TIMES[tense]).split()
        elif r < 0.45:
            words = _pick(rng, _TIMES[tense]).split() + words
        if min_words <= len(words) <= max_words:
            return " ".join(words)
    raise RuntimeError("sentence grammar could not meet the length bounds")  # unreachable for sane bounds


def vocabulary() -> set[str]:
    """Every word any task may speak (lowercase), used to check the phone set."""
    words: set[str] = set(KS_WORDS) | set(KS_UNKNOWN_WORDS)
    for *_, texts in ic_intents():
        for t in texts:
            words.update(t.lower().split())
    for s in ER_SENTENCES:
        words.update(s.lower().split())
    words.update(_NAMES)
    for group in (_AGENTS, _THINGS, _MOTION_VERBS, _STAY_VERBS, _OBJECT_VERBS):
        for entry in group:
            words.update(entry)
    words.update(_PLACES + _ADJECTIVES + _MOTION_PREPS + _STAY_PREPS + _OBJECT_PREPS + _NUMBERS + _ADVERBS)
    for times in _TIMES.values():
        for t in times:
            words.update(t.split())
    words.update(("the", "a", "an", "this", "that", "his", "her", "my", "our", "and", "will"))
    return words
