"""PR: lexicon targets (stressed phones, several files, s3prl's lexicons recognised), the OOV policies, the recorded
phone set and protocol facts, short end-to-end runs."""

import dataclasses

import pytest
import torch
from test_asr import make_librispeech

from speechbench.benchmark.config import RunConfig
from speechbench.benchmark.run import RunRequest, run
from speechbench.common import sha256_file
from speechbench.downstreams import pr
from speechbench.downstreams.data import DataError
from speechbench.downstreams.pr import LinearCTCHead, PROptions, git_blob_id, prepare
from speechbench.downstreams.tasks import get_task
from speechbench.downstreams.text import CMU_PHONES, Vocabulary

SMALL_PR = ("train.max_steps=4", "train.eval_every=2", "train.batch_size=4", "task_options.project_dim=16")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny recurrent/conv heads: one thread is fastest


def _data(root=None):
    return dataclasses.replace(RunConfig(task="pr").data, corpus="real" if root else "synth",
                               root=str(root) if root else None)


def _libri_words(root) -> set[str]:
    return {w for trans in root.rglob("*.trans.txt") for line in trans.read_text().splitlines()
            for w in line.split()[1:]}


def _lexicons(tmp_path, root, missing: str | None = None):
    """Two lexicon files in s3prl's style (word TAB stressed phones): a main one and an 'all others' one that
    holds one more word, ZORKLEMPH, unless it is the ``missing`` word."""
    main, others = tmp_path / "lex-main.txt", tmp_path / "lex-others.txt"
    words = sorted(_libri_words(root) - {"ZORKLEMPH"})
    main.write_text("".join(f"{w}\t{' '.join(CMUDICT[w])}\n" for w in words if w != missing))
    others.write_text("" if missing == "ZORKLEMPH" else "ZORKLEMPH\tZ AO1 R K L EH2 M F\n")
    return main, others


CMUDICT = {"HELLO": ("HH", "AH0", "L", "OW1"), "WORLD": ("W", "ER1", "L", "D"), "THE": ("DH", "AH0"),
           "CAT": ("K", "AE1", "T"), "SAT": ("S", "AE1", "T"), "ON": ("AA1", "N"), "MAT": ("M", "AE1", "T"),
           "DON'T": ("D", "OW1", "N", "T"), "STOP": ("S", "T", "AA1", "P"), "NOW": ("N", "AW1"),
           "IS": ("IH1", "Z"), "HERE": ("HH", "IY1", "R"), "GOOD": ("G", "UH1", "D"),
           "MORNING": ("M", "AO1", "R", "N", "IH0", "NG"), "DOG": ("D", "AO1", "G"), "RAN": ("R", "AE1", "N"),
           "HOME": ("HH", "OW1", "M"), "IT": ("IH1", "T"), "COLD": ("K", "OW1", "L", "D"), "SUN": ("S", "AH1", "N"),
           "UP": ("AH1", "P"), "A": ("AH0",), "RED": ("R", "EH1", "D"), "HAT": ("HH", "AE1", "T")}


def test_superb_pr_stressed_phones_from_the_lexicon_and_every_test_utterance(tmp_path):
    root = make_librispeech(tmp_path)
    main, others = _lexicons(tmp_path, root)
    prepared = prepare(_data(root), PROptions(lexicon=(str(main), str(others))))  # SUPERB: stress kept, no OOV
    assert [len(prepared.splits[s]) for s in ("train", "dev", "test")] == [7, 2, 3]  # nothing dropped
    test = prepared.splits["test"]
    assert [u.labels["phones"] for u in test] == ["DH AH0 K AE1 T R AE1 N", "HH AH0 L OW1 D AO1 G",
                                                  "Z AO1 R K L EH2 M F S AE1 T"]  # ZORKLEMPH from the second file
    symbols = sorted({p for pron in CMUDICT.values() for p in pron} | {"Z", "EH2", "F", "K", "R", "M", "L"})
    vocab = prepared.label_space
    assert list(vocab.symbols) == symbols and vocab.name == f"lexicon-stressed-{len(symbols)}"
    assert prepared.info["phone_set"]["symbols"] == symbols and prepared.info["oov_dropped_test"] == 0
    record = prepared.info["lexicon"]
    assert [f["path"] for f in record["files"]] == [str(main), str(others)] and not record["is_s3prl"]
    assert record["files"][0]["sha256"] == sha256_file(main) and record["files"][1]["git_blob"] == git_blob_id(others)
    facts, deviations = get_task("pr").protocol(prepared, PROptions(lexicon=(str(main), str(others))))
    assert facts["phone_set_size"] == len(symbols) and facts["test_official"] == 2620 and facts["stress"] == "keep"
    assert deviations == [f"lexicon {main.name}, {others.name} is not s3prl's libriphone g2p pair; pronunciations "
                          "(hence targets) differ for some words"]


