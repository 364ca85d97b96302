"""Release evidence (issue 13): small-sample intervals, P(covid19) calibration, prior shift, version check."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.parametrize("n", [5, 12])
def test_perfect_small_test_set_intervals_are_exact_and_policy_fails(n):
    """Every test case right: the percentile bootstrap gave [1, 1]; the exact bound is 0.025^(1/n)."""
    from compliance.policy import evaluate_policy
    from models.evaluate import evaluate_predictions

    labels = np.array([0] * n + [2] * n)
    logits = np.where(np.arange(2 * n)[:, None] < n, [[4.0, 0.0, 0.0]], [[-4.0, 0.0, 4.0]])
    ev, _ = evaluate_predictions(labels, logits, temperature=1.0, threshold=0.5,
                                 patient_ids=[f"p{i}" for i in range(2 * n)], n_bootstrap=200)
    sens = ev["covid19_vs_rest"]["sensitivity"]
    assert sens["value"] == 1.0 and sens["bootstrap_ci_low"] == 1.0  # what the old gate read
    assert sens["ci_low"] == pytest.approx(0.025 ** (1 / n), abs=1e-6)  # Clopper-Pearson exact
    if n == 5:
        assert sens["ci_low"] == pytest.approx(0.478, abs=1e-3)
    auroc = ev["covid19_vs_rest"]["auroc"]
    assert auroc["value"] == 1.0 and auroc["ci_low"] < 1.0 and auroc["bootstrap_ci_low"] == 1.0
    assert ev["n_patients_covid19"] == n and ev["n_patients_not_covid19"] == n
    assert "Clopper-Pearson" in ev["interval_method"] and "Newcombe" in ev["interval_method"]
    assert ev["calibration"]["covid19"]["slope"]["value"] is None  # not estimable: perfect separation
    res = evaluate_policy(ev, {})
    by_id = {c.id: c for c in res.criteria}
    assert not res.passed
    # 5/5: lower bound 0.478 < 0.70 fails; 12/12: 0.735 passes that criterion, the slope still fails
    assert by_id["covid19-sensitivity-lower-bound"].passed is (n == 12)
    assert by_id["covid19-sensitivity-lower-bound"].measured == pytest.approx(0.025 ** (1 / n), abs=1e-5)
    assert not by_id["calibration-covid19-slope"].passed


def test_clustered_images_do_not_buy_precision():
    """Ten images of five patients are not ten independent cases."""
    from models.statistics import clustered_proportion

    one = clustered_proportion([True] * 5, [f"p{i}" for i in range(5)])
    two = clustered_proportion([True] * 10, [f"p{i // 2}" for i in range(10)])
    assert two["ci_low"] == pytest.approx(one["ci_low"]) and two["design_effect"] == 2.0
    indep = clustered_proportion([True] * 10, [f"p{i}" for i in range(10)])
    assert indep["ci_low"] > two["ci_low"]


def test_prior_shift_correction():
    from models.statistics import prior_shift

    assert prior_shift(0.5, 0.5, 0.1) == pytest.approx(0.1)
    assert prior_shift(0.3, 0.3, 0.3) == pytest.approx(0.3)
    # odds scale by (0.05/0.95)/(0.6/0.4)
    p = prior_shift(0.8, 0.6, 0.05)
    assert p / (1 - p) == pytest.approx(4 * (0.05 / 0.95) / 1.5)
    with pytest.raises(ValueError):
        prior_shift(0.5, 0.0, 0.2)


def test_dataset_version_check():
    from models.validation import dataset_version_check

    assert dataset_version_check("abc", "abc")["status"] == "match"
    assert dataset_version_check("abc", "def")["status"] == "mismatch"
    assert dataset_version_check("untracked", "untracked")["status"] == "unverifiable"
    assert dataset_version_check(None, "abc")["status"] == "unverifiable"


def test_newcombe_auroc_interval_sane():
    from models.statistics import auroc_interval

    lo, hi = auroc_interval(0.5, 20, 20)
    assert lo < 0.5 < hi and hi - lo < 0.4
    lo, hi = auroc_interval(1.0, 5, 5)
    assert 0.5 < lo < 0.75 and hi == 1.0
    lo_big, _ = auroc_interval(1.0, 200, 200)
    assert lo_big > 0.97
    assert auroc_interval(None, 5, 5) == (None, None) and auroc_interval(0.8, 0, 5) == (None, None)
