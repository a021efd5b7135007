"""Render planned utterances to 16 kHz wav files: espeak synthesis with per-utterance jitter, then ``augment``.

A job's audio depends only on the job, the corpus seed and the sequence of jobs rendered before it in the same
espeak session; sessions are opened per chunk (``render_chunk``), so a chunk renders identically in any process.
"""

from __future__ import annotations

import hashlib
import wave
from pathlib import Path

import numpy as np

from speechbench.common import SAMPLE_RATE
from speechbench.downstreams.synth import augment as aug
from speechbench.downstreams.synth.espeak import NATIVE_RATE, Espeak
from speechbench.downstreams.synth.phones import phone_string
from speechbench.downstreams.synth.tasks import TASK_CODES, Job

GAIN_DB = 6.0  # random gain after level normalisation: +-6 dB
SNR_DB = (10.0, 30.0)
REVERB_P = 0.3


def job_rng(job: Job, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, TASK_CODES[job.task], job.index, job.attempt])


def _place(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Put ``x`` at a random offset inside ``n`` samples (Speech Commands clips are 1 s, word anywhere)."""
    out = np.zeros(n, np.float32)
    if len(x) > n:  # only very slow speakers: keep the start, fade out the cut
        x = x[:n].copy()
        fade = min(n, SAMPLE_RATE // 100)
        x[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    offset = int(rng.integers(0, n - len(x) + 1))
    out[offset: offset + len(x)] = x
    return out


def render(tts: Espeak, job: Job, seed: int) -> tuple[np.ndarray, str, dict]:
    """One utterance: ``(float32 audio at 16 kHz, hash of the clean speech, extra labels)``."""
    rng = job_rng(job, seed)
    level_db = aug.TARGET_DBFS + rng.uniform(-GAIN_DB, GAIN_DB)
    snr_db = rng.uniform(*SNR_DB)
    if not job.text:  # KS _silence_: background noise only, at the level it has under speech
        n = int(round(job.clip_s * SAMPLE_RATE))
        return aug.coloured_noise(n, rng) * aug.db_to_amp(level_db - snr_db), "", {}

    s = job.speaker
    p = job.prosody
    # per-utterance jitter on top of the speaker's baseline (and the emotion's offsets)
    pitch = float(np.clip(s.pitch + p.pitch + rng.uniform(-4, 4), 0, 100))
    pitch_range = float(np.clip(s.pitch_range + p.range + rng.uniform(-6, 6), 0, 100))
    rate = float(np.clip(s.rate * p.rate * rng.uniform(0.95, 1.05), 80, 400))
    warp = s.warp * rng.uniform(0.985, 1.015)
    tilt_gain = aug.db_to_amp(p.tilt_db) - 1.0 + rng.uniform(-0.2, 0.2)  # +-0.2: about +-1.7 dB
    noise_seed = int(rng.integers(1, 2**31 - 1))
    pcm = tts.synth(job.text, s.voice, rate=round(rate), pitch=round(pitch), pitch_range=round(pitch_range),
                    word_gap=s.word_gap, noise_seed=noise_seed)
    if not np.any(pcm):
        raise RuntimeError(f"{job.id}: espeak produced no audio for {job.text!r} with voice {s.voice}")
    x = aug.warp_resample(pcm, NATIVE_RATE, warp)
    speech_hash = hashlib.sha1(x.tobytes()).hexdigest()  # clean speech: equal hashes = an identical rendition

    x = aug.trim(x, rng, (0.0, 0.03) if job.clip_s else (0.1, 0.35))
    x = aug.tilt(x, tilt_gain)
    if p.breath_db is not None:
        x = aug.breath(x, p.breath_db + rng.uniform(-3, 3), rng)
    if job.clip_s:
        x = _place(x, int(round(job.clip_s * SAMPLE_RATE)), rng)
    if rng.random() < REVERB_P:
        x = aug.reverb(x, rng)
    x = aug.normalise(x, level_db)
    x = aug.add_noise(x, aug.db_to_amp(level_db), snr_db, rng)
    x = aug.peak_guard(x)
    labels = {}
    if job.phonemes:
        labels["phonemes"] = phone_string(tts.phonemes(job.text, s.accent), job.text)
    return x, speech_hash, labels


def write_wav(path: Path, pcm: np.ndarray) -> None:
    """16 kHz mono PCM_16 RIFF wav. The stdlib writer, not soundfile: libsndfile fsyncs every file on close,
    which costs more than synthesising the utterance (the corpus is made durable as a whole by the final rename
    of its directory)."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.astype("<i2").tobytes())


def wav_path(root: Path, job: Job) -> Path:
    return root / "wavs" / job.task / f"{job.id}.wav"


def render_to_file(tts: Espeak, job: Job, seed: int, root: Path) -> tuple[str, float, str, dict]:
    """Render and write ``wavs/<task>/<id>.wav``; returns ``(id, duration_s, speech hash, extra labels)``."""
    audio, speech_hash, labels = render(tts, job, seed)
    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)
    path = wav_path(root, job)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_wav(path, pcm)
    return job.id, len(pcm) / SAMPLE_RATE, speech_hash, labels


def render_chunk(args: tuple[str, int, list[Job]]) -> list[tuple[str, float, str, dict]]:
    """Worker entry point: render a chunk of jobs in one fresh espeak session."""
    root, seed, jobs = args
    with Espeak() as tts:
        return [render_to_file(tts, job, seed, Path(root)) for job in jobs]
