"""leaderboard/stats.py: bootstrap intervals, paired tests, McNemar, Holm, the speaker bootstrap for EER.

The coverage tests are seeded simulations with a known truth: many test sets drawn from a known distribution, an
interval from each, and the share of intervals that contain the truth must be near the nominal 95 %.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from speechbench.downstreams.metrics import equal_error_rate_percent as task_eer
from speechbench.leaderboard.stats import (
    BootstrapError,
    ItemScoresError,
    bootstrap_interval,
    bootstrap_p_value,
    draw_counts,
    equal_error_rate_percent,
    holm,
    item_scores,
    mcnemar_exact,
    paired_bootstrap,
    point_value,
    resampled_values,
    same_items,
)


def accuracy_items(correct, prefix="u") -> object:
    return item_scores([{"id": f"{prefix}{i:05d}", "correct": int(c)} for i, c in enumerate(correct)])


def edit_items(edits, ref_len) -> object:
    return item_scores([{"id": f"u{i:05d}", "edits": int(e), "ref_len": int(n)}
                        for i, (e, n) in enumerate(zip(edits, ref_len, strict=True))])


def trial_items(labels, scores, enroll, test) -> object:
    return item_scores([{"id": f"t{i}", "label": int(lab), "score": float(s), "enroll_speaker": a, "test_speaker": b}
                        for i, (lab, s, a, b) in enumerate(zip(labels, scores, enroll, test, strict=True))])


# ---------------------------------------------------------------------------------------------- metrics


def test_metrics_of_items_hand_computed():
    assert accuracy_items([1, 0, 1, 1]).metric() == 75.0
    # corpus level: (1 + 3) / (4 + 6), not the mean of 1/4 and 3/6
    assert edit_items([1, 3], [4, 6]).metric() == pytest.approx(40.0)
    # weights = draw counts: item 0 twice, item 1 not at all -> (2*1) / (2*4)
    assert edit_items([1, 3], [4, 6]).metric(np.array([2.0, 0.0])) == pytest.approx(25.0)
    assert accuracy_items([1, 0, 1, 1]).metric(np.array([0.0, 3.0, 1.0, 0.0])) == 25.0


def test_weighted_eer_matches_the_task_metric_and_duplicated_trials():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    labels[:2] = [0, 1]
    scores = rng.normal(labels * 1.2, 1.0)
    assert equal_error_rate_percent(labels, scores) == pytest.approx(task_eer(labels, scores))
    counts = rng.integers(0, 3, 300)  # a resample: trial i drawn counts[i] times
    repeated = np.repeat(np.arange(300), counts)
    assert equal_error_rate_percent(labels, scores, counts.astype(float)) == pytest.approx(
        task_eer(labels[repeated], scores[repeated]))
    # hand value: perfectly separated scores have EER 0; one swapped pair of 2 + 2 trials gives 50 %
    assert equal_error_rate_percent(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 0.0
    assert equal_error_rate_percent(np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == pytest.approx(50.0)


def test_item_scores_are_checked():
    with pytest.raises(ItemScoresError, match="found keys"):
        item_scores([{"id": "a", "right": 1}])
    with pytest.raises(ItemScoresError, match="not unique"):
        item_scores([{"id": "a", "correct": 1}, {"id": "a", "correct": 0}])
    with pytest.raises(ItemScoresError, match="0 or 1"):
        item_scores([{"id": "a", "correct": 2}])
    with pytest.raises(ItemScoresError, match="both target"):
        trial_items([1, 1], [0.1, 0.2], ["s1", "s2"], ["s1", "s2"])
    a, b = accuracy_items([1, 0, 1]), accuracy_items([1, 1, 0, 0])
    assert same_items(a, a) is None
    assert same_items(a, b) == "3 vs 4 test items, 0 + 1 not shared (e.g. 'u00003' only in the second)"


# ---------------------------------------------------------------------------------------------- coverage


def test_accuracy_interval_covers_the_truth_at_about_95_percent():
    """400 simulated test sets of 250 items at a true accuracy of 80 %: the percentile interval covers 80 about
    95 % of the time (binomial sd of the coverage over 400 sets: 1.1 points)."""
    rng = np.random.default_rng(0)
    covered = 0
    for k in range(400):
        lo, hi = bootstrap_interval({(None, 0): accuracy_items(rng.random(250) < 0.8)}, resamples=500, seed=k)
        covered += lo <= 80.0 <= hi
    assert 0.91 <= covered / 400 <= 0.98


def test_corpus_error_rate_interval_covers_the_truth():
    """Utterances of 3-30 tokens with edits ~ Binomial(length, 12 %): the corpus-level WER interval covers 12 %."""
    rng = np.random.default_rng(1)
    covered = 0
    for k in range(300):
        length = rng.integers(3, 31, 200)
        lo, hi = bootstrap_interval({(None, 0): edit_items(rng.binomial(length, 0.12), length)}, 400, seed=k)
        covered += lo <= 12.0 <= hi
    assert 0.90 <= covered / 300 <= 0.98


def test_paired_difference_interval_covers_a_known_difference():
    """Two systems on the same items, correlated through item difficulty; true accuracies 80 % and 75 % (difference
    +5 points). The paired interval covers +5 about 95 % of the time and is narrower than an unpaired one would be."""
    rng = np.random.default_rng(2)
    covered, widths = 0, []
    for k in range(300):
        easy = rng.random(400) < 0.7  # easy items: both mostly right; hard items: both mostly wrong
        a = np.where(easy, rng.random(400) < 0.95, rng.random(400) < 0.45)  # 0.7*.95 + 0.3*.45 = 0.80
        b = np.where(easy, rng.random(400) < 0.90, rng.random(400) < 0.40)  # 0.7*.90 + 0.3*.40 = 0.75
        result = paired_bootstrap({(None, 0): accuracy_items(a)}, {(None, 0): accuracy_items(b)}, 400, seed=k)
        covered += result.interval[0] <= 5.0 <= result.interval[1]
        widths.append(result.interval[1] - result.interval[0])
    assert 0.90 <= covered / 300 <= 0.98
    # unpaired: the two independent 95 % half-widths add in quadrature: 1.96 * sqrt(.8*.2/400 + .75*.25/400)
    unpaired = 2 * 1.96 * 100 * np.sqrt((0.8 * 0.2 + 0.75 * 0.25) / 400)
    assert np.mean(widths) < 0.9 * unpaired


def test_paired_bootstrap_p_value_and_verdict_logic():
    same = accuracy_items([1, 0, 1, 1, 0, 1] * 20)
    result = paired_bootstrap({(None, 0): same}, {(None, 0): same}, 200)
    assert result.difference == 0.0 and result.p_bootstrap == 1.0 and result.interval == (0.0, 0.0)
    assert result.mcnemar_p == 1.0 and result.discordant == (0, 0)
    assert bootstrap_p_value(np.full(999, 0.5)) == pytest.approx(2 / 1000)
    assert bootstrap_p_value(np.array([-1.0, 1.0, 2.0, 3.0])) == pytest.approx(2 * 2 / 5)


# ---------------------------------------------------------------------------------------------- tests


def test_mcnemar_exact_against_hand_value_and_binomtest():
    # 8 items only A got right, 2 only B: p = 2 * P(X <= 2 | n=10, 1/2) = 2 * (1 + 10 + 45) / 1024
    a = np.array([1] * 8 + [0] * 2 + [1] * 5 + [0] * 5)
    b = np.array([0] * 8 + [1] * 2 + [1] * 5 + [0] * 5)
    n_ab, n_ba, p = mcnemar_exact(a, b)
    assert (n_ab, n_ba) == (8, 2)
    assert p == pytest.approx(112 / 1024)
    assert p == pytest.approx(binomtest(8, 10, 0.5).pvalue)
    assert mcnemar_exact(a, a)[2] == 1.0


def test_holm_worked_example():
    # sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> max(0.06, 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.02]) == [0.02]


# ---------------------------------------------------------------------------------------------- speakers, folds


def test_speaker_bootstrap_resamples_enrolment_speakers():
    """A resample that draws speaker a twice, c once and b never weights a's trials 2, c's 1, b's 0; the EER on
    those weights equals the task's EER on the trial list with a's trials written twice and b's removed."""
    rng = np.random.default_rng(5)
    enroll = ["a"] * 6 + ["b"] * 6 + ["c"] * 6
    test = ["a", "b", "c"] * 6
    labels = [int(x == y) for x, y in zip(enroll, test, strict=True)]
    scores = rng.normal(np.array(labels) * 1.0, 1.0)
    items = trial_items(labels, scores, enroll, test)
    position = [int(i[1:]) for i in items.ids]  # items are held in score order; ids are t<file position>
    assert items.n_clusters == 3
    assert items.clusters.tolist() == ["abc".index(enroll[k]) for k in position]  # unit = enrolment speaker
    counts = np.array([[2, 0, 1]])
    per_trial = {"a": 2, "b": 0, "c": 1}
    keep = np.repeat(np.arange(18), [per_trial[speaker] for speaker in enroll])
    expected = task_eer(np.array(labels)[keep], scores[keep])
    assert items.metric_resampled(counts)[0] == pytest.approx(expected)


