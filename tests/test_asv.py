"""ASV: VoxCeleb1 layout, dev trials from held-out speakers, the x-vector head, AM-softmax, scoring, short runs."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechbench.benchmark.config import RunConfig
from speechbench.benchmark.run import RunRequest, run
from speechbench.benchmark.train import BatchSchedule, batches_by_length
from speechbench.downstreams.asv import (
    SELECTION_RULE,
    SUPERB_TEST_RULE,
    ASVData,
    ASVOptions,
    XVectorHead,
    am_softmax_loss,
    build_trials,
    prepare,
    prepare_real,
    references,
    score,
    stats_pool,
)
from speechbench.downstreams.data import DataError, Utterance
from speechbench.downstreams.tasks import PreparedData, get_task

DEV_SPEAKERS = [f"id100{k:02d}" for k in range(1, 9)]
TEST_SPEAKERS = ["id10270", "id10271"]
SMALL_ASV = ("train.max_steps=4", "train.eval_every=2", "train.batch_size=4", "task_options.input_dim=16",
             "task_options.agg_dim=24", "task_options.embedding_dim=8", "task_options.dev_speakers=2",
             "task_options.dev_utterances_per_speaker=3", "task_options.dev_trials=12")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny recurrent/conv heads: one thread is fastest


def make_voxceleb1(base: Path) -> Path:
    """A tiny tree in the VoxCeleb1 layout: 8 development and 2 test speakers, noise audio, veri_test.txt."""
    root = base / "VoxCeleb1"
    rng = np.random.default_rng(0)
    for s, speaker in enumerate(DEV_SPEAKERS + TEST_SPEAKERS):
        for v, video in enumerate(("aaaaaaaaaaa", "bbbbbbbbbbb")):
            for u in range(2):
                path = root / "wav" / speaker / video / f"{u + 1:05d}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                seconds = 1.5 if (s, v, u) == (0, 0, 0) else 2.0 + 0.25 * u + 0.5 * v  # one short training file
                sf.write(path, (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
    a, b = TEST_SPEAKERS
    trials = [(1, f"{a}/aaaaaaaaaaa/00001.wav", f"{a}/bbbbbbbbbbb/00002.wav"),
              (0, f"{a}/aaaaaaaaaaa/00001.wav", f"{b}/aaaaaaaaaaa/00001.wav"),
              (1, f"{b}/aaaaaaaaaaa/00001.wav", f"{b}/bbbbbbbbbbb/00001.wav"),
              (0, f"{b}/bbbbbbbbbbb/00001.wav", f"{a}/bbbbbbbbbbb/00002.wav")]
    (root / "veri_test.txt").write_text("".join(f"{lab} {x} {y}\n" for lab, x, y in trials))
    return root


def _options(**kw) -> ASVOptions:
    return ASVOptions(**{"dev_speakers": 2, "dev_utterances_per_speaker": 3, "dev_trials": 12, **kw})


def test_prepare_voxceleb1_holds_out_dev_speakers_for_checkpoint_selection(tmp_path):
    root = make_voxceleb1(tmp_path)
    splits, trials, info = prepare_real(root, _options())
    test_ids = {x for _, a, b in trials["test"] for x in (a, b)}
    assert test_ids == {u.id for u in splits["test"]} and len(test_ids) == 4
    assert "id10270/aaaaaaaaaaa/00001" in test_ids and splits["test"][0].path.endswith(".wav")
    dev_speakers = {u.speaker for u in splits["dev"]}
    train_speakers = {u.speaker for u in splits["train"]}
    assert len(dev_speakers) == 2 and not dev_speakers & train_speakers
    assert dev_speakers | train_speakers == set(DEV_SPEAKERS) and not train_speakers & set(TEST_SPEAKERS)
    assert all(len([u for u in splits["dev"] if u.speaker == s]) == 3 for s in dev_speakers)
    assert {lab for lab, _, _ in trials["dev"]} == {0, 1} and len(trials["dev"]) == 12
    dev_ids = {u.id for u in splits["dev"]}
    assert all(a in dev_ids and b in dev_ids and a != b for _, a, b in trials["dev"])
    assert all((lab == 1) == (a.split("/")[0] == b.split("/")[0]) for lab, a, b in trials["dev"])
    short = "id10001/aaaaaaaaaaa/00001"
    assert info["train_dropped_short"] == (0 if "id10001" in dev_speakers else 1)
    assert short not in {u.id for u in splits["train"]}
    assert prepare_real(root, _options())[1] == trials  # deterministic


def test_wrong_voxceleb1_layouts_give_one_line_errors(tmp_path):
    root = make_voxceleb1(tmp_path)
    with pytest.raises(DataError, match=r"veri_test2.txt: expected the verification trial list .* of the VoxCeleb1 "
                                        r"layout, not found; found in .*: veri_test.txt, wav"):
        prepare_real(root, _options(trial_list="veri_test2.txt"))
    (root / "veri_test.txt").write_text("1 id10270/aaaaaaaaaaa/00001.wav\n")
    with pytest.raises(DataError, match=r"veri_test.txt:1: expected '<1\|0> <enroll> <test>'"):
        prepare_real(root, _options())
    (root / "veri_test.txt").write_text("1 id10270/a/1.wav id10270/a/2.wav\n0 id10270/a/1.wav id10271/a/1.wav\n")
    with pytest.raises(DataError, match=r"id10270/a: expected the video folder listed in veri_test.txt "
                                        r"\(3 of 3 listed files missing\)"):
        prepare_real(root, _options())
    with pytest.raises(DataError, match="needs --data-root"):
        prepare(dataclasses.replace(RunConfig(task="asv").data, corpus="real"), _options())
    with pytest.raises(DataError, match="need more than task_options.dev_speakers"):
        prepare_real(make_voxceleb1(tmp_path / "again"), _options(dev_speakers=8))


def test_build_trials_is_balanced_and_distinct():
    rng = np.random.default_rng(0)
    by_speaker = {s: [f"{s}-{k}" for k in range(4)] for s in "abcd"}
    trials = build_trials(by_speaker, 40, rng)
    assert sum(lab for lab, _, _ in trials) == 20 and len(trials) == 40
    assert len({(min(a, b), max(a, b)) for _, a, b in trials}) == 40
    assert len(build_trials(by_speaker, 1000, rng)) == 24 + 96  # every target pair, every nontarget pair


def test_xvector_head_pads_short_utterances_and_is_exact_per_utterance():
    torch.manual_seed(0)
    options = ASVOptions(input_dim=12, agg_dim=20, embedding_dim=6)
    head = XVectorHead(5, 3, options).eval()
    x, lengths = torch.randn(3, 30, 5), torch.tensor([30, 18, 4])  # 4 frames < the 15-frame TDNN context
    out = head(x, lengths)
    assert out.embedding.shape == (3, 6) and out.cosine is None and torch.isfinite(out.embedding).all()
    for b, n in enumerate(lengths.tolist()):
        alone = head(x[b: b + 1, :n], torch.tensor([n])).embedding
        torch.testing.assert_close(out.embedding[b: b + 1], alone, atol=1e-5, rtol=1e-5)
    trained = head.train()(x, lengths)
    assert trained.cosine.shape == (3, 3) and (trained.cosine.abs() <= 1 + 1e-6).all()
    assert (trained.scale, trained.margin) == (30.0, 0.4)


def test_am_softmax_loss_by_hand():
    cosine = torch.tensor([[0.8, 0.1, -0.2], [0.3, 0.5, 0.0]])
    target = torch.tensor([0, 1])
    s, m = 30.0, 0.4
    expected = []
    for row, y in zip(cosine.tolist(), target.tolist(), strict=True):
        logits = [s * (c - m) if j == y else s * c for j, c in enumerate(row)]
        expected.append(-(logits[y] - math.log(sum(math.exp(v) for v in logits))))
    assert am_softmax_loss(cosine, target, s, m).item() == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert am_softmax_loss(cosine, target, s, 0.0) < am_softmax_loss(cosine, target, s, m)


def test_scoring_uses_cosine_of_the_trial_pairs():
    utts = [Utterance(f"u{k}", f"u{k}.wav", 1.0, "s", "test") for k in range(4)]
    trials = [(1, "u0", "u1"), (0, "u0", "u2"), (1, "u2", "u3"), (0, "u1", "u3")]
    prepared = PreparedData(Path("."), {"test": utts}, "toy", ASVData(("a",), {"test": trials}))
    refs = references(utts, prepared)
    same = [torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.1]), torch.tensor([0.0, 1.0]), torch.tensor([0.1, 3.0])]
    result = score(same, refs)
    assert result["eer"] == 0.0 and result["min_dcf"] == 0.0 and result["trials"] == 4
    assert result["checkpoint_selection"] == SELECTION_RULE
    flipped = score([same[0], same[2], same[1], same[3]], refs)  # u1 and u2 swapped: every trial wrong
    assert flipped["eer"] == 100.0
    with pytest.raises(DataError, match="missing from the test split"):
        references(utts[:3], prepared)


def test_short_run_on_the_voxceleb1_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEECHBENCH_CACHE", str(tmp_path / "cache"))
    root = make_voxceleb1(tmp_path)
    (result,) = run(RunRequest(upstream="fbank_no_cmvn", task="asv", data_root=str(root), overrides=SMALL_ASV,
                               out_dir=str(tmp_path / "out")))
    assert result["recipe"]["name"] == "superb/asv" and result["data"]["corpus"] == "VoxCeleb1"
    assert (result["metric"], result["unit"], result["higher_is_better"]) == ("eer", "%", False)
    assert 0.0 <= result["value"] <= 100.0 and 0.0 <= result["extra_metrics"]["min_dcf"]
    assert result["extra_metrics"]["checkpoint_selection"] == SELECTION_RULE
    assert result["data"]["checkpoint_selection"] == SELECTION_RULE and result["extra_metrics"]["trials"] == 4
    assert "8 s training crops" not in result["features"]  # no training file is longer than the crop
    run_dir = next((tmp_path / "out" / "fbank_no_cmvn" / "asv").iterdir())
    lines = (run_dir / "scores.txt").read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("1 id10270/aaaaaaaaaaa/00001 id10270/bbbbbbbbbbb/00002 ")
    protocol = result["protocol"]
    assert protocol["checkpoint_selection"] == "dev_trials" and protocol["trials"] == 4 and protocol["eval_every"] == 2
    assert "scored 4 of the 37720 official test items" in protocol["deviations"]
    (superb,) = run(RunRequest(upstream="fbank_no_cmvn", task="asv", data_root=str(root), out_dir=str(tmp_path / "out"),
                               overrides=SMALL_ASV + ("task_options.checkpoint_selection=superb_test",)))
    assert superb["value"] == superb["extra_metrics"]["dev_eer"]  # the reported EER is the best test EER
    assert superb["extra_metrics"]["checkpoint_selection"] == SUPERB_TEST_RULE
    assert superb["protocol"]["checkpoint_selection"] == "superb_test"
    assert not any(d.startswith("checkpoint chosen") for d in superb["protocol"]["deviations"])


def test_short_run_on_the_synthetic_corpus_crops_and_scores_dev_trials(tmp_path, synth_tiny):
    (result,) = run(RunRequest(upstream="fbank_no_cmvn", task="asv", out_dir=str(tmp_path),
                               overrides=("data.profile=tiny", "task_options.max_crop_s=1.5") + SMALL_ASV[:6]))
    assert result["data"]["corpus"] == "synth" and "1.5 s training crops" in result["features"]
    assert result["extra_metrics"]["trials"] == sum(1 for _ in open(synth_tiny / "asv" / "test_trials.txt"))
    assert result["extra_metrics"]["dev_eer"] is not None and 0.0 <= result["value"] <= 100.0


def test_superb_test_selection_trains_on_every_speaker_and_selects_on_the_test_trials(tmp_path):
    root = make_voxceleb1(tmp_path)
    data = dataclasses.replace(RunConfig(task="asv").data, corpus="real", root=str(root))
    prepared = prepare(data, _options(checkpoint_selection="superb_test"))
    assert {u.speaker for u in prepared.splits["train"]} == set(DEV_SPEAKERS)  # nobody held out
    assert [u.id for u in prepared.splits["dev"]] == [u.id for u in prepared.splits["test"]]
    assert {u.split for u in prepared.splits["dev"]} == {"dev"}
    assert prepared.label_space.trials["dev"] == prepared.label_space.trials["test"]
    assert prepared.label_space.selection_rule == SUPERB_TEST_RULE == prepared.info["checkpoint_selection"]
    assert len(references(prepared.splits["dev"], prepared)) == 4
    facts, deviations = get_task("asv").protocol(prepared, _options(checkpoint_selection="superb_test"))
    assert facts["checkpoint_selection"] == "superb_test" and facts["trials"] == 4 and facts["test_official"] == 37720
    assert facts["train_speakers"] == len(set(DEV_SPEAKERS)) and deviations == []
    held_out = prepare(data, _options())
    _, deviations = get_task("asv").protocol(held_out, _options())
    assert len(deviations) == 1 and deviations[0].startswith("checkpoint chosen on dev trials of 2 held-out")
    assert all(u.labels["gain_db"] == -3.0 for u in prepared.splits["train"])  # s3prl's sox gain


def test_training_batches_mix_speakers_and_change_between_epochs():
    """VoxCeleb lists a speaker's utterances together and the 8 s crop makes most durations equal; length buckets
    once kept those together, the same batch every epoch. ASV now draws random batches every epoch, as s3prl."""
    assert not batches_by_length(get_task("asv")) and batches_by_length(get_task("asr"))
    speakers = [s for s in range(40) for _ in range(20)]  # 40 speakers x 20 utterances, in speaker order
    schedule = BatchSchedule([8.0] * len(speakers), batch_size=10, seed=0, max_batch_s=None)
    epochs = [schedule.epoch_batches(e) for e in range(3)]
    mean_speakers = np.mean([len({speakers[i] for i in b}) for b in epochs[0]])
    assert mean_speakers > 8.5  # s3prl's random batches of 10: about 9 distinct speakers (8.9 for 40 x 20)
    assert sorted(i for b in epochs[0] for i in b) == list(range(len(speakers)))
    assert epochs[0] != epochs[1] != epochs[2]


def test_default_initialisation_is_pytorchs_and_he_is_an_option():
    options = ASVOptions(input_dim=12, agg_dim=20, embedding_dim=6)
    torch.manual_seed(0)
    head = XVectorHead(5, 3, options)
    torch.manual_seed(0)
    torch.nn.Linear(5, 12)  # the connector is built first
    first = torch.nn.Conv1d(12, 12, 5)
    assert torch.equal(head.tdnn[0].conv.weight, first.weight) and torch.equal(head.tdnn[0].conv.bias, first.bias)
    he = XVectorHead(5, 3, dataclasses.replace(options, init="he"))
    assert all(torch.count_nonzero(layer.conv.bias) == 0 for layer in he.tdnn)
    assert torch.count_nonzero(he.segment6.bias) == 0 and torch.count_nonzero(head.segment6.bias) > 0


def test_stats_pool_uses_the_unbiased_std_of_the_valid_frames():
    x = torch.randn(2, 3, 10)
    pooled = stats_pool(x, torch.tensor([10, 6]))
    torch.testing.assert_close(pooled[1, 3:], (x[1, :, :6].var(dim=-1) + 1e-6).sqrt())
    torch.testing.assert_close(pooled[0, :3], x[0].mean(dim=-1))
