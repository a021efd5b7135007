"""Small helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from pathlib import Path

import numpy as np
import soundfile as sf


def write_noise_wav(path: Path, seconds: float = 1.0, seed: int = 0, gain: float = 0.05) -> None:
    """A 16 kHz mono wav of seeded white noise, standing in for speech in real-corpus layout trees."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(path, (gain * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)


def train_on_fixed_batch(objective, wavs, lengths, steps: int, lr: float) -> tuple[dict, dict]:
    """Adam on one batch for ``steps`` updates: the objective's stats before and after, each computed under the same
    seed (so the same masks, negatives and noise), without gradients and without disturbing the torch RNG."""
    import torch

    def evaluate() -> dict:
        state = torch.get_rng_state()
        torch.manual_seed(123)
        with torch.no_grad():
            stats = objective(wavs, lengths).stats
        torch.set_rng_state(state)
        return stats

    objective.train()
    before = evaluate()
    optimizer = torch.optim.Adam(objective.parameters(), lr=lr)
    for _ in range(steps):
        out = objective(wavs, lengths)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    return before, evaluate()