def test_speaker_bootstrap_is_wider_than_trial_bootstrap_when_speakers_differ():
    """Speaker-specific score offsets make trials of one speaker move together: resampling trials as if they were
    independent understates the spread, resampling speakers does not."""
    rng = np.random.default_rng(6)
    speakers = [f"s{k:02d}" for k in range(20)]
    enroll, test, labels, scores = [], [], [], []
    offset = {s: rng.normal(0, 1.5) for s in speakers}
    for s in speakers:
        for _ in range(40):
            same = rng.random() < 0.5
            other = s if same else speakers[rng.integers(20)]
            enroll.append(s)
            test.append(other)
            labels.append(int(same))
            scores.append(2.0 * same + offset[s] + rng.normal())
    by_speaker = trial_items(labels, scores, enroll, test)
    lo_s, hi_s = bootstrap_interval({(None, 0): by_speaker}, 400)
    # the same trials, each its own unit (every trial a distinct "speaker")
    by_trial = trial_items(labels, scores, [f"x{i}" for i in range(len(labels))], test)
    lo_t, hi_t = bootstrap_interval({(None, 0): by_trial}, 400)
    assert by_speaker.metric() == by_trial.metric()
    assert hi_s - lo_s > 1.5 * (hi_t - lo_t)


def test_resamples_without_nontargets_are_dropped_or_refused():
    """With few speakers a resample can miss every nontarget trial (EER undefined): such resamples are dropped, and
    when more than a quarter are, there is no interval (BootstrapError)."""
    rng = np.random.default_rng(8)

    def trials(speakers_with_nontargets: int, speakers: int):
        rows = []
        for s in range(speakers):
            for k in range(6):
                label = 0 if s < speakers_with_nontargets and k % 2 else 1
                rows.append((label, float(label + rng.normal()), f"s{s}", f"s{s}" if label else "other"))
        return trial_items(*zip(*rows, strict=True))

    # 1 of 3 speakers holds every nontarget: (2/3)^3 = 30 % of the resamples miss it
    with pytest.raises(BootstrapError, match=r"only \d+ of 400 resamples have a defined metric"):
        bootstrap_interval({(None, 0): trials(1, 3)}, 400)
    # 3 of 6: (1/2)^6 = 1.6 % are dropped, the interval comes from the others
    items = trials(3, 6)
    values = resampled_values({(None, 0): items}, draw_counts([{(None, 0): items}], 400, 0))
    assert 0 < np.isnan(values).sum() < 20
    lo, hi = bootstrap_interval({(None, 0): items}, 400)
    assert np.isfinite([lo, hi]).all() and lo <= items.metric() <= hi


