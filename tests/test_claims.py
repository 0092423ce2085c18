"""Results that cannot fool their reader: titles state measured ratios, noisy conditions say what
the noise did, and a noisy run with too few corrupted observations is not plotted as robustness."""

import pytest

from fireact_utils import pipeline, plots, tables
from fireact_utils.evaluate import paired_bootstrap_diff, results_table


def _recs(ems: list[int], prompt: int = 100, completion: int = 10, turns: int = 2) -> list[dict]:
    """Hand-made episode records, ids q0, q1, ... in order."""
    return [{"id": f"q{i}", "em": em, "f1": float(em), "turns": turns, "status": "finished",
             "prompt_tokens": prompt, "completion_tokens": completion} for i, em in enumerate(ems)]


def test_efficiency_title_states_measured_ratios():
    """The demo's numbers: the fine-tuned agent read 555 prompt tokens per episode against 607 for
    few-shot ReAct, generated 2.1x the tokens and took 3.7x the seconds: the title says so."""
    conds = {"base few-shot ReAct": _recs([1, 0], prompt=607, completion=50),
             "base few-shot CoT": _recs([0, 0], prompt=300, completion=40),
             "FireAct fine-tuned ReAct": _recs([1, 1], prompt=555, completion=105)}
    extra = {"base few-shot ReAct": {"mode": "fewshot", "method": "react", "seconds_per_episode": 2.0},
             "base few-shot CoT": {"mode": "fewshot", "method": "cot", "seconds_per_episode": 1.0},
             "FireAct fine-tuned ReAct": {"mode": "finetuned", "method": "react", "seconds_per_episode": 7.4}}
    table = results_table(conds, n_boot=50, extra=extra)
    claim = "fine-tuned vs few-shot ReAct per episode: 0.91x prompt tokens, 2.1x generated tokens, 3.7x seconds"
    assert plots.efficiency_claim(table) == claim  # 555/607 = 0.914, 105/50 = 2.1, 7.4/2 = 3.7
    title = plots.plot_efficiency(table).get_suptitle()
    assert claim in title and "need no few-shot exemplars" not in title
    # Without seconds, or the mode/method columns, the rows are found by label and seconds are omitted.
    bare = results_table(conds, n_boot=50)
    assert plots.efficiency_claim(bare) == "fine-tuned vs few-shot ReAct per episode: 0.91x prompt tokens, 2.1x generated tokens"
    assert plots.efficiency_claim(results_table({"base few-shot CoT": conds["base few-shot CoT"]}, 50)) == ""


@pytest.mark.parametrize(("name", "label"), [
    ("finetuned_react_noise_none_0.5", 'FireAct fine-tuned ReAct, 50% of obs -> "None"'),
    ("finetuned_react_noise_random_0.25", "FireAct fine-tuned ReAct, 25% of obs -> random other obs"),
    ("base_fewshot_react_noise_random_0.5", "base few-shot ReAct, 50% of obs -> random other obs"),
    ("finetuned_react_hotpotqa-wiki_noise_random_0.5",
     "hotpotqa-wiki: FireAct fine-tuned ReAct, 50% of obs -> random other obs"),
    ("base_fewshot_searching_react_noise_none_0.5", 'base few-shot ReAct, must search, 50% of obs -> "None"'),
    (pipeline.SEARCHING, "base few-shot ReAct, must search"),
    ("finetuned_react", "FireAct fine-tuned ReAct"),  # other names keep their labels
    ("gen_hotpotqa-wiki_ft", "hotpotqa-wiki: FireAct fine-tuned ReAct"),
    ("scaling_n100", "scaling n100"),
])
def test_condition_label_says_what_the_noise_did(name, label):
    assert tables.condition_label(name) == label


