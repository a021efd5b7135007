"""ASR: LibriSpeech layout, the BiLSTM CTC head, SpecAugment, and short end-to-end runs (real layout and synthetic)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechbench.benchmark.config import OptimConfig, RunConfig, TrainConfig
from speechbench.benchmark.run import RunRequest, run
from speechbench.benchmark.train import DownstreamModel, train
from speechbench.downstreams.asr import ASROptions, BiLSTMCTCHead, SpecAugment, prepare, time_warp
from speechbench.downstreams.data import DataError
from speechbench.downstreams.featurizer import WeightedLayerSum
from speechbench.downstreams.tasks import get_task

# (split, speaker, chapter, transcripts); "ZORKLEMPH" is not in CMUdict (PR drops those utterances)
LIBRI = (
    ("train-clean-100", "19", "198", ("HELLO WORLD", "THE CAT SAT ON THE MAT", "DON'T STOP NOW", "ZORKLEMPH IS HERE")),
    ("train-clean-100", "26", "495", ("GOOD MORNING", "THE DOG RAN HOME", "IT IS COLD")),
    ("dev-clean", "84", "121123", ("THE SUN IS UP", "A RED HAT")),
    ("test-clean", "1089", "134686", ("THE CAT RAN", "HELLO DOG", "ZORKLEMPH SAT")),
)
SMALL_ASR = ("train.max_steps=4", "train.eval_every=2", "train.batch_size=4", "task_options.project_dim=16",
             "task_options.hidden_size=8", "task_options.spec_freq_width=8", "task_options.spec_time_width=5")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny recurrent/conv heads: one thread is fastest


def make_librispeech(base: Path) -> Path:
    """A tiny tree in the real LibriSpeech layout (noise instead of speech, 16 kHz FLAC)."""
    root = base / "LibriSpeech"
    rng = np.random.default_rng(0)
    for split, speaker, chapter, texts in LIBRI:
        folder = root / split / speaker / chapter
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for k, text in enumerate(texts):
            uid = f"{speaker}-{chapter}-{k:04d}"
            audio = 0.1 * rng.standard_normal(int(16000 * (0.8 + 0.1 * len(text.split()))))
            sf.write(folder / f"{uid}.flac", audio.astype(np.float32), 16000)
            lines.append(f"{uid} {text}")
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return root


def _data(root: Path | None = None, **kw):
    return dataclasses.replace(RunConfig(task="asr").data, corpus="real" if root else "synth",
                               root=str(root) if root else None, **kw)


def test_prepare_librispeech_layout(tmp_path):
    root = make_librispeech(tmp_path)
    prepared = prepare(_data(root), ASROptions())
    splits = prepared.splits
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [7, 2, 3]
    first = splits["train"][0]
    assert (first.id, first.speaker, first.split) == ("19-198-0000", "19", "train")
    assert first.path == "train-clean-100/19/198/19-198-0000.flac" and (root / first.path).is_file()
    assert first.labels["text"] == "HELLO WORLD" and first.duration_s == pytest.approx(1.0)
    assert {u.speaker for u in splits["dev"]} == {"84"} and prepared.corpus == "LibriSpeech"
    targets = get_task("asr").targets(splits["train"][:1], prepared)
    assert prepared.label_space.decode(targets[0].tolist()) == list("HELLO|WORLD")


def test_wrong_librispeech_layouts_give_one_line_errors(tmp_path):
    root = make_librispeech(tmp_path)
    with pytest.raises(DataError, match="expected the corpus folder of the LibriSpeech layout"):
        prepare(_data(tmp_path / "nowhere"), ASROptions())
    with pytest.raises(DataError, match=r"test-other: expected the test-other/ folder of the LibriSpeech layout, not "
                                        r"found; found in .*: dev-clean, test-clean, train-clean-100"):
        prepare(_data(root), ASROptions(test_split="test-other"))
    (root / "dev-clean" / "84" / "121123" / "84-121123-0001.flac").unlink()
    with pytest.raises(DataError, match=r"84-121123-0001.flac: audio file not found \(listed in .*84-121123.trans"):
        prepare(_data(root), ASROptions())
    trans = root / "test-clean" / "1089" / "134686" / "1089-134686.trans.txt"
    trans.write_text("1089-134686-0000 THE CAT RAN 2 TIMES\n")
    with pytest.raises(DataError, match=r"utterance 1089-134686-0000 has characters \['2'\] outside A-Z"):
        prepare(_data(root), ASROptions(dev_split="train-clean-100"))
    trans.write_text("THE CAT RAN\n")
    with pytest.raises(DataError, match=r"trans.txt:1: expected '1089-134686-<utt> TRANSCRIPT'"):
        prepare(_data(root), ASROptions(dev_split="train-clean-100"))
    flat = tmp_path / "flat" / "LibriSpeech" / "train-clean-100"
    flat.mkdir(parents=True)
    sf.write(flat / "19-198-0000.flac", np.zeros(1600, np.float32), 16000)
    with pytest.raises(DataError, match="no <speaker>/<chapter>/<speaker>-<chapter>.trans.txt found"):
        prepare(_data(flat.parent), ASROptions())
    with pytest.raises(DataError, match="needs --data-root"):
        prepare(dataclasses.replace(_data(root), root=None, corpus="real"), ASROptions())


def test_bilstm_head_is_exact_on_valid_frames_whatever_the_padding():
    torch.manual_seed(0)
    for k in (1, 2):
        head = BiLSTMCTCHead(6, 5, ASROptions(project_dim=8, hidden_size=4, downsample=k)).eval()
        lengths = torch.tensor([9, 5, 2])
        x = torch.randn(3, 9, 6)
        out = head(x, lengths)
        assert out.logits.shape == (3, (9 + k - 1) // k, 5)
        assert out.lengths.tolist() == [(n + k - 1) // k for n in lengths.tolist()]
        for b, n in enumerate(lengths.tolist()):
            alone = head(x[b: b + 1, :n], torch.tensor([n]))
            m = int(out.lengths[b])
            torch.testing.assert_close(out.logits[b, :m], alone.logits[0, :m], atol=1e-5, rtol=1e-5)


def test_specaugment_masks_only_in_training_and_follows_the_torch_seed():
    aug = SpecAugment(freq_masks=2, freq_width=3, time_masks=2, time_width=4)
    x, lengths = torch.ones(4, 20, 10), torch.tensor([20, 15, 10, 6])
    torch.manual_seed(1)
    a = aug.train()(x, lengths)
    torch.manual_seed(1)
    b = aug(x, lengths)
    assert torch.equal(a, b) and (a == 0).any() and (a == 1).any()
    assert torch.equal(aug.eval()(x, lengths), x)
    # a time mask never reaches past the valid frames: a masked frame is zero in every dimension
    masked_frames = (a == 0).all(dim=-1)
    for i, n in enumerate(lengths.tolist()):
        assert not masked_frames[i, n:].any() or n == 20


def test_time_warp_moves_one_centre_frame_within_the_window():
    window, t = 5, 40
    ramp = torch.arange(t, dtype=torch.float32)[:, None].expand(t, 3)  # frame k holds the value k
    warped_any = False
    for seed in range(20):
        torch.manual_seed(seed)
        out = time_warp(ramp, window)
        assert out.shape == ramp.shape
        # a warp resamples [0, c) onto [0, w) and [c, t) onto [w, t): values stay in order, ends in place, and no
        # frame moves by more than the window
        assert torch.all(out[1:, 0] >= out[:-1, 0] - 0.2) and abs(out[0, 0]) < 0.6 and abs(out[-1, 0] - (t - 1)) < 0.6
        assert (out[:, 0] - ramp[:, 0]).abs().max() <= window + 1
        warped_any |= not torch.allclose(out, ramp)
    assert warped_any
    const = torch.full((t, 3), 2.5)
    torch.testing.assert_close(time_warp(const, window), const)  # cubic interpolation keeps a constant
    short = torch.randn(10, 3)
    assert torch.equal(time_warp(short, window), short) and torch.equal(time_warp(ramp, 0), ramp)


def test_specaugment_time_warp_stays_inside_each_utterance():
    aug = SpecAugment(freq_masks=0, freq_width=0, time_masks=0, time_width=0, time_warp=5).train()
    x, lengths = torch.randn(3, 30, 4), torch.tensor([30, 22, 8])
    x[1, 22:] = 7.0
    x[2, 8:] = 7.0
    torch.manual_seed(0)
    out = aug(x, lengths)
    assert torch.equal(out[1, 22:], x[1, 22:]) and torch.equal(out[2], x[2])  # padding untouched; 8 <= 2 * 5
    assert not torch.equal(out[0], x[0])
    assert torch.equal(aug.eval()(x, lengths), x)


class _Frames:
    """An in-memory frame source: ``get(indices) -> ([B, 1, T, D], lengths [B])``."""

    def __init__(self, feats):
        self.feats = feats

    def __len__(self):
        return len(self.feats)

    def get(self, indices, draw=0):
        lengths = torch.tensor([self.feats[i].shape[0] for i in indices])
        out = torch.zeros(len(indices), 1, int(lengths.max()), self.feats[0].shape[1])
        for j, i in enumerate(indices):
            out[j, 0, : lengths[j]] = self.feats[i]
        return out, lengths


def test_training_with_specaugment_resumes_exactly(tmp_path):
    task = get_task("asr")
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(int(n), 6, generator=g) for n in torch.randint(20, 40, (12,), generator=g)]
    targets = [torch.randint(1, 29, (5,), generator=g) for _ in feats]
    refs = ["A B"] * 4
    cfg = RunConfig(task="asr", optim=OptimConfig(lr=1e-2),
                    train=TrainConfig(max_steps=6, batch_size=4, eval_every=2, seed=3, max_batch_s=2.0))
    options = ASROptions(project_dim=8, hidden_size=4, spec_freq_width=3, spec_time_width=5)

    def fit(ckpt_dir, stop_at=None):
        torch.manual_seed(0)
        model = DownstreamModel(WeightedLayerSum(1), BiLSTMCTCHead(6, 29, options))

        def hook(step):
            if step == stop_at:
                raise KeyboardInterrupt

        state = train(model, task, cfg, _Frames(feats), targets, [0.3] * 12, _Frames(feats[:4]), refs, ckpt_dir,
                      length_buckets=True, on_checkpoint=hook)
        return model, state

    full, _ = fit(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "cut", stop_at=2)
    resumed, _ = fit(tmp_path / "cut")
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_short_run_on_the_librispeech_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEECHBENCH_CACHE", str(tmp_path / "cache"))
    root = make_librispeech(tmp_path)
    (result,) = run(RunRequest(upstream="fbank_no_cmvn", task="asr", data_root=str(root), overrides=SMALL_ASR,
                               out_dir=str(tmp_path / "out")))
    assert result["recipe"]["name"] == "superb/asr" and result["data"]["corpus"] == "LibriSpeech"
    assert result["protocol"]["time_warp_window"] == 5 and result["protocol"]["test_official"] == 2620
    assert (result["metric"], result["unit"], result["higher_is_better"]) == ("wer", "%", False)
    assert result["value"] >= 0.0 and "cer" in result["extra_metrics"] and result["steps"] == 4
    run_dir = next((tmp_path / "out" / "fbank_no_cmvn" / "asr").iterdir())
    refs = (run_dir / "ref.txt").read_text().splitlines()
    assert refs == ["1089-134686-0000 THE CAT RAN", "1089-134686-0001 HELLO DOG", "1089-134686-0002 ZORKLEMPH SAT"]
    assert len((run_dir / "hyp.txt").read_text().splitlines()) == 3
    assert json.loads((run_dir / "result.json").read_text())["value"] == result["value"]


@pytest.mark.slow
def test_short_run_on_the_synthetic_corpus(tmp_path, synth_tiny):
    (result,) = run(RunRequest(upstream="fbank_no_cmvn", task="asr", out_dir=str(tmp_path),
                               overrides=("data.profile=tiny",) + SMALL_ASR))
    assert result["recipe"]["name"] == "synth/asr" and result["data"]["corpus"] == "synth"
    assert result["metric"] == "wer" and result["value"] >= 0.0 and result["features"].startswith("frames cache")
