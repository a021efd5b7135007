"""A minimal ctypes binding to libespeak-ng, as shipped by the ``espeakng-loader`` wheel.

Every call into the C library goes through :class:`Espeak`; nothing else in the package touches it.

Why the library is loaded afresh for every :class:`Espeak` session: libespeak-ng keeps its synthesis state in C
statics (the pitch-flutter phase, the glottal-cycle phase, automatic gain, noise generators...), so synthesising
the same text twice in one process does not give the same samples, and ``espeak_Terminate`` +
``espeak_Initialize`` does not reset those statics. Unloading the shared object (``dlclose``) and loading it
again does. A session is therefore the unit of determinism: a fresh load, then a fixed sequence of calls, gives
byte-identical audio in any process. Loading costs about 3 ms, so callers open one session per chunk of work.
"""

from __future__ import annotations

import _ctypes
import ctypes
import sys
from pathlib import Path

import numpy as np

from speechbench.common import SpeechbenchError

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_SSML = 0x10
_PHONEMES_IPA = 0x02
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE, _PARAM_WORDGAP = 1, 2, 3, 4, 7
NATIVE_RATE = 22050  # libespeak-ng's output sample rate (checked against espeak_Initialize's return value)

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_open_session: Espeak | None = None  # one process-wide C instance: at most one session at a time


class EspeakError(SpeechbenchError, RuntimeError):
    """libespeak-ng is missing, refused a call, or could not be reset (one-line message)."""


def _paths() -> tuple[str, str]:
    try:
        import espeakng_loader
    except ImportError:
        raise EspeakError("the synthetic corpus needs the 'espeakng-loader' package (pip install "
                          "espeakng-loader)") from None
    return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()


def data_path() -> Path:
    """The ``espeak-ng-data`` directory (voices, dictionaries) of the installed wheel."""
    return Path(_paths()[1])


def _is_mapped(lib_path: str) -> bool:
    """Whether the shared object is still mapped into this process (Linux; elsewhere assume it was unloaded)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return str(Path(lib_path).resolve()) in maps or lib_path in maps


class Espeak:
    """One deterministic libespeak-ng session: ``with Espeak() as tts: tts.synth(...)``.

    Entering loads the library from scratch and initialises it in synchronous mode; leaving terminates it and
    unloads it, so the next session starts from the same state.
    """

    def __init__(self) -> None:
        self._lib: ctypes.CDLL | None = None
        self._chunks: list[np.ndarray] = []
        # keep a reference: the C library calls it back during espeak_Synth
        self._callback = _SYNTH_CALLBACK(self._on_audio)

    def _on_audio(self, wav, num_samples, _events) -> int:
        if wav and num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0 = continue synthesis

    def __enter__(self) -> Espeak:
        global _open_session
        if _open_session is not None:
            raise EspeakError("an Espeak session is already open in this process (libespeak-ng is one global "
                              "C instance); close it first")
        lib_path, data = _paths()
        if sys.platform.startswith("linux") and _is_mapped(lib_path):
            raise EspeakError(f"{lib_path} is already loaded in this process by someone else, so its state "
                              "cannot be reset; run the generator in a fresh process")
        lib = ctypes.CDLL(lib_path)
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_Terminate.restype = ctypes.c_int
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode(), 0)
        if rate != NATIVE_RATE:
            _ctypes.dlclose(lib._handle)
            raise EspeakError(f"espeak_Initialize returned {rate} (expected sample rate {NATIVE_RATE}); "
                              f"is {data} a complete espeak-ng-data directory?")
        lib.espeak_SetSynthCallback(self._callback)
        self._lib = lib
        self._libc = ctypes.CDLL(None)
        _open_session = self
        return self

    def __exit__(self, *exc) -> None:
        global _open_session
        if self._lib is not None:
            self._lib.espeak_Terminate()
            _ctypes.dlclose(self._lib._handle)
            self._lib = None
        _open_session = None

    def _check_open(self) -> ctypes.CDLL:
        if self._lib is None:
            raise EspeakError("Espeak session is not open (use it as a context manager)")
        return self._lib

    def set_voice(self, name: str) -> None:
        """Select a voice such as ``en-us+m3`` (accent + variant)."""
        if self._check_open().espeak_SetVoiceByName(name.encode()) != 0:
            raise EspeakError(f"espeak-ng has no voice {name!r}")

    def synth(self, text: str, voice: str, *, rate: int, pitch: int, pitch_range: int, word_gap: int = 0,
              noise_seed: int = 1, ssml: bool = False) -> np.ndarray:
        """Synthesise ``text``; returns int16 samples at :data:`NATIVE_RATE`.

        ``rate`` in words per minute (80-450), ``pitch`` and ``pitch_range`` 0-100 (50 = the voice's default),
        ``word_gap`` extra pause between words in units of 10 ms. ``noise_seed`` seeds espeak's own noise
        generators (breath, frication) so that they are reproducible.
        """
        lib = self._check_open()
        self.set_voice(voice)
        # volume 60, not the default 100: at 100 some variants saturate int16 (hard clipping); the level is
        # normalised afterwards anyway
        for param, value in ((_PARAM_RATE, rate), (_PARAM_PITCH, pitch), (_PARAM_RANGE, pitch_range),
                             (_PARAM_VOLUME, 60), (_PARAM_WORDGAP, word_gap)):
            lib.espeak_SetParameter(param, int(value), 0)
        # espeak draws breath/frication noise from its own generator and (in some paths) from libc rand()
        lib.espeak_ng_SetRandSeed(int(noise_seed))
        self._libc.srand(int(noise_seed) & 0x7FFFFFFF)
        data = text.encode("utf-8") + b"\0"
        self._chunks = []
        flags = _CHARS_UTF8 | (_SSML if ssml else 0)
        status = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, flags, None, None)
        if status != 0:
            raise EspeakError(f"espeak_Synth failed with status {status} for {text[:40]!r}")
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        self._chunks = []
        return audio.astype(np.int16, copy=False)

    def phonemes(self, text: str, voice: str) -> list[str]:
        """IPA phonemes of ``text`` as ``voice`` would say them, one list item per phoneme (marks included).

        ``espeak_TextToPhonemes`` translates one clause per call and advances the text pointer, so it is called
        until the text is used up.
        """
        lib = self._check_open()
        self.set_voice(voice)
        buf = ctypes.create_string_buffer(text.encode("utf-8"))
        ptr = ctypes.c_char_p(ctypes.addressof(buf))
        mode = _PHONEMES_IPA | (ord(" ") << 8)  # bits 8-23: separator between phonemes
        phones: list[str] = []
        while ptr.value:
            out = lib.espeak_TextToPhonemes(ctypes.byref(ptr), _CHARS_UTF8, mode)
            if out:
                phones.extend(out.decode("utf-8").split())
        return phones