def test_too_few_corrupted_is_flagged_and_left_out_of_the_figure():
    """Few-shot ReAct under noise saw 1 corrupted observation: flagged, greyed, not plotted; the
    fine-tuned agent's 30 are plotted, and vs_clean is the paired EM difference by question id."""
    clean = {"base_fewshot_react": _recs([1, 0, 1, 0]), "finetuned_react": _recs([1, 1, 1, 0])}
    noisy = {"base_fewshot_react_noise_none_0.5": _recs([1, 0, 1, 0]),
             # saved in another order: pairing goes by id, not position
             "finetuned_react_noise_none_0.5": _recs([0, 1, 0, 0])[::-1]}
    meta = {"base_fewshot_react_noise_none_0.5": 1, "finetuned_react_noise_none_0.5": 30}
    mode = {"base": "fewshot", "fine": "finetuned"}
    extra = {tables.condition_label(n): {"mode": mode[n[:4]], "method": "react"} for n in clean | noisy}
    for n, k in meta.items():
        extra[tables.condition_label(n)] |= {"noise_rate": 0.5, "noise_kind": "none", "noise_corrupted": k}
    table = results_table({tables.condition_label(n): r for n, r in (clean | noisy).items()}, 50, extra=extra)
    by_agent = {"base_fewshot": clean["base_fewshot_react"], "finetuned": clean["finetuned_react"]}
    out = tables.noise_effects(table, noisy, by_agent, n_boot=50).set_index("condition")

    few, ft = (tables.condition_label(n) for n in meta)
    assert out["too_few_corrupted"].to_dict() == {**dict.fromkeys(out.index, False), few: True}
    assert "only 1 corrupted observation (< 20)" in out.loc[few, "note"]
    # per question: q0 1->0, q1 1->1, q2 1->0, q3 0->0: mean noisy - clean = -0.5
    assert out.loc[ft, "vs_clean"] == pytest.approx(-0.5)
    expected = paired_bootstrap_diff([0, 1, 1, 1], [0, 0, 1, 0], 50)  # the pairs in the noisy run's order q3..q0
    assert tuple(out.loc[ft, ["vs_clean", "vs_clean_lo", "vs_clean_hi"]]) == pytest.approx(expected)
    assert out.loc[few, "vs_clean"] == 0.0

    fig = plots.plot_robustness(out.reset_index())
    ax = fig.axes[0]
    drawn = {c.get_label(): list(c.lines[0].get_xdata()) for c in ax.containers}  # errorbar: label -> x (%)
    assert drawn == {"base few-shot ReAct: clean tool only": [0.0],  # its noisy row is left out
                     'FireAct fine-tuned ReAct: observation replaced by "None"': [0.0, 50.0]}
    assert ax.get_legend_handles_labels()[1] == list(drawn)
    below = " ".join(t.get_text() for t in fig.texts)
    assert few in below and ft not in below and "1 corrupted observation" in below

    md = tables.robustness_markdown(out.reset_index())
    row = next(line for line in md.splitlines() if few in line)
    assert 'color:grey' in row and "(greyed: only 1 corrupted observation" in row
    ft_row = next(line for line in md.splitlines() if line.startswith(f"| {ft} |"))
    assert "grey" not in ft_row and "| 30 |" in ft_row and f"{expected[0] * 100:.1f} [" in ft_row


def test_two_prompted_agents_get_their_own_lines():
    """The few-shot prompt and the one that must search are both prompted: each keeps its own
    line (its clean point, then its noisy rates), not one line through both."""
    names = ["base_fewshot_react", pipeline.SEARCHING, "base_fewshot_react_noise_none_0.5",
             "base_fewshot_searching_react_noise_none_0.5"]
    extra = {tables.condition_label(n): {"mode": "fewshot", "method": "react"} for n in names}
    for n, k in zip(names[2:], (25, 40), strict=True):
        extra[tables.condition_label(n)] |= {"noise_rate": 0.5, "noise_kind": "none", "noise_corrupted": k}
    table = results_table({tables.condition_label(n): _recs([1, 0]) for n in names}, 50, extra=extra)
    ax = plots.plot_robustness(table).axes[0]
    drawn = {c.get_label(): list(c.lines[0].get_xdata()) for c in ax.containers}
    assert drawn == {'base few-shot ReAct: observation replaced by "None"': [0.0, 50.0],
                     'base few-shot ReAct, must search: observation replaced by "None"': [0.0, 50.0]}
    colors = {str(c.lines[0].get_color()) for c in ax.containers}
    assert len(colors) == 2