def test_folds_resample_within_folds_then_average():
    """ER: each fold draws its own items; the cell is the mean of the fold metrics (per seed, then over seeds)."""
    fold1, fold2 = accuracy_items([1, 1, 0, 1]), accuracy_items([0, 0, 1, 0, 1, 1], prefix="v")
    cell = {(1, 0): fold1, (2, 0): fold2}
    assert point_value(cell) == pytest.approx((75.0 + 50.0) / 2)
    counts = draw_counts([cell], resamples=50, seed=9)
    assert counts[1].shape == (50, 4) and counts[2].shape == (50, 6)
    assert (counts[1].sum(axis=1) == 4).all() and (counts[2].sum(axis=1) == 6).all()
    by_hand = (fold1.metric_resampled(counts[1]) + fold2.metric_resampled(counts[2])) / 2
    assert resampled_values(cell, counts) == pytest.approx(by_hand)
    # two seeds of the same folds: mean over folds per seed, then over seeds
    seeds = {(1, 0): fold1, (2, 0): fold2, (1, 1): accuracy_items([1, 1, 1, 1]), (2, 1): fold2}
    assert point_value(seeds) == pytest.approx(((75 + 50) / 2 + (100 + 50) / 2) / 2)


def test_draws_do_not_depend_on_file_order():
    """Units are numbered by sorted id, so the same items in another order get the same resampled values."""
    correct = np.random.default_rng(4).random(50) < 0.6
    items = accuracy_items(correct)
    shuffled = item_scores([{"id": f"u{i:05d}", "correct": int(correct[i])} for i in reversed(range(50))])
    a = bootstrap_interval({(None, 0): items}, 300, seed=1)
    b = bootstrap_interval({(None, 0): shuffled}, 300, seed=1)
    assert a == b
