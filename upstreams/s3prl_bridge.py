"""``--upstream s3prl:<name>``: any s3prl upstream behind our contract, for interoperability and comparison.

s3prl is imported only when such an upstream is asked for (it pins an older torch/torchaudio pair and must never be
imported at package import). ``s3prl.nn.S3PRLUpstream(name)`` returns a list of hidden states ``[B, T, H]`` and
their lengths; we stack them to ``[B, L, T, D]`` and zero the padded frames. The declared attributes are read from
the S3PRLUpstream object (``num_layers``, ``hidden_sizes``, ``downsample_rates``); s3prl itself discovers them with a
dummy forward when it builds the model. Unlike our native upstreams, s3prl runs padded batches as they come, so its
group-norm models (wav2vec2/HuBERT Base) are not batch-invariant.
"""

from __future__ import annotations

import torch
from torch import nn

from speechbench.upstreams.base import UpstreamOutput, freeze
from speechbench.upstreams.checkpoints import CheckpointError

INSTALL_HINT = ("pip install 'speechbench[s3prl]' (s3prl needs a torch/torchaudio pair it supports: "
                "torchaudio <= 2.8, with its matching torch)")


def import_s3prl_upstream() -> type[nn.Module]:
    try:
        from s3prl.nn import S3PRLUpstream
    except Exception as e:  # ImportError, or torchaudio failing to load against this torch
        raise CheckpointError(f"s3prl upstreams need s3prl, which cannot be imported here "
                              f"({type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''})"
                              f"; {INSTALL_HINT}") from None
    return S3PRLUpstream


class S3PRLBridge(nn.Module):
    """``forward(wavs [B, S], wav_lengths [B]) -> UpstreamOutput(hidden [B, L, T, D], lengths [B])``."""

    sample_rate: int = 16000

    def __init__(self, upstream: nn.Module, name: str) -> None:
        super().__init__()
        self.upstream = freeze(upstream)
        self.name = f"s3prl:{name}"
        sizes, rates = list(upstream.hidden_sizes), list(upstream.downsample_rates)
        if len(set(sizes)) != 1 or len(set(rates)) != 1:
            raise CheckpointError(f"{self.name}: layers of different widths {sizes} or rates {rates} cannot share one "
                                  f"weighted sum")
        self.num_layers, self.hidden_size, self.downsample_rate = len(sizes), sizes[0], rates[0]
        self.checkpoint_format, self.checkpoint_sha256 = "s3prl-bridge", None
        self.settings = {"s3prl_name": name}

    def forward(self, wavs: torch.Tensor, wav_lengths: torch.Tensor) -> UpstreamOutput:
        wav_lengths = torch.as_tensor(wav_lengths, device=wavs.device).long()
        states, state_lengths = self.upstream(wavs.float(), wav_lengths)
        lengths = state_lengths[0].long()
        hidden = torch.stack(list(states), dim=1)
        valid = torch.arange(hidden.shape[2], device=hidden.device)[None, :] < lengths[:, None]
        return UpstreamOutput(hidden=hidden * valid[:, None, :, None].to(hidden.dtype), lengths=lengths)


def build_s3prl_upstream(name: str, ckpt: str | None = None) -> S3PRLBridge:
    """Wrap ``s3prl.nn.S3PRLUpstream(name, path_or_url=ckpt)``."""
    cls = import_s3prl_upstream()
    try:
        upstream = cls(name, path_or_url=ckpt) if ckpt else cls(name)
    except Exception as e:
        raise CheckpointError(f"s3prl:{name}: s3prl could not build it ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})") from None
    return S3PRLBridge(upstream, name)