def test_superb_pr_refuses_a_lexicon_that_misses_a_test_word(tmp_path):
    root = make_librispeech(tmp_path)
    main, others = _lexicons(tmp_path, root, missing="ZORKLEMPH")
    with pytest.raises(DataError) as err:
        prepare(_data(root), PROptions(lexicon=(str(main), str(others))))
    message = str(err.value)
    assert "train: 1 words in 1 utterances (e.g. ZORKLEMPH)" in message
    assert "test: 1 words in 1 utterances (e.g. ZORKLEMPH)" in message
    assert "task_options.lexicon" in message and "task_options.oov=drop" in message and "\n" not in message
    with pytest.raises(DataError, match="words missing from the lexicon cmudict"):
        prepare(_data(root), PROptions())  # the default CMUdict lacks ZORKLEMPH too


def test_s3prl_lexicons_are_recognised_by_their_git_blob_ids(tmp_path, monkeypatch):
    hello = tmp_path / "hello.txt"
    hello.write_text("hello\n")
    assert git_blob_id(hello) == "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object hello.txt`
    root = make_librispeech(tmp_path)
    main, others = _lexicons(tmp_path, root)
    monkeypatch.setattr(pr, "S3PRL_LEXICON_BLOBS", (git_blob_id(main), git_blob_id(others)))
    options = PROptions(lexicon=(str(main), str(others)))
    prepared = prepare(_data(root), options)
    assert prepared.info["lexicon"]["is_s3prl"] and prepared.label_space.name.startswith("s3prl-g2p-stressed-")
    facts, deviations = get_task("pr").protocol(prepared, options)
    assert facts["lexicon_is_s3prl"] and deviations == []
    reversed_order = prepare(_data(root), PROptions(lexicon=(str(others), str(main))))
    assert not reversed_order.info["lexicon"]["is_s3prl"]  # the order decides which pronunciation wins


def test_s3prl_lexicon_files_in_the_librispeech_folder_are_found(tmp_path):
    root = make_librispeech(tmp_path)
    main, others = _lexicons(tmp_path, root)
    for path, name in zip((main, others), pr.S3PRL_LEXICON_FILES, strict=True):
        (root / name).write_bytes(path.read_bytes())
    prepared = prepare(_data(root), PROptions())  # lexicon null: the two files beside the splits
    assert [f["path"] for f in prepared.info["lexicon"]["files"]] == [str(root / n) for n in pr.S3PRL_LEXICON_FILES]
    assert prepared.info["oov_dropped_test"] == 0
    quick = prepare(_data(root), PROptions(lexicon=("cmudict",), stress="strip", oov="drop"))
    assert quick.info["lexicon"]["files"] == [] and quick.info["oov_dropped_test"] == 1


def test_quick_variant_cmudict_unstressed_drops_and_counts_oov(tmp_path):
    root = make_librispeech(tmp_path)
    options = PROptions(stress="strip", oov="drop")
    prepared = prepare(_data(root), options)
    info = prepared.info
    # one train and one test utterance contain ZORKLEMPH, which CMUdict lacks
    assert (info["oov_dropped_train"], info["oov_dropped_dev"], info["oov_dropped_test"]) == (1, 0, 1)
    assert (info["kept_train"], info["kept_dev"], info["kept_test"]) == (6, 2, 2)
    assert info["oov_words_test"] == 1 and "dropped" in info["oov_policy"]
    assert [u.labels["text"] for u in prepared.splits["test"]] == ["THE CAT RAN", "HELLO DOG"]
    first = prepared.splits["train"][0]
    assert first.labels["phones"] == "HH AH L OW W ER L D"  # CMUdict's first pronunciations, stress stripped
    assert info["phone_set"]["name"] == "cmudict-unstressed-39" and info["phone_set"]["symbols"] == list(CMU_PHONES)
    targets = get_task("pr").targets([first], prepared)
    assert prepared.label_space.decode(targets[0].tolist()) == first.labels["phones"].split()
    facts, deviations = get_task("pr").protocol(prepared, options)
    assert facts["oov"] == "drop" and any(d.startswith("phones without stress (39 symbols") for d in deviations)
    assert "1 train utterances with out-of-lexicon words dropped" in deviations


