"""Bootstrap confidence intervals behind every table, checked against scipy and by hand."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fireact_utils.evaluate import bootstrap_ci, fmt_ci, markdown_table, paired_bootstrap_diff, results_table

ROOT = Path(__file__).resolve().parents[1]


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


# ---------------------------------------------------------------- notebook 03: an episode pair, the paper


@pytest.fixture(scope="module")
def react_pair(data_dir):
    from eval_records import react_records

    base, ft, _ = react_records(data_dir)
    assert [(bool(b["em"]), bool(f["em"])) for b, f in zip(base, ft, strict=True)] == [
        (False, False), (True, False), (False, True)]  # the script did what it says
    return base, ft


def test_differing_pair_prefers_the_fine_tuned_win(react_pair):
    from fireact_utils.evaluate import differing_pair

    base, ft = react_pair
    assert differing_pair(base, ft) == (base[2], ft[2])  # fine-tuned right, few-shot wrong, though later
    assert differing_pair(base[:2], ft[:2]) == (base[1], ft[1])  # else the reverse
    assert differing_pair(base[:1], ft[:1]) is None  # both wrong everywhere
    assert differing_pair(base[::-1], ft) == (base[2], ft[2])  # paired by question index, not position


def test_compare_episodes_annotates_both_and_where_they_part(react_pair):
    from fireact_utils.evaluate import compare_episodes, episode_markdown

    base, ft = react_pair
    md = compare_episodes(base, ft)
    assert ft[2]["question"] in md and f"Only fine-tuned ReAct got it right (gold {ft[2]['gold']!r})." in md
    assert f"**few-shot ReAct**: 1 turn (finished); searched nothing; answered '1998' against gold {ft[2]['gold']!r}: EM 0." in md
    assert (f"**fine-tuned ReAct**: 2 turns (finished); searched `second topic`; answered {ft[2]['gold']!r} against "
            f"gold {ft[2]['gold']!r}: EM 1.") in md
    assert "Observation: Results for second topic: nothing useful." in md  # the scratchpad, as the tool answered
    assert md.endswith("turn 1: few-shot ReAct finish[1998]; fine-tuned ReAct search[second topic].")
    assert compare_episodes(base[:1], ft[:1]).startswith("No question separates the two agents: on each of the 1")
    assert episode_markdown(ft[0], "ft").startswith(
        f"**ft**: 4 turns (max_turns); searched {'; '.join(['`zeroth topic`'] * 4)}; gave no answer (gold {ft[0]['gold']!r}): EM 0.")


def test_paper_comparison_sentence_and_table(react_pair):
    """The two gains side by side, each with what it has (ours a CI, the paper's none), and what
    differs between the settings; no claim that one gain lies in the other's CI."""
    from fireact_utils.evaluate import PAPER_HOTPOTQA_EM, episode_values, fmt_pct_ci, paper_comparison

    base, ft = react_pair
    table = results_table({"few": base, "ft": ft}, n_boot=500)
    mean, lo, hi = paired_bootstrap_diff(episode_values(base, "em"), episode_values(ft, "em"), 500)
    gain = {"n": 3, "gain": mean, "lo": lo, "hi": hi}
    md = paper_comparison(table, gain, "few", "ft", "smollm2-135m")
    b, f = table.iloc[0], table.iloc[1]
    assert md.startswith(f"This run: fine-tuning took our smollm2-135m student from {fmt_pct_ci(b['em'], b['em_lo'], b['em_hi'])} "
                         f"to {fmt_pct_ci(f['em'], f['em_lo'], f['em_hi'])} EM on 3 questions, a paired gain of +0.0 [")
    assert fmt_pct_ci(1 / 3, 0.0, 1.0) == "33.3% [0.0, 100.0]"
    assert "The paper: Llama-2-7B from 14.8% to 26.2% on HotpotQA dev-500, a gain of +11.4 points, reported without a CI." in md
    assert ("The settings differ in the model (smollm2-135m against Llama-2-7B), the questions (3 against the paper's 500), "
            "the search (the recorded-Google replay against live Google) and the few-shot baseline (our `few`, which "
            f"searched in {b['searched'] * 100:.0f}% of its episodes; the paper's own prompt).") in md
    assert "inside" not in md and "what to compare" not in md  # states the gains, infers nothing from them
    assert md.rstrip().endswith("| " + " | ".join(map(str, PAPER_HOTPOTQA_EM.values())) + " | +11.4 |")
    wiki = paper_comparison(table, gain, "few", "ft", "smollm2-135m", search="wiki")
    assert "the search (Wikipedia paragraphs (BM25) against live Google)" in wiki
    assert "| this run: smollm2-135m, 3 questions, Wikipedia paragraphs (BM25) |" in wiki


# ---------------------------------------------------------------- conditions that are not final


def test_api_errors_and_unrun_questions_flag_the_condition_in_the_main_table(tmp_path, data_dir):
    """A condition whose episode ended in api_error (scored wrong) and one that ran 2 of its 3
    questions are marked ‡ in tables/main.md with the reason, counted in main.csv, and said in
    notebook 03's summary and the robustness table; the complete condition is not; resuming them
    (which re-runs the api_error episode) clears the flags."""
    from scripted import ScriptedLLM, by_question

    from fireact_utils import pipeline, summaries, tables
    from fireact_utils.config import AgentParams, load_params
    from fireact_utils.evaluate import write_table
    from fireact_utils.llm import Generation
    from fireact_utils.tasks import eval_indices, load_task

    p = load_params(ROOT / "params" / "smoke.yaml", [f"output_root={tmp_path}", "evaluate.n_questions=3"])
    task = load_task(p.evaluate.task, p.evaluate.split, data_dir)
    questions = [task.questions[i] for i in eval_indices(task, 3, p.evaluate.seed)]
    answers = {q: ["Action: finish[1998]"] for q in questions}
    outage = answers | {questions[1]: [Generation("", error="APIConnectionError: down")]}
    agent = AgentParams(method="react", mode="finetuned", max_turns=2)

    def run(name: str, script: dict, n: int | None = None) -> list[dict]:
        return pipeline.run_condition(p, name, ScriptedLLM(by_question(script)), agent, n=n, progress=False)

    conds = {"finetuned_react": run("finetuned_react", outage),
             "base_fewshot_react": run("base_fewshot_react", answers, n=2),
             "base_fewshot_io": run("base_fewshot_io", answers)}
    table = tables.condition_table(p, conds)
    _, md_path = write_table(table, p.run_dir / "tables" / "main")
    md = md_path.read_text()
    header = md.splitlines()[0]
    assert header.startswith("| condition | n | api errors | EM % [95% CI] |")
    assert "| FireAct fine-tuned ReAct ‡ | 3 | 1 |" in md and "| base few-shot ReAct ‡ | 2 | 0 |" in md
    assert "| base few-shot IO | 3 | 0 |" in md
    assert ("‡ FireAct fine-tuned ReAct: not final: 1 of 3 episodes ended in api_error (scored wrong); "
            "resume the condition to finish it") in md
    assert "‡ base few-shot ReAct: not final: 1 of 3 questions not run; resume the condition to finish it" in md
    csv = pd.read_csv(p.run_dir / "tables" / "main.csv")
    assert list(csv["api_errors"]) == [1, 0, 0] and list(csv["questions"]) == [3, 3, 3]
    assert "**not final**: 1 of 3 episodes ended in api_error (scored wrong)" in summaries.evaluation(p.run_dir)
    assert "| FireAct fine-tuned ReAct (not final: 1 of 3 episodes ended in api_error (scored wrong)) |" in \
        tables.robustness_markdown(table)  # notebook 04's noise tables too

    conds["finetuned_react"] = run("finetuned_react", answers)  # the resume
    conds["base_fewshot_react"] = run("base_fewshot_react", answers)
    md = markdown_table(tables.condition_table(p, conds))
    assert "‡" not in md and "api errors" not in md
