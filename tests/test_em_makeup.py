"""What a condition's EM is made of: question types with their chance rate, tool use, the modal
answer, the paired gain per type; the ReAct game enforced (agent.min_searches) and the grounded
selection rule; the pre-registration lock; hand-edited numbers marked. Real agent loop (scripted
model), real data where a claim is about it."""

from __future__ import annotations

from pathlib import Path

import pytest
from scripted import ScriptedLLM, by_question

from fireact_utils import holdout, recipes, tables
from fireact_utils.agent import SEARCH_FIRST, run_episodes
from fireact_utils.config import AgentParams, load_params
from fireact_utils.evaluate import behaviour, behaviour_summary, markdown_table, question_type, results_table
from fireact_utils.tasks import Task, eval_indices, load_task

PARAMS = Path(__file__).resolve().parent.parent / "params"


def _rec(i: int, question: str, gold: str, em: bool, n_search: int = 0, answer: str | None = "x") -> dict:
    steps = [{"thought": "", "action": "search", "arg": "q", "observation": "o"}] * n_search
    steps = [*steps, {"thought": "", "action": "finish", "arg": answer, "observation": None}]
    return {"id": f"t/dev/{i}", "question": question, "gold": gold, "em": em, "f1": float(em), "turns": len(steps),
            "status": "finished" if answer else "max_turns", "prompt_tokens": 10, "completion_tokens": 5,
            "steps": steps, "answer": answer, "pred": (answer or "").lower()}


def test_question_types_by_hand():
    assert question_type(_rec(0, "Were A and B of the same nationality?", "yes", True)) == "two_option"
    assert question_type(_rec(0, "Who was born first, Arthur Conan Doyle or Penelope Lively?",
                              "Arthur Ignatius Conan Doyle", True)) == "two_option"  # most of the gold is an option
    assert question_type(_rec(0, "Which is older, the X or the Y?", "Z", True)) == "open"
    assert question_type(_rec(0, "What ingredient is in both Cosmopolitan and Cuba Libre?", "lime", True)) == "open"
    assert question_type(_rec(0, "Which is a gas?\nA. iron\nB. neon\nC. wood\nD. salt", "B", True)) == "four_option"


def test_dev500_two_option_share(data_dir):
    """On the demo's 100 questions, 20 are two-option (the EM a coin would half win)."""
    dev = load_task("hotpotqa", "dev", data_dir)
    types = [question_type({"question": dev.questions[i], "gold": dev.answers[i]}) for i in eval_indices(dev, 100)]
    assert types.count("two_option") == 20 and types.count("open") == 80


def test_behaviour_and_markdown_by_hand():
    recs = [_rec(0, "Rome or Paris?", "Rome", True), _rec(1, "Is it?", "no", False, answer="Hampshire"),
            _rec(2, "Who?", "Bob", True, n_search=2, answer="Bob"), _rec(3, "Where?", "Rome", False, answer="Hampshire")]
    b = behaviour(recs, n_boot=50)
    assert (b["n_two_option"], b["em_two_option"], b["n_open"], b["em_open"]) == (2, 0.5, 2, 0.5)
    assert (b["searched"], b["searches_per_episode"]) == (0.25, 0.5)
    assert (b["top_answer"], b["top_answer_count"]) == ("hampshire", 2)
    md = markdown_table(results_table({"few-shot": recs}, 50))
    assert "| EM % [95% CI] | two-option EM % | open EM % | F1 %" in md.split("\n")[0]
    assert "50.0 (2)" in md and "hampshire (2)" in md and "two-option: chance 50%" in md
    assert "| 25 | 0.50 |" in md  # searched %, searches per episode
    line = behaviour_summary(results_table({"few-shot": recs}, 50))
    assert line == ("- **few-shot**: searched in 25% of episodes (0.50 searches per episode); most frequent answer "
                    "'hampshire', 2 of 4; EM 50% on the 2 two-option questions (a coin: 50%) and 50% on the 2 open ones.")


def test_paired_gain_per_type(tmp_path):
    p = load_params(PARAMS / "smoke.yaml", {"output_root": str(tmp_path), "evaluate.bootstrap": 50})
    base = [_rec(0, "Rome or Paris?", "Rome", False), _rec(1, "Who?", "Bob", False), _rec(2, "Why?", "C", True)]
    ft = [_rec(0, "Rome or Paris?", "Rome", True), _rec(1, "Who?", "Bob", True), _rec(2, "Why?", "C", True)]
    g = tables.paired_gain(p, {"base_fewshot_react": base, "finetuned_react": ft})
    assert g["gain"] == pytest.approx(2 / 3)
    assert g["by_type"]["two_option"] == {"n": 1, "gain": 1.0, "lo": 1.0, "hi": 1.0}
    assert g["by_type"]["open"]["n"] == 2 and g["by_type"]["open"]["gain"] == 0.5
    assert tables.gain_summary(g).splitlines()[1:] == ["- open questions (2): +50.0 [+0.0, +100.0]",
                                                       "- two-option questions (1): +100.0 [+100.0, +100.0]"]
    worse = tables.gain_summary(tables.paired_gain(p, {"base_fewshot_react": ft, "finetuned_react": base}, save=False))
    assert worse.startswith("**FireAct fine-tuned ReAct minus base few-shot ReAct**: -66.7 [")  # a loss reads as one
    # episodes pair by id: the treatment's records in another order (as they finished) give the same gain and
    # CI, a missing one is refused
    assert tables.paired_gain(p, {"base_fewshot_react": base, "finetuned_react": ft[::-1]}, save=False) == g
    with pytest.raises(ValueError, match="same questions"):
        tables.paired_gain(p, {"base_fewshot_react": base[1:], "finetuned_react": ft})


