"""benchmark/cost.py: counted parameters and FLOPs (hand-computed on toy upstreams), the RNN formula, the cache."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from speechbench.benchmark import cost as cost_module
from speechbench.benchmark.cost import FLOP_FORMULAS, measure_cost, upstream_cost
from speechbench.common import cache_root
from speechbench.upstreams.base import UpstreamOutput


class FrameLinear(torch.nn.Module):
    """A toy upstream: 10 ms frames of 160 samples through Linear(160, 32) and, optionally, an LSTM(32, 16)."""

    sample_rate, downsample_rate, hidden_size = 16000, 160, 32

    def __init__(self, lstm: bool = False):
        super().__init__()
        self.name, self.num_layers = ("toy_lstm", 2) if lstm else ("toy", 1)
        self.proj = torch.nn.Linear(160, 32)
        self.lstm = torch.nn.LSTM(32, 32, batch_first=True) if lstm else None

    def forward(self, wavs, wav_lengths):
        frames = self.proj(wavs.reshape(wavs.shape[0], -1, 160))  # [B, T, 32]
        hidden = [frames] + ([self.lstm(frames)[0]] if self.lstm is not None else [])
        return UpstreamOutput(hidden, wav_lengths // 160)


def test_params_and_gflops_hand_computed(one_torch_thread):
    cost = measure_cost(FrameLinear(), seconds=2.0, repeats=1)
    frames = 2 * 100
    assert cost["params"] == 160 * 32 + 32
    assert cost["gflops_per_audio_s"] == pytest.approx(2 * frames * 160 * 32 / 1e9 / 2.0)  # 2 FLOPs per MAC
    assert cost["rtf"] > 0 and cost["input_s"] == 2.0 and (cost["device"], cost["precision"]) == ("cpu", "fp32")
    assert cost["threads"] == 1 and cost["machine"] and cost["torch"] == torch.__version__
    with_lstm = measure_cost(FrameLinear(lstm=True), seconds=2.0, repeats=1)
    lstm_flops = 2 * frames * 4 * 32 * (32 + 32)  # four gates, input and recurrent matrices
    assert with_lstm["gflops_per_audio_s"] == pytest.approx((2 * frames * 160 * 32 + lstm_flops) / 1e9 / 2.0)


@pytest.mark.parametrize("cls, gates", [(torch.nn.LSTM, 4), (torch.nn.GRU, 3), (torch.nn.RNN, 1)])
def test_rnn_formula_padded_and_packed(cls, gates, one_torch_thread):
    rnn = cls(16, 8, num_layers=2, batch_first=True)
    per_frame = 2 * gates * 8 * (16 + 8 + 8 + 8)  # layer 1: 16 in + 8 recurrent; layer 2: 8 in + 8 recurrent
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter, torch.inference_mode():
        rnn(torch.randn(3, 10, 16))
    assert counter.get_total_flops() == 30 * per_frame
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(3, 10, 16), torch.tensor([10, 7, 5]),
                                                     batch_first=True)
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter, torch.inference_mode():
        rnn(packed)
    assert counter.get_total_flops() == 22 * per_frame  # only the valid frames


def test_upstream_cost_is_measured_once_and_cached(monkeypatch, tmp_path, one_torch_thread):
    monkeypatch.setenv("SPEECHBENCH_CACHE", str(tmp_path))
    first = upstream_cost(FrameLinear(), seconds=1.0)
    (cached,) = cache_root("cost").iterdir()
    assert json.loads(cached.read_text()) == first

    def no_second_measurement(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(cost_module, "measure_cost", no_second_measurement)
    assert upstream_cost(FrameLinear(), seconds=1.0) == first
    with pytest.raises(AssertionError, match="measured again"):  # another precision is another measurement
        upstream_cost(FrameLinear(), seconds=1.0, precision="bf16")
