"""Per-item test outcomes: every task's ``item_scores`` hook, hand-checked, and the file the leaderboard reads back.

For each kind, the items must reproduce the task's own corpus-level score (summing edits and reference lengths, or
the EER of the trial scores), so that a bootstrap on them resamples the very number in ``result.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from speechbench.downstreams import asr, asv, ic, pr
from speechbench.downstreams.data import Utterance
from speechbench.downstreams.tasks import (
    PreparedData,
    correct_items,
    edit_items,
    list_tasks,
    write_items,
)
from speechbench.leaderboard.items import ItemsError, read_items


def utterances(n: int, speakers: list[str] | None = None) -> list[Utterance]:
    return [Utterance(f"u{k}", f"u{k}.wav", 1.0, speakers[k] if speakers else "s", "test") for k in range(n)]


def test_every_builtin_task_has_an_item_hook():
    assert {t.name for t in list_tasks() if t.item_scores is not None} == {"asr", "asv", "er", "ic", "ks", "pr", "sid"}


def test_correct_items_compare_labels_and_structured_labels():
    assert correct_items(["yes", "no", "up"], ["yes", "up", "up"], utterances(3)) == [
        {"id": "u0", "correct": 1}, {"id": "u1", "correct": 0}, {"id": "u2", "correct": 1}]
    # IC: all three slots must be right; a list prediction equals a tuple reference
    preds = [("activate", "lights", "kitchen"), ["activate", "lights", "none"]]
    refs = [["activate", "lights", "kitchen"], ("activate", "lights", "kitchen")]
    assert [i["correct"] for i in ic.TASK.item_scores(preds, refs, utterances(2))] == [1, 0]
    assert ic.score(preds, refs)["accuracy"] == 50.0


def test_edit_items_hand_value():
    # "A B C" -> "A X C D": one substitution and one insertion over 3 reference tokens
    assert edit_items([["A", "X", "C", "D"]], [["A", "B", "C"]], utterances(1)) == [{"id": "u0", "edits": 2,
                                                                                      "ref_len": 3}]


def test_asr_and_pr_items_sum_to_the_corpus_level_rates():
    rng = np.random.default_rng(0)
    words = ["ALPHA", "BETA", "GAMMA", "DELTA", "EPS"]
    refs = [" ".join(rng.choice(words, rng.integers(1, 8))) for _ in range(30)]
    hyps = [" ".join(w for w in r.split() if rng.random() > 0.2) + (" EPS" if rng.random() < 0.3 else "")
            for r in refs]
    hyps[0] = ""  # an empty hypothesis: one deletion per reference word
    items = asr.TASK.item_scores(hyps, refs, utterances(30))
    wer = 100.0 * sum(i["edits"] for i in items) / sum(i["ref_len"] for i in items)
    assert wer == pytest.approx(asr.score(hyps, refs)["wer"])  # jiwer's corpus-level WER
    assert items[0]["edits"] == items[0]["ref_len"] == len(refs[0].split())
    phones_ref = [r.split() for r in refs]
    phones_hyp = [h.split() for h in hyps]
    items = pr.TASK.item_scores(phones_hyp, phones_ref, utterances(30))
    per = 100.0 * sum(i["edits"] for i in items) / sum(i["ref_len"] for i in items)
    assert per == pytest.approx(pr.score(phones_hyp, phones_ref)["per"])


def test_asv_items_keep_both_speakers_and_reproduce_the_eer():
    utts = utterances(6, ["a", "a", "b", "b", "c", "c"])
    trials = [(1, "u0", "u1"), (0, "u0", "u2"), (1, "u2", "u3"), (0, "u2", "u4"), (1, "u4", "u5"), (0, "u5", "u1")]
    prepared = PreparedData(Path("."), {"test": utts}, "toy", asv.ASVData(("x",), {"test": trials}))
    refs = asv.references(utts, prepared)
    embeddings = [torch.randn(8, generator=torch.Generator().manual_seed(k)) for k in range(6)]
    items = asv.TASK.item_scores(embeddings, refs, utts)
    assert [(i["id"], i["label"], i["enroll_speaker"], i["test_speaker"]) for i in items[:2]] == [
        ("u0 u1", 1, "a", "a"), ("u0 u2", 0, "a", "b")]
    assert items[5]["enroll_speaker"] == "c" and items[5]["test_speaker"] == "a"
    assert [i["score"] for i in items] == pytest.approx(asv.trial_scores(embeddings, refs).tolist())


def test_written_items_read_back_with_the_same_metric(tmp_path):
    items = correct_items(["a", "b", "a", "a"], ["a", "a", "a", "b"], utterances(4))
    record = write_items(tmp_path / "run" / "items.jsonl", items)
    assert record["file"] == "items.jsonl" and record["count"] == 4 and len(record["ids_sha256"]) == 64
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["items.jsonl"]  # no temporary file left
    back = read_items(tmp_path / "run" / "result.json")
    assert back.kind == "accuracy" and back.metric() == 50.0 and back.ids.tolist() == ["u0", "u1", "u2", "u3"]


def test_unusable_items_files_are_one_line_errors(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ItemsError, match="no per-item scores .* 'bench rerun "):
        read_items(run / "result.json")
    run.mkdir()
    (run / "items.jsonl").write_text(json.dumps({"id": "a", "correct": 1}) + "\n{oops\n")
    with pytest.raises(ItemsError, match=r"items.jsonl:2: invalid JSON"):
        read_items(run / "result.json")
    (run / "items.jsonl").write_text(json.dumps({"id": "a", "guess": 1}) + "\n")
    with pytest.raises(ItemsError, match="found keys \\['guess', 'id'\\]"):
        read_items(run / "result.json")
