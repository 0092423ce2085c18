"""Bootstrap confidence intervals behind every table, checked against scipy and by hand."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fireact_utils.evaluate import bootstrap_ci, fmt_ci, markdown_table, paired_bootstrap_diff, results_table


def test_bootstrap_ci_matches_scipy_percentile():
    x = np.random.default_rng(1).binomial(1, 0.15, size=300).astype(float)  # an EM column
    mean, lo, hi = bootstrap_ci(x, n_boot=20000)
    ref = stats.bootstrap((x,), np.mean, n_resamples=20000, method="percentile", confidence_level=0.95,
                          random_state=np.random.default_rng(2)).confidence_interval
    assert mean == pytest.approx(x.mean())
    assert lo == pytest.approx(ref.low, abs=0.006) and hi == pytest.approx(ref.high, abs=0.006)
    assert lo < mean < hi


def test_bootstrap_by_hand():
    assert bootstrap_ci([1.0] * 7) == (1.0, 1.0, 1.0)  # no spread, no interval
    assert all(np.isnan(v) for v in bootstrap_ci([]))
    # One success in two: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4.
    mean, lo, hi = bootstrap_ci([0.0, 1.0], n_boot=4000)
    assert (mean, lo, hi) == (0.5, 0.0, 1.0)
    assert bootstrap_ci([0.0, 1.0], seed=3) == bootstrap_ci([0.0, 1.0], seed=3)  # seeded: reproducible


def test_paired_difference_resamples_pairs():
    a = np.array([0, 1, 0, 1, 0, 0, 1, 0] * 10, dtype=float)
    b = a.copy()
    b[:8] = 1  # b wins 5 of 80 questions and never loses one
    gain, lo, hi = paired_bootstrap_diff(a, b, n_boot=2000)
    assert gain == pytest.approx(5 / 80) and 0 < lo <= gain <= hi  # a paired CI: excludes 0
    _, lo_b, hi_b = bootstrap_ci(b, 2000)
    assert hi - lo < (hi_b - lo_b) / 1.5  # question difficulty is shared: narrower than b's own interval
    with pytest.raises(ValueError, match="same questions"):
        paired_bootstrap_diff(a, b[:-1])


def test_results_and_markdown_table():
    recs = [{"em": e, "f1": float(e), "turns": 2, "status": s, "prompt_tokens": 10, "completion_tokens": 5}
            for e, s in ((True, "finished"), (False, "finished"), (False, "max_turns"), (False, "finished"))]
    df = results_table({"agent": recs}, n_boot=500, extra={"agent": {"environment": "wiki: x"}})
    row = df.iloc[0]
    assert (row["n"], row["em"], row["finish"], row["statuses"]) == (4, 0.25, 0.75, "finished:3, max_turns:1")
    md = markdown_table(df)
    assert f"| agent | 4 | {fmt_ci(row['em'], row['em_lo'], row['em_hi'])} | 25.0 | 75 | 2.00 | 10 | 5 | [1] |" in md
    assert md.rstrip().endswith("[1] wiki: x")
    assert fmt_ci(0.148, 0.1233, 0.1733) == "14.8 [12.3, 17.3]"
    assert isinstance(df, pd.DataFrame)
