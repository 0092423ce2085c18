"""Failure classes, their table and figure, what changed between two conditions, and the comparison of
two runs, all on real episode records: conditions run through `pipeline.run_condition` with a scripted
model, in the Wikipedia environment (HotpotQA-wiki, gold paragraphs known) and the recorded-Google replay."""

from __future__ import annotations

import random

import pandas as pd
import pytest
from eval_records import react_records
from scripted import ScriptedLLM, by_question

from fireact_utils.config import AgentParams, load_params
from fireact_utils.evaluate import paired_bootstrap_diff
from fireact_utils.failures import (
    CLASSES,
    changed_markdown,
    compare_main,
    compare_runs,
    failure_class,
    failure_table,
    gold_titles_by_id,
    report,
    what_changed,
)
from fireact_utils.io import read_json, write_jsonl
from fireact_utils.llm import Generation
from fireact_utils.pipeline import condition_questions, run_condition
from fireact_utils.plots import plot_failures
from fireact_utils.tables import paired_gain

WIKI_N, REPLAY_N = 8, 4


def _params(tmp_path_factory):
    return load_params("params/smoke.yaml", {"output_root": str(tmp_path_factory.mktemp("runs"))})


def _wiki_script(q: list[str], answers: list[str], gold: list[list[str]]) -> dict:
    """One scripted episode per class on the 8 first HotpotQA-wiki test questions of the shuffle (their
    gold titles retrieve their own paragraphs, checked in the tests below)."""
    def search(title: str) -> str:
        return f"Thought: look it up.\nAction: search[{title}]"

    return {q[0]: [search(gold[0][0]), search(gold[0][1]), f"Action: finish[{answers[0]}]"],  # right
            q[1]: ["Thought: I know it.\nAction: finish[yes]"],  # never searched (the gold is "no")
            q[2]: [search(gold[2][0]), search(gold[2][1]), f"Action: finish[{gold[2][0]}]"],  # saw all, wrong
            q[3]: [search(gold[3][0]), f"Action: finish[{gold[3][0]}]"],  # saw one of two
            q[4]: [search("zebra xylophone quantum"), "Action: finish[no]"],  # searched, missed
            q[5]: [f"Action: lookup[{gold[5][0]}]"],  # three invalid actions: parse_error
            q[6]: [search(gold[6][0])],  # searches until max_turns
            q[7]: [Generation("", error="HTTP 503 after retries")]}  # an outage


@pytest.fixture(scope="module")
def wiki(tmp_path_factory):
    """(task, records) of a scripted HotpotQA-wiki condition, one episode per wiki failure class."""
    p = _params(tmp_path_factory)
    task, idx = condition_questions(p, "hotpotqa-wiki", None, WIKI_N)
    script = _wiki_script(*([getattr(task, f)[i] for i in idx] for f in ("questions", "answers", "gold_titles")))
    recs = run_condition(p, "wiki_classes", ScriptedLLM(by_question(script)), AgentParams(max_turns=4),
                         task="hotpotqa-wiki", n=WIKI_N, progress=False)
    return p, task, recs


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    """Records of a scripted condition in the recorded-Google replay (no gold paragraphs)."""
    p = _params(tmp_path_factory)
    task, idx = condition_questions(p, None, None, REPLAY_N)
    q, gold = [task.questions[i] for i in idx], [task.answers[i] for i in idx]
    script = {q[0]: ["Thought: look it up.\nAction: search[Irene Jacob]", f"Action: finish[{gold[0]}]"],  # right
              q[1]: ["Thought: look it up.\nAction: search[Wendy Schaal]", "Action: finish[Matt Groening]"],
              q[2]: ["Thought: I know it.\nAction: finish[submarines]"],  # never searched
              q[3]: ["Action: lookup[Danny Green]", "Action: finish[Danny Green]"]}  # invalid, then no search
    return run_condition(p, "replay_classes", ScriptedLLM(by_question(script)), AgentParams(max_turns=4),
                         n=REPLAY_N, progress=False)


# (environment, position of the question in its condition) of the episode that must land in each class
WHERE = {"right": ("wiki", 0), "never searched": ("wiki", 1), "saw the evidence, answered wrong": ("wiki", 2),
         "saw some of the evidence, answered wrong": ("wiki", 3), "searched, missed the evidence": ("wiki", 4),
         "malformed action": ("wiki", 5), "turn limit": ("wiki", 6), "api_error": ("wiki", 7),
         "searched, answered wrong": ("replay", 1)}


