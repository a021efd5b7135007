"""Hand-computed checks of the sequence and verification metrics, CTC decoding and the token inventories."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from speechbench.downstreams.ctc import CTCOutput, ctc_loss, greedy_collapse, greedy_decode
from speechbench.downstreams.metrics import (
    equal_error_rate_percent,
    min_dcf,
    token_error_rate_percent,
    word_error_rate_percent,
)
from speechbench.downstreams.text import (
    CHAR_VOCAB,
    CMU_PHONES,
    Vocabulary,
    chars_to_text,
    lexicon_phones,
    pronounce,
    read_lexicon,
    strip_stress,
    text_to_chars,
)


def test_wer_is_corpus_level_total_edits_over_total_reference_words():
    refs = ["THE CAT SAT", "ON THE MAT", "HELLO"]
    hyps = ["THE BAT SAT DOWN", "ON MAT", "HELLO"]
    # utterance 1: 1 substitution + 1 insertion; utterance 2: 1 deletion; utterance 3: 0 -> 3 edits / 7 words
    assert word_error_rate_percent(hyps, refs) == pytest.approx(100 * 3 / 7)
    # not the mean of per-utterance WERs (2/3, 1/3, 0 -> 33.3 %)
    assert word_error_rate_percent(hyps, refs) != pytest.approx(100 * (2 / 3 + 1 / 3 + 0) / 3)
    assert word_error_rate_percent(["", "", ""], refs) == 100.0  # the trivial (empty) output
    assert word_error_rate_percent(refs, refs) == 0.0
    with pytest.raises(ValueError, match="no words"):
        word_error_rate_percent(["A", "B"], ["A", " "])


def test_per_counts_phone_edits_over_reference_phones():
    refs = [["HH", "AH", "L", "OW"], ["W", "ER", "L", "D"]]
    hyps = [["HH", "L", "OW", "OW"], ["W", "ER", "L", "D"]]
    # HH AH L OW -> HH L OW OW: delete AH, insert OW = 2 edits; 2 / 8 phones
    assert token_error_rate_percent(hyps, refs) == pytest.approx(25.0)
    assert token_error_rate_percent([[], []], refs) == 100.0
    # multi-character symbols are single tokens, not strings of letters
    assert token_error_rate_percent([["dʒ"]], [["d"]]) == 100.0


def test_greedy_ctc_collapses_repeats_then_drops_blanks():
    assert greedy_collapse([0, 3, 3, 0, 3, 5, 5, 0]) == [3, 3, 5]
    assert greedy_collapse([1, 1, 1]) == [1]
    assert greedy_collapse([0, 0, 0]) == []
    assert greedy_collapse([2, 0, 2, 2, 0, 0, 4]) == [2, 2, 4]
    frames = [[0, 1, 1, 0, 2, 9], [3, 3, 0, 3, 9, 9]]  # last frames are padding beyond the lengths
    logits = torch.nn.functional.one_hot(torch.tensor(frames), 10).float()
    assert greedy_decode(CTCOutput(logits, torch.tensor([5, 4]))) == [[1, 2], [3, 3]]


def test_ctc_loss_prefers_the_right_alignment_and_survives_impossible_ones():
    target = [torch.tensor([1, 2])]
    good = torch.nn.functional.one_hot(torch.tensor([[1, 0, 2, 0]]), 3).float() * 10
    bad = torch.nn.functional.one_hot(torch.tensor([[2, 0, 1, 0]]), 3).float() * 10
    lengths = torch.tensor([4])
    assert ctc_loss(CTCOutput(good, lengths), target) < 0.01 < ctc_loss(CTCOutput(bad, lengths), target)
    too_short = ctc_loss(CTCOutput(good[:, :1], torch.tensor([1])), target)  # 2 labels in 1 frame
    assert torch.isfinite(too_short) and too_short == 0.0


def test_character_and_phone_inventories():
    assert len(CHAR_VOCAB) == 29 and CHAR_VOCAB.encode(["|"]) == [1]  # blank 0, then the boundary
    chars = text_to_chars("don't  stop")
    assert chars == list("DON'T|STOP")
    assert chars_to_text(CHAR_VOCAB.decode(CHAR_VOCAB.encode(chars))) == "DON'T STOP"
    assert chars_to_text(list("|AB||C|")) == "AB C"
    with pytest.raises(KeyError, match="'1'"):
        CHAR_VOCAB.encode(["1"])
    assert len(CMU_PHONES) == 39 and strip_stress("AH0") == "AH" and strip_stress("NG") == "NG"
    a, b = Vocabulary("x", ("A", "B")), Vocabulary("y", ("B", "A"))
    assert a.sha256 != b.sha256 and a.record()["size"] == 2  # order matters: the output layer's meaning


def test_lexicon_file_and_pronunciation(tmp_path):
    path = tmp_path / "lex.txt"
    path.write_text(";;; comment\nHELLO  HH AH0 L OW1\nHELLO(1)  HH EH0 L OW1\nhello  X\nWORLD\tW ER1 L D\n")
    assert read_lexicon(path) == {"HELLO": ("HH", "AH0", "L", "OW1"), "WORLD": ("W", "ER1", "L", "D")}
    assert lexicon_phones(read_lexicon(path)) == ("AH0", "D", "ER1", "HH", "L", "OW1", "W")
    lexicon = read_lexicon(path, stress=False)
    assert lexicon == {"HELLO": ("HH", "AH", "L", "OW"), "WORLD": ("W", "ER", "L", "D")}
    other = tmp_path / "other.txt"  # several files: the first file that has a word gives its pronunciation
    other.write_text("WORLD W AO1 L D\nZORK Z AO1 R K\n")
    both = read_lexicon([path, other])
    assert both["WORLD"] == ("W", "ER1", "L", "D") and both["ZORK"] == ("Z", "AO1", "R", "K")
    assert read_lexicon([other, path])["WORLD"] == ("W", "AO1", "L", "D")
    assert pronounce("hello world", lexicon) == (["HH", "AH", "L", "OW", "W", "ER", "L", "D"], [])
    assert pronounce("HELLO ZORK", lexicon) == (None, ["ZORK"])


def _direct_eer(labels, scores):
    """EER straight from the ROC curve: the crossing of FAR(t) and FRR(t) between adjacent ROC points."""
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    fnr = 1 - tpr
    for k in range(1, len(fpr)):
        if fnr[k] <= fpr[k]:
            x0, x1, y0, y1 = fpr[k - 1], fpr[k], fnr[k - 1], fnr[k]
            # solve x0 + t (x1 - x0) = y0 + t (y1 - y0)
            t = (y0 - x0) / ((x1 - x0) - (y1 - y0))
            return 100 * (x0 + t * (x1 - x0))
    raise AssertionError("no crossing")


def test_eer_separable_and_overlapping():
    labels = [1, 1, 1, 0, 0, 0]
    assert equal_error_rate_percent(labels, [0.9, 0.8, 0.7, 0.3, 0.2, 0.1]) == 0.0
    assert equal_error_rate_percent(labels, [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]) == 100.0
    # overlap: targets 0.9 0.8 0.4, nontargets 0.7 0.3 0.2. Accepting >= 0.7 gives 1 false accept (1/3) and 1 false
    # reject (0.4, 1/3): FAR = FRR = 1/3 exactly
    overlapping = [0.9, 0.8, 0.4, 0.7, 0.3, 0.2]
    assert equal_error_rate_percent(labels, overlapping) == pytest.approx(100 / 3)
    assert equal_error_rate_percent(labels, overlapping) == pytest.approx(_direct_eer(labels, overlapping))
    # a crossing between ROC points: 2 targets, 3 nontargets. Accepting >= 0.8: FAR 1/3, FRR 1/2; >= 0.7: FAR 1/3,
    # FRR 0. No threshold has FAR = FRR; on the ROC segment between them FAR stays 1/3 and FRR passes 1/3 -> 33.3 %
    labels2, scores2 = [1, 0, 1, 0, 0], [0.9, 0.8, 0.7, 0.6, 0.5]
    assert equal_error_rate_percent(labels2, scores2) == pytest.approx(100 / 3)
    assert equal_error_rate_percent(labels2, scores2) == pytest.approx(_direct_eer(labels2, scores2))
    rng = np.random.default_rng(0)
    labels3 = rng.integers(0, 2, 400)
    scores3 = rng.normal(labels3 * 1.0, 1.0)
    assert equal_error_rate_percent(labels3, scores3) == pytest.approx(_direct_eer(labels3, scores3))
    assert 20 < equal_error_rate_percent(labels3, scores3) < 40  # d' = 1: EER = Phi(-0.5) ~ 31 %
    with pytest.raises(ValueError, match="both target"):
        equal_error_rate_percent([1, 1], [0.1, 0.2])


def test_min_dcf_on_a_toy_set():
    labels = [1, 1, 1, 0, 0, 0]
    scores = [0.9, 0.8, 0.4, 0.7, 0.3, 0.2]
    # normalised DCF(t) = P_miss + 99 P_fa (p_target 0.01): best at accepting >= 0.8 -> P_miss 1/3, P_fa 0
    assert min_dcf(labels, scores) == pytest.approx(1 / 3)
    assert min_dcf(labels, [0.9, 0.8, 0.7, 0.3, 0.2, 0.1]) == 0.0
    # with p_target 0.5 the normaliser is 0.5 and DCF = P_miss + P_fa: best 1/3 (at >= 0.8, or >= 0.4 with P_fa 1/3)
    assert min_dcf(labels, scores, p_target=0.5) == pytest.approx(1 / 3)
    # accepting nothing costs exactly 1 (normalised), so minDCF never exceeds 1
    assert min_dcf(labels, [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]) == pytest.approx(1.0)
