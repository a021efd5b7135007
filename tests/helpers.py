"""Small helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from pathlib import Path

import numpy as np
import soundfile as sf


def write_noise_wav(path: Path, seconds: float = 1.0, seed: int = 0, gain: float = 0.05) -> None:
    """A 16 kHz mono wav of seeded white noise, standing in for speech in real-corpus layout trees."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(path, (gain * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