@pytest.mark.parametrize("cls", CLASSES)
def test_each_class_on_a_real_record(cls, wiki, replay):
    env, k = WHERE[cls]
    _, task, wiki_recs = wiki
    rec = wiki_recs[k] if env == "wiki" else replay[k]
    gold = gold_titles_by_id(task)[rec["id"]] if env == "wiki" else None
    assert failure_class(rec, gold) == cls


def test_replay_classes_without_gold(replay):
    """The replay has no gold paragraphs: a wrong answer after a search is only 'searched, answered wrong',
    and an invalid action with no search before a wrong answer is a malformed action."""
    assert [failure_class(r) for r in replay] == ["right", "searched, answered wrong", "never searched",
                                                  "malformed action"]
    assert [r["status"] for r in replay] == ["finished"] * 4


def test_wiki_records_and_statuses(wiki):
    """The records behind the wiki classes are what the script meant: statuses from the agent loop, and
    the gold paragraphs retrieved by their titles (else 'saw' would be vacuous)."""
    _, task, recs = wiki
    assert [r["status"] for r in recs] == ["finished"] * 5 + ["parse_error", "max_turns", "api_error"]
    gold = gold_titles_by_id(task)
    assert all(recs[k]["steps"][j]["observation"].startswith(f"{gold[recs[k]['id']][j]}: ") for k in (0, 2)
               for j in (0, 1))
    # without gold titles the wiki episodes that searched and erred fall back to the replay's class
    assert {failure_class(recs[k]) for k in (2, 3, 4)} == {"searched, answered wrong"}


def test_failure_table_agrees_with_fidelity(wiki, replay, tmp_path):
    """Every episode in exactly one class: counts sum to n, shares to 1, columns in the fixed order; and
    the record-only classes agree with the fidelity run_condition computed by replaying the searches."""
    p, task, recs = wiki
    table = failure_table({"wiki": recs, "replay": replay}, gold_titles_by_id(task))
    assert list(table.columns[2:2 + len(CLASSES)]) == list(CLASSES)
    assert table[list(CLASSES)].sum(axis=1).tolist() == table["n"].tolist() == [WIKI_N, REPLAY_N]
    assert table[[f"{c} (share)" for c in CLASSES]].sum(axis=1).tolist() == pytest.approx([1.0, 1.0])
    w = table.set_index("condition").loc["wiki"]
    assert all(w[c] == 1 for c in CLASSES if c != "searched, answered wrong")
    out = read_json(p.run_dir / "eval" / "wiki_classes.meta.json")["fidelity"]["outcomes"]
    assert out["correct"] == w["right"] and out["saw evidence, wrong answer"] == w["saw the evidence, answered wrong"]
    assert out["never finished"] == w["malformed action"] + w["turn limit"] + w["api_error"]
    assert out["missed evidence"] == (w["never searched"] + w["searched, missed the evidence"]
                                      + w["saw some of the evidence, answered wrong"])
    paths = [tmp_path / "failures.png", tmp_path / "failures.svg"]
    assert plot_failures(table, tmp_path / "failures") is not None and all(f.stat().st_size > 0 for f in paths)


def test_what_changed_pairs_by_id(wiki):
    """Each episode's class before and after, paired by id whatever the order of the records: 'after'
    (search the question's own words, then a wrong answer) is shuffled, and the table is the same."""
    p, task, before = wiki

    def reply(text: str) -> str:
        episode = text.rsplit("Question:", 1)[1]
        if "Observation:" in episode:
            return "Thought: I give up.\nAction: finish[no idea]"
        return f"Thought: search it.\nAction: search[{episode.strip().splitlines()[0]}]"

    after = run_condition(p, "wiki_after", ScriptedLLM(reply), AgentParams(max_turns=4), task="hotpotqa-wiki",
                          n=WIKI_N, progress=False)
    gold = gold_titles_by_id(task)
    shuffled = random.Random(0).sample(after, len(after))
    assert [r["id"] for r in shuffled] != [r["id"] for r in after]
    table = what_changed(before, shuffled, gold)
    assert table.equals(what_changed(before, after, gold)) and table["n"].sum() == WIKI_N
    expect = {(failure_class(b, gold[b["id"]]), failure_class(a, gold[a["id"]])): b["id"]
              for b, a in zip(before, after, strict=True)}
    assert {(r.before, r.after): r.ids for r in table.itertuples()} == {k: [i] for k, i in expect.items()}
    assert ("never searched", failure_class(after[1], gold[after[1]["id"]])) in expect
    by_position = what_changed(before, [{**a, "id": b["id"]} for a, b in zip(shuffled, before, strict=True)], gold)
    assert not by_position.equals(table)  # zipping by position would have told another story


