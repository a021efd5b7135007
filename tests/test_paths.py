"""Relative paths: every data root and path option is resolved once, where the config is built; a run's manifests
record their audio root, so they can be used on their own (``bench extract --data .../manifests/test.jsonl``)."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
from test_asr import make_librispeech
from test_asv import make_voxceleb1 as make_asv_voxceleb1
from test_er import make_iemocap
from test_ic import make_fsc
from test_ks import make_speech_commands
from test_sid import make_voxceleb1 as make_sid_voxceleb1

from speechbench.benchmark.cli import main
from speechbench.benchmark.run import RunRequest, resolve_config, run
from speechbench.common import PATH_OPTION
from speechbench.downstreams.data import Utterance, read_manifest, resolve_audio_path, write_manifest
from speechbench.downstreams.tasks import get_task, list_tasks

ASV_SMALL = ("task_options.dev_speakers=2", "task_options.dev_utterances_per_speaker=3", "task_options.dev_trials=12")
# task -> (builds the real layout under a folder and returns the corpus root, overrides)
LAYOUTS = {
    "ks": (lambda base: make_speech_commands(base)[0], ()),
    "ic": (make_fsc, ()),
    "sid": (make_sid_voxceleb1, ()),
    "er": (make_iemocap, ()),
    "asr": (make_librispeech, ()),
    "pr": (make_librispeech, ("task_options.oov=drop",)),  # the fixture has a word no lexicon knows
    "asv": (make_asv_voxceleb1, ASV_SMALL),
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(task: str, data_root: str | None, *overrides: str):
    return resolve_config(RunRequest(upstream="fbank_no_cmvn", task=task, data_root=data_root, overrides=overrides),
                          get_task(task))


def _absolute_manifests(task: str, data_root: str, overrides) -> dict[str, list[dict]]:
    """Prepare the task through the runner's config and return its rows with absolute audio paths."""
    cfg = _config(task, data_root, *overrides)
    prepared = get_task(task).prepare(cfg.data, cfg.task_options)
    return {split: [{**u.to_row(), "path": str(resolve_audio_path(u, prepared.audio_root))} for u in utts]
            for split, utts in prepared.splits.items()}


def test_every_task_lists_its_path_options():
    marked = {t.name: sorted(f.name for f in dataclasses.fields(t.options_cls) if PATH_OPTION in f.metadata)
              for t in list_tasks()}
    assert marked == {"asr": [], "asv": ["trial_list"], "er": [], "ic": [], "ks": ["test_root"], "pr": ["lexicon"],
                      "sid": ["split_file"]}


