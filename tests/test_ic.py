"""IC (Fluent Speech Commands): real-layout preparation, layout errors, the three-slot head and scoring, short runs."""

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import write_noise_wav

from speechbench.benchmark.run import RunRequest, run
from speechbench.downstreams import ic
from speechbench.downstreams.data import DataError, Utterance
from speechbench.downstreams.tasks import PreparedData

# (action, object, location) per training utterance; test holds one object never seen in training
TRAIN_INTENTS = [("activate", "lights", "kitchen"), ("deactivate", "lights", "none"), ("increase", "heat", "none"),
                 ("decrease", "volume", "none"), ("bring", "shoes", "none"), ("activate", "music", "none")]
TEST_INTENTS = [("activate", "lights", "kitchen"), ("bring", "juice", "none")]  # "juice" unseen in training


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_fsc(base: Path) -> Path:
    """A tiny tree in the real Fluent Speech Commands layout (noise instead of speech)."""
    root = base / "fluent_speech_commands_dataset"
    plan = {"train": TRAIN_INTENTS * 2, "valid": TRAIN_INTENTS[:3], "test": TEST_INTENTS}
    k = 0
    for name, intents in plan.items():
        (root / "data").mkdir(parents=True, exist_ok=True)
        with open(root / "data" / f"{name}_data.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["", "path", "speakerId", "transcription", "action", "object", "location"])
            for i, (action, obj, loc) in enumerate(intents):
                spk = f"spk{(i % 2) + (4 if name == 'test' else 0)}"
                rel = f"wavs/speakers/{spk}/{name}-{i:03d}.wav"
                write_noise_wav(root / rel, 0.5 + 0.1 * (i % 3), seed=k, gain=0.05)
                writer.writerow([i, rel, spk, f"{action} the {obj}", action, obj, loc])
                k += 1
    return root


def test_prepare_real_fluent_speech_commands(tmp_path):
    root = make_fsc(tmp_path)
    splits = ic.prepare_real(root)
    assert {s: len(u) for s, u in splits.items()} == {"train": 12, "dev": 3, "test": 2}
    utt = splits["train"][0]
    assert utt.path == "wavs/speakers/spk0/train-000.wav" and utt.speaker == "spk0" and utt.split == "train"
    assert utt.labels == {"action": "activate", "object": "lights", "location": "kitchen",
                          "text": "activate the lights"}
    assert utt.duration_s == pytest.approx(0.5)
    vocab = ic.label_space(splits["train"])
    assert vocab == (("activate", "bring", "deactivate", "decrease", "increase"),
                     ("heat", "lights", "music", "shoes", "volume"), ("kitchen", "none"))
    assert ic.targets(splits["train"][:2], PreparedData(root, splits, "fsc", vocab)).tolist() == [[0, 1, 0],
                                                                                                  [2, 1, 1]]


def test_score_counts_an_utterance_only_when_all_three_slots_are_right():
    refs = [("activate", "lights", "kitchen"), ("bring", "shoes", "none"), ("increase", "heat", "none"),
            ("decrease", "volume", "none")]
    preds = [("activate", "lights", "kitchen"),  # all right
             ("bring", "socks", "none"),  # object wrong
             ("increase", "heat", "kitchen"),  # location wrong
             ("increase", "volume", "bedroom")]  # action and location wrong
    scores = ic.score(preds, refs)
    assert scores["accuracy"] == pytest.approx(25.0)
    assert scores["action_accuracy"] == pytest.approx(75.0)
    assert scores["object_accuracy"] == pytest.approx(75.0)
    assert scores["location_accuracy"] == pytest.approx(50.0)


def test_head_loss_and_predictions_with_an_unseen_test_label():
    vocab = (("activate", "bring"), ("juice", "lights", "shoes"), ("none",))
    head = ic.IntentHead(4, 8, vocab)
    assert head.classifier.out_features == 6  # ONE linear over the concatenated slot logits
    out = head(torch.randn(3, 4))
    assert [t.shape[-1] for t in out.per_slot()] == [2, 3, 1]
    target = torch.tensor([[0, 1, 0], [1, 2, 0], [0, 0, 0]])
    expected = sum(torch.nn.functional.cross_entropy(s, target[:, k]) for k, s in enumerate(out.per_slot()))
    assert ic.loss(out, target).item() == pytest.approx(expected.item())
    logits = torch.tensor([[5.0, 0.0, 0.0, 9.0, 0.0, 1.0]])  # activate, lights, none
    preds = ic.predict(ic.SlotLogits(logits, vocab))
    assert preds == [("activate", "lights", "none")]
    # a reference label the training set never had ("socks") cannot be predicted: wrong, no crash
    assert ic.score(preds, [("activate", "socks", "none")])["accuracy"] == 0.0


def test_pooled_and_frame_inputs_give_the_same_loss_and_gradients():
    torch.manual_seed(0)
    vocab = (("a", "b", "c"), ("x", "y"), ("none", "kitchen"))
    head = ic.IntentHead(5, 7, vocab)
    frames, lengths = torch.randn(4, 9, 5), torch.tensor([9, 4, 7, 1])
    pooled = torch.stack([frames[i, : int(n)].mean(0) for i, n in enumerate(lengths)])
    target = torch.tensor([[0, 1, 0], [2, 0, 1], [1, 1, 1], [0, 0, 0]])
    grads = []
    for x, n in ((frames, lengths), (pooled, None)):
        head.zero_grad()
        value = ic.loss(head(x, n), target)
        value.backward()
        grads.append((value.item(), [p.grad.clone() for p in head.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_wrong_layouts_give_one_line_errors(tmp_path):
    root = make_fsc(tmp_path)
    with pytest.raises(DataError, match=r"missing: expected the corpus folder"):
        ic.prepare_real(tmp_path / "missing")
    (root / "data" / "valid_data.csv").rename(root / "data" / "dev.csv")
    with pytest.raises(DataError, match=r"valid_data.csv: expected valid_data.csv of the fluent_speech_commands_"
                                        r"dataset layout, not found; found in .*data: dev.csv, test_data.csv"):
        ic.prepare_real(root)
    (root / "data" / "dev.csv").rename(root / "data" / "valid_data.csv")
    text = (root / "data" / "test_data.csv").read_text().replace("location", "place", 1)
    (root / "data" / "test_data.csv").write_text(text)
    with pytest.raises(DataError, match=r"test_data.csv: expected columns .* missing location; found <unnamed>, "
                                        r"path, speakerId, transcription, action, object, place"):
        ic.prepare_real(root)
    (root / "data" / "test_data.csv").write_text(text.replace("place", "location", 1))
    (root / "wavs" / "speakers" / "spk4" / "test-000.wav").unlink()
    with pytest.raises(DataError, match=r"spk4/test-000.wav: audio file not found \(listed in .*test_data.csv\)"):
        ic.prepare_real(root)
    (root / "data").rename(root / "csv")
    with pytest.raises(DataError, match=r"data: expected the data/ folder with the split csv files .* found in "
                                        r".*: csv, wavs") as err:
        ic.prepare_real(root)
    assert "\n" not in str(err.value)


def test_short_run_on_the_real_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEECHBENCH_CACHE", str(tmp_path / "cache"))
    root = make_fsc(tmp_path)
    (row,) = run(RunRequest(upstream="fbank_no_cmvn", task="ic", data_root=str(root), out_dir=str(tmp_path / "out"),
                            overrides=("train.max_steps=20", "train.eval_every=10")))
    assert row["recipe"]["name"] == "superb/ic" and row["data"]["corpus"] == "fluent_speech_commands_dataset"
    assert row["metric"] == "accuracy" and row["steps"] == 20 and 0.0 <= row["value"] <= 50.0  # "juice" is unseen
    assert {"action_accuracy", "object_accuracy", "location_accuracy", "dev_accuracy"} <= set(row["extra_metrics"])
    run_dir = next((tmp_path / "out" / "fbank_no_cmvn" / "ic").iterdir())
    lines = (run_dir / "predictions.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["id", "action", "object", "location", "ref_action", "ref_object",
                                    "ref_location", "correct"]
    assert len(lines) == 3 and lines[2].split("\t")[5] == "juice" and lines[2].endswith("\t0")
    assert not (root / "manifests").exists()  # nothing written into the corpus


def test_synthetic_corpus_run(tmp_path, synth_tiny):
    (row,) = run(RunRequest(upstream="fbank_no_cmvn", task="ic", out_dir=str(tmp_path),
                            overrides=("data.profile=tiny", "train.max_steps=20", "train.eval_every=10")))
    assert row["data"]["corpus"] == "synth" and row["recipe"]["name"] == "synth/ic"
    manifests = tmp_path / "fbank_no_cmvn" / "ic"
    run_dir = next(manifests.iterdir())
    train = [json.loads(line) for line in (run_dir / "manifests" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (run_dir / "manifests" / "test.jsonl").read_text().splitlines()]
    assert {"action", "object", "location", "text"} <= set(train[0])
    assert not {r["speaker"] for r in train} & {r["speaker"] for r in test}  # unseen test speakers


def test_utterance_roundtrip_keeps_slot_labels():
    u = Utterance("x", "a.wav", 1.0, "s", "train", {"action": "bring", "object": "juice", "location": "none"})
    assert ic.references([u], None) == [("bring", "juice", "none")]