def test_compare_runs_matches_paired_gain(data_dir, wiki, tmp_path, capsys):
    """The paired gain per condition is paired_gain's (same bootstrap, same pairs) although run b's records
    are shuffled; flipped ids are named; a condition in one run only is left out."""
    base, ft, _ = react_records(data_dir)
    p, task, wiki_recs = wiki
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    write_jsonl(run_a / "eval" / "finetuned_react.jsonl", base)
    write_jsonl(run_b / "eval" / "finetuned_react.jsonl", random.Random(1).sample(ft, len(ft)))
    write_jsonl(run_a / "eval" / "wiki.jsonl", wiki_recs)
    write_jsonl(run_b / "eval" / "only_b.jsonl", ft)
    table = compare_runs(run_a, run_b, n_boot=200).set_index("condition")
    assert table.index.tolist() == ["finetuned_react"]
    row = table.loc["finetuned_react"]
    ref = paired_gain(p, {"a": base, "b": ft}, "a", "b", save=False)  # smoke params: 200 resamples
    assert p.evaluate.bootstrap == 200 and (row["n"], row["gain"], row["lo"], row["hi"]) == (
        ref["n"], ref["gain"], ref["lo"], ref["hi"])
    assert (row["gain"], row["lo"], row["hi"]) == paired_bootstrap_diff([r["em"] for r in base], [r["em"] for r in ft], 200)
    assert (row["em_a"], row["em_b"]) == (1 / 3, 1 / 3)
    assert row["right_to_wrong"] == [base[1]["id"]] and row["wrong_to_right"] == [base[2]["id"]]
    assert compare_main(str(run_a), str(run_b)) == 0
    out = capsys.readouterr().out
    assert "FireAct fine-tuned ReAct: n=3" in out and f"right to wrong (1): {base[1]['id']}" in out
    assert compare_main(str(run_a), str(tmp_path / "nowhere")) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'nowhere'} has no eval/ folder")
    write_jsonl(run_b / "eval" / "finetuned_react.jsonl", wiki_recs)  # no episode in common
    assert compare_main(str(run_a), str(run_b)) == 1 and "no condition has episodes in both" in capsys.readouterr().out


def test_report_writes_the_table_figure_and_what_changed(data_dir, tmp_path):
    """`failures.report` (notebook 03 and `headline`) on real records of three questions: by hand,
    few-shot ReAct is never searched, right, never searched; the fine-tuned agent hits the turn limit,
    never searched, right. Labels are the main table's; every question changed class."""
    base, ft, _ = react_records(data_dir)
    p = load_params("params/smoke.yaml", {"output_root": str(tmp_path)})
    table, changed = report(p, {"base_fewshot_react": base, "finetuned_react": ft})
    tables, figures = p.run_dir / "tables", p.run_dir / "figures"
    assert list(table["condition"]) == ["base few-shot ReAct", "FireAct fine-tuned ReAct"]
    assert (tables / "failures.md").read_text().splitlines() == [
        "| condition | n | right | never searched | turn limit |", "|---|---|---|---|---|",
        "| base few-shot ReAct | 3 | 1 (33%) | 2 (67%) | 0 (0%) |",
        "| FireAct fine-tuned ReAct | 3 | 1 (33%) | 1 (33%) | 1 (33%) |"]
    assert pd.read_csv(tables / "failures.csv")[list(CLASSES)].sum(axis=1).tolist() == [3, 3]
    assert all((figures / f"failures.{ext}").stat().st_size > 1000 for ext in ("png", "svg"))
    saved = pd.read_csv(tables / "what_changed.csv")
    assert list(zip(saved["before"], saved["after"], saved["ids"], strict=True)) == [
        ("right", "never searched", base[1]["id"]), ("never searched", "right", base[2]["id"]),
        ("never searched", "turn limit", base[0]["id"])]
    assert changed_markdown(changed, "few-shot", "fine-tuned").splitlines() == [
        "**From few-shot to fine-tuned**, the same 3 questions paired by id: 0 kept their class, 3 changed it:",
        "- right -> never searched: 1", "- never searched -> right: 1", "- never searched -> turn limit: 1"]
    same = what_changed(base, base)  # nothing changed: one line
    assert changed_markdown(same, "a", "b") == "**From a to b**, the same 3 questions paired by id: 3 kept their class, 0 changed it."