def test_path_options_are_resolved_once_where_the_config_is_built(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ks = _config("ks", "corpora/sc", "task_options.test_root=corpora/../corpora/test")
    assert ks.data.root == str(tmp_path / "corpora" / "sc") and ks.data.corpus == "real"
    assert ks.task_options.test_root == str(tmp_path / "corpora" / "test")
    assert _config("sid", "vox", "task_options.split_file=lists/iden.txt").task_options.split_file == \
        str(tmp_path / "lists" / "iden.txt")
    assert _config("pr", "libri", "task_options.lexicon=lex.txt,more/lex2.txt").task_options.lexicon == \
        (str(tmp_path / "lex.txt"), str(tmp_path / "more" / "lex2.txt"))
    assert _config("pr", "libri", "task_options.lexicon=cmudict").task_options.lexicon == ("cmudict",)  # a keyword
    # the ASV trial list is relative to the data root, not to the working directory
    assert _config("asv", "vox").task_options.trial_list == str(tmp_path / "vox" / "veri_test.txt")
    assert _config("asv", "vox", "task_options.trial_list=lists/v2.txt").task_options.trial_list == \
        str(tmp_path / "vox" / "lists" / "v2.txt")
    assert _config("asv", "vox", "task_options.trial_list=/elsewhere/v2.txt").task_options.trial_list == \
        "/elsewhere/v2.txt"
    # the synthetic corpus has no data root: nothing to resolve, and its run ids stay what they were
    synth = _config("asv", None)
    assert synth.data.root is None and synth.task_options.trial_list == "veri_test.txt"
    # one run id whatever the working directory and the spelling of the root
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    again = _config("ks", "../corpora/sc", f"task_options.test_root={tmp_path / 'corpora' / 'test'}")
    assert again == ks


@pytest.mark.parametrize("task", sorted(LAYOUTS))
def test_relative_data_root_from_another_directory_gives_the_same_manifests(task, tmp_path, monkeypatch):
    make, overrides = LAYOUTS[task]
    root = make(tmp_path / "corpora")
    absolute = _absolute_manifests(task, str(root), overrides)
    work = tmp_path / "work" / "deeper"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    relative = _absolute_manifests(task, os.path.relpath(root, work), overrides)
    assert relative == absolute
    paths = [Path(row["path"]) for rows in relative.values() for row in rows]
    assert paths and all(p.is_absolute() and p.is_file() for p in paths)


def test_ks_with_a_relative_root_and_test_root_reads_its_official_test_set(tmp_path, monkeypatch):
    """The reported failure: the official test set's paths were relative to the working directory, then joined to
    the training corpus root a second time."""
    root, test_root = make_speech_commands(tmp_path / "rep")
    monkeypatch.chdir(tmp_path)
    cfg = _config("ks", "rep/speech_commands_v0.01", "task_options.test_root=rep/speech_commands_test_set_v0.01")
    prepared = get_task("ks").prepare(cfg.data, cfg.task_options)
    test_paths = [resolve_audio_path(u, prepared.audio_root) for u in prepared.splits["test"]]
    assert all(p.is_file() and p.is_relative_to(test_root) for p in test_paths) and len(test_paths) == 12
    assert prepared.info["root"] == str(root) and prepared.info["test_root"] == str(test_root)


def test_manifest_rows_record_their_audio_root_and_old_manifests_stay_readable(tmp_path):
    utts = [Utterance("a", "wavs/a.wav", 1.0, "s1", "train", {"keyword": "yes"}),
            Utterance("b", "/abs/b.wav", 1.0, "s1", "train", {"keyword": "no", "offset_s": 2.0})]
    write_manifest(tmp_path / "new.jsonl", utts, tmp_path / "corpus")
    rows = [json.loads(line) for line in (tmp_path / "new.jsonl").read_text().splitlines()]
    assert list(rows[0])[:3] == ["id", "path", "audio_root"] and rows[0]["audio_root"] == str(tmp_path / "corpus")
    read = read_manifest(tmp_path / "new.jsonl")
    assert [u.path for u in read] == [str(tmp_path / "corpus" / "wavs" / "a.wav"), "/abs/b.wav"]
    assert [u.labels for u in read] == [u.labels for u in utts]  # audio_root is not a label
    assert [u.path for u in read_manifest(tmp_path / "new.jsonl", row_roots=False)] == ["wavs/a.wav", "/abs/b.wav"]
    write_manifest(tmp_path / "old.jsonl", utts)  # no audio root: the rows as before
    assert read_manifest(tmp_path / "old.jsonl") == utts
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "path": "a.wav", "audio_root": "rel", "duration_s": 1, '
                                        '"speaker": "s", "split": "train"}\n')
    with pytest.raises(Exception, match=r"bad.jsonl:1: audio_root must be an absolute path"):
        read_manifest(tmp_path / "bad.jsonl")


def test_extract_from_a_finished_runs_manifest_with_no_other_option(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPEECHBENCH_CACHE", str(tmp_path / "cache"))
    root = make_fsc(tmp_path / "corpora")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    (row,) = run(RunRequest(upstream="fbank_no_cmvn", task="ic", data_root="../corpora/fluent_speech_commands_dataset",
                            out_dir="results", overrides=("train.max_steps=2", "train.eval_every=2")))
    assert row["data"]["root"] == str(root) and row["data"]["audio_roots"] == {s: str(root)
                                                                               for s in ("train", "dev", "test")}
    manifest = next(Path("results").rglob("manifests/test.jsonl")).absolute()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["extract", "--upstream", "fbank_no_cmvn", "--data", str(manifest), "--out", "feats"]) == 0
    assert capsys.readouterr().out.startswith("extracted 2 utterances")
    index = [json.loads(line) for line in (elsewhere / "feats" / "index.jsonl").read_text().splitlines()]
    assert [r["id"] for r in index] == [u.id for u in read_manifest(manifest)]