def _search(query: str) -> str:
    return f"Results for {query}: Paris is the capital of France."


def test_min_searches_refuses_an_answer_before_the_tool():
    """With agent.min_searches=1 an answer before any search is refused with an observation; the
    episode then searches and answers. Three refusals in a row end it as a parse error."""
    task = Task("toy", "dev", "qa", ["What about eager?", "What about stubborn?"], ["Paris", "Paris"])
    llm = ScriptedLLM(by_question({"eager": ["Action: finish[Lyon]", "Action: search[France]", "Action: finish[Paris]"],
                                   "stubborn": ["Action: finish[Lyon]"]}))
    eager, stubborn = run_episodes(task, [0, 1], llm, _search, AgentParams(min_searches=1), progress=False)
    assert [s["action"] for s in eager["steps"]] == ["finish", "search", "finish"]
    assert eager["steps"][0]["observation"] == SEARCH_FIRST and (eager["answer"], eager["em"]) == ("Paris", True)
    assert (stubborn["status"], stubborn["turns"], stubborn["answer"]) == ("parse_error", 3, None)
    free = ScriptedLLM(by_question({"eager": ["Action: finish[Lyon]"], "stubborn": ["Action: finish[Paris]"]}))
    assert [r["answer"] for r in run_episodes(task, [0, 1], free, _search, AgentParams(), progress=False)] == ["Lyon", "Paris"]


def test_grounded_rule_does_not_reward_skipping_the_tool(tmp_path):
    """A prompt right on 2 of 3 without searching loses to one right on 1 of 3 after searching
    under grounded_em, and wins under em."""
    skip = [_rec(i, "Q?", "x", i < 2) for i in range(3)]
    grounded = [_rec(i, "Q?", "x", i == 0, n_search=1) for i in range(3)]
    conds = {"skip": skip, "grounded": grounded}
    assert recipes.chosen(conds, "em") == "skip" and recipes.chosen(conds, "grounded_em") == "grounded"
    p = load_params(PARAMS / "smoke.yaml", {"output_root": str(tmp_path), "evaluate.bootstrap": 50})
    table = recipes.selection_table(p, conds, {"skip": {}, "grounded": {}}, recipes.PREFIX["fewshot_variants"])
    assert recipes.chosen_label(table) == "grounded" and set(table["rule"]) == {"grounded_em"}
    assert list(table["grounded_em"]) == [0.0, pytest.approx(1 / 3)]
    assert "| grounded EM % [95% CI] |" in markdown_table(table).splitlines()[0]


def test_preregistered_run_refuses_other_settings(tmp_path):
    p = load_params(PARAMS / "headline.yaml", {"output_root": str(tmp_path)})
    holdout.preregister(p)
    holdout.preregister(load_params(PARAMS / "headline.yaml", {"output_root": str(tmp_path), "agent.batch_size": 8}))
    with pytest.raises(ValueError, match=r"pre-registered with other settings \(study.sc_ks \[1, 5\] -> \[1, 9\]\)"):
        holdout.preregister(load_params(PARAMS / "headline.yaml", {"output_root": str(tmp_path), "study.sc_ks": [1, 9]}))


def test_hand_edited_numbers_are_marked(tmp_path):
    from fireact_utils.io import atomic_write_json

    p = load_params(PARAMS / "smoke.yaml", {"output_root": str(tmp_path), "evaluate.bootstrap": 50})
    atomic_write_json(p.run_dir / "eval" / "finetuned_react.meta.json",
                      {"wall_s": 600.0, "episodes_run": 499, "repaired": "wall_s from the progress log"})
    table = tables.condition_table(p, {"finetuned_react": [_rec(0, "Q?", "x", True)]})
    md = markdown_table(table)
    assert "FireAct fine-tuned ReAct †" in md and "edited by hand (wall_s from the progress log)" in md


def test_a_degenerate_top_answer_is_cut_in_the_table_only():
    """A few-shot IO model that repeats a phrase answers the same 200 characters many times: the
    Markdown table and the text show its first 40, the CSV keeps it whole."""
    long = "answer is " * 20
    recs = [_rec(i, "Who?", "Bob", False, answer=long) for i in range(3)]
    table = results_table({"io": recs}, 50)
    top = table.loc[0, "top_answer"]
    assert top.strip() == long.strip()
    md = markdown_table(table)
    assert "| answer is answer is answer is answer is… (3) |" in md and top.strip() not in md
    assert "'answer is answer is answer is answer is…', 3 of 3" in behaviour_summary(table)