def test_lexicon_errors(tmp_path):
    root = make_librispeech(tmp_path)
    with pytest.raises(DataError, match="expected the lexicon file"):
        prepare(_data(root), PROptions(lexicon=(str(tmp_path / "missing.txt"),)))
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text("HELLO HH AH0 L OW1 Q\n")
    with pytest.raises(DataError, match=r"phones \['Q'\] are not ARPAbet"):
        prepare(_data(root), PROptions(lexicon=(str(lexicon),)))
    with pytest.raises(DataError, match="task_options.stress must be one of keep, strip"):
        prepare(_data(root), PROptions(stress="none"))


def test_linear_ctc_head_shapes():
    head = LinearCTCHead(10, 16, 40)
    out = head(torch.randn(2, 7, 10), torch.tensor([7, 3]))
    assert out.logits.shape == (2, 7, 40) and out.lengths.tolist() == [7, 3]
    with pytest.raises(ValueError, match="needs frames"):
        head(torch.randn(2, 10), None)


def test_short_runs_record_the_protocol_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEECHBENCH_CACHE", str(tmp_path / "cache"))
    root = make_librispeech(tmp_path)
    main, others = _lexicons(tmp_path, root)
    lexicon = f"task_options.lexicon={main},{others}"
    (result,) = run(RunRequest(upstream="fbank_no_cmvn", task="pr", data_root=str(root),
                               overrides=SMALL_PR + (lexicon,), out_dir=str(tmp_path / "out")))
    assert (result["metric"], result["unit"], result["higher_is_better"]) == ("per", "%", False)
    protocol = result["protocol"]
    assert protocol["recipe"] == "superb/pr" and protocol["reproduces"] == "superb"
    assert protocol["phone_set"].startswith("lexicon-stressed-") and protocol["test_scored"] == 3
    assert protocol["lexicon_sha256"] == [sha256_file(main), sha256_file(others)]
    assert not protocol["superb_faithful"] and not protocol["lr_searched"]
    assert "override train.max_steps=4 (recipe superb/pr: 100000)" in protocol["deviations"]
    assert "scored 3 of the 2620 official test items" in protocol["deviations"]
    assert not any("lexicon" in d for d in protocol["deviations"] if d.startswith("override"))  # judged by the task
    run_dir = next((tmp_path / "out" / "fbank_no_cmvn" / "pr").iterdir())
    assert (run_dir / "ref.txt").read_text().splitlines()[0] == "1089-134686-0000 DH AH0 K AE1 T R AE1 N"
    assert len((run_dir / "hyp.txt").read_text().splitlines()) == 3

    (quick,) = run(RunRequest(upstream="fbank_no_cmvn", task="pr", data_root=str(root), recipe="superb/pr_cmudict",
                              overrides=SMALL_PR, out_dir=str(tmp_path / "out")))
    extra = quick["extra_metrics"]
    assert extra["phone_set"] == "cmudict-unstressed-39" and extra["phone_set_size"] == 39
    assert extra["phone_set_sha256"] == Vocabulary("cmudict-unstressed-39", CMU_PHONES).sha256
    assert extra["oov_dropped_test"] == 1 and extra["kept_test"] == 2
    assert quick["protocol"]["deviations"][0].startswith("phones from CMUdict")  # declared by the recipe
    assert "scored 2 of the 2620 official test items" in quick["protocol"]["deviations"]


def test_short_run_on_the_synthetic_corpus_uses_the_synthesiser_phone_set(tmp_path, synth_tiny):
    from speechbench.downstreams.synth.corpus import PHONE_SET

    (result,) = run(RunRequest(upstream="fbank_no_cmvn", task="pr", out_dir=str(tmp_path),
                               overrides=("data.profile=tiny",) + SMALL_PR))
    assert result["data"]["corpus"] == "synth" and result["metric"] == "per" and result["value"] >= 0.0
    assert result["extra_metrics"]["phone_set_size"] == len(PHONE_SET)
    assert result["extra_metrics"]["phone_set"].startswith("espeak-synth")
    assert result["data"]["phone_set"]["symbols"] == list(PHONE_SET)
