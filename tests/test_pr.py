"""PR: lexicon targets, OOV dropping and counting, the recorded phone set, short end-to-end runs."""

import dataclasses

import pytest
import torch
from test_asr import make_librispeech

from speechbench.benchmark.config import RunConfig
from speechbench.benchmark.run import RunRequest, run
from speechbench.downstreams.data import DataError
from speechbench.downstreams.pr import LinearCTCHead, PROptions, prepare
from speechbench.downstreams.tasks import get_task
from speechbench.downstreams.text import CMU_PHONES, Vocabulary

SMALL_PR = ("train.max_steps=4", "train.eval_every=2", "train.batch_size=4", "task_options.project_dim=16")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny recurrent/conv heads: one thread is fastest


def _data(root=None):
    return dataclasses.replace(RunConfig(task="pr").data, corpus="real" if root else "synth",
                               root=str(root) if root else None)


def test_cmudict_targets_and_oov_utterances_dropped_and_counted(tmp_path):
    root = make_librispeech(tmp_path)
    prepared = prepare(_data(root), PROptions())
    info = prepared.info
    # one train and one test utterance contain ZORKLEMPH, which CMUdict lacks
    assert (info["oov_dropped_train"], info["oov_dropped_dev"], info["oov_dropped_test"]) == (1, 0, 1)
    assert (info["kept_train"], info["kept_dev"], info["kept_test"]) == (6, 2, 2)
    assert info["oov_words_test"] == 1 and "dropped" in info["oov_policy"]
    assert [u.labels["text"] for u in prepared.splits["test"]] == ["THE CAT RAN", "HELLO DOG"]
    first = prepared.splits["train"][0]
    assert first.labels["phones"] == "HH AH L OW W ER L D"  # CMUdict's first pronunciations, stress stripped
    assert info["phone_set"]["name"] == "cmu-arpabet-39" and info["phone_set"]["symbols"] == list(CMU_PHONES)
    targets = get_task("pr").targets([first], prepared)
    assert prepared.label_space.decode(targets[0].tolist()) == first.labels["phones"].split()


def test_lexicon_file_option_and_its_errors(tmp_path):
    root = make_librispeech(tmp_path)
    lexicon = tmp_path / "lexicon.txt"
    words = {w for line in (root / "test-clean" / "1089" / "134686" / "1089-134686.trans.txt").read_text().splitlines()
             for w in line.split()[1:]}
    lexicon.write_text("".join(f"{w} AH0 B\n" for w in sorted(words | {"HELLO", "WORLD"})))
    prepared = prepare(_data(root), PROptions(lexicon=str(lexicon), train_splits=("test-clean",),
                                              dev_split="test-clean"))
    assert prepared.info["oov_dropped_test"] == 0 and prepared.info["lexicon"] == str(lexicon)
    assert prepared.splits["test"][2].labels["phones"] == "AH B AH B"
    with pytest.raises(DataError, match="expected the lexicon file"):
        prepare(_data(root), PROptions(lexicon=str(tmp_path / "missing.txt")))
    lexicon.write_text("HELLO HH AH0 L OW1 Q\n")
    with pytest.raises(DataError, match=r"phones \['Q'\] outside the cmu-arpabet-39 phone set"):
        prepare(_data(root), PROptions(lexicon=str(lexicon)))


def test_linear_ctc_head_shapes():
    head = LinearCTCHead(10, 16, 40)
    out = head(torch.randn(2, 7, 10), torch.tensor([7, 3]))
    assert out.logits.shape == (2, 7, 40) and out.lengths.tolist() == [7, 3]
    with pytest.raises(ValueError, match="needs frames"):
        head(torch.randn(2, 10), None)


def test_short_run_records_phone_set_and_oov_counts(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEECHBENCH_CACHE", str(tmp_path / "cache"))
    root = make_librispeech(tmp_path)
    (result,) = run(RunRequest(upstream="fbank_no_cmvn", task="pr", data_root=str(root), overrides=SMALL_PR,
                               out_dir=str(tmp_path / "out")))
    assert (result["metric"], result["unit"], result["higher_is_better"]) == ("per", "%", False)
    extra = result["extra_metrics"]
    assert extra["phone_set"] == "cmu-arpabet-39" and extra["phone_set_size"] == 39
    assert extra["phone_set_sha256"] == Vocabulary("cmu-arpabet-39", CMU_PHONES).sha256
    assert extra["oov_dropped_test"] == 1 and extra["kept_test"] == 2
    assert result["data"]["phone_set"]["sha256"] == extra["phone_set_sha256"]
    run_dir = next((tmp_path / "out" / "fbank_no_cmvn" / "pr").iterdir())
    assert (run_dir / "ref.txt").read_text().splitlines()[0] == "1089-134686-0000 DH AH K AE T R AE N"
    assert len((run_dir / "hyp.txt").read_text().splitlines()) == 2


def test_short_run_on_the_synthetic_corpus_uses_the_synthesiser_phone_set(tmp_path, synth_tiny):
    from speechbench.downstreams.synth.corpus import PHONE_SET

    (result,) = run(RunRequest(upstream="fbank_no_cmvn", task="pr", out_dir=str(tmp_path),
                               overrides=("data.profile=tiny",) + SMALL_PR))
    assert result["data"]["corpus"] == "synth" and result["metric"] == "per" and result["value"] >= 0.0
    assert result["extra_metrics"]["phone_set_size"] == len(PHONE_SET)
    assert result["extra_metrics"]["phone_set"].startswith("espeak-synth")
    assert result["data"]["phone_set"]["symbols"] == list(PHONE_SET)
