"""Choosing on validation (recipes, few-shot prompts), training seeds and self-consistency voting."""

import json
from pathlib import Path

import pandas as pd
import pytest

from fireact_utils import pipeline, recipes
from fireact_utils.agent import Agent, Episode, episode_id
from fireact_utils.config import AgentParams, ParamsError, load_params, override
from fireact_utils.io import atomic_write_json, write_jsonl
from fireact_utils.self_consistency import majority_vote, vote_curve
from fireact_utils.tasks import PROMPT_DIR, eval_indices, fewshot_prompt, load_task

SMOKE = Path(__file__).resolve().parent.parent / "params" / "smoke.yaml"


def test_fewshot_prompt_keeps_the_first_n_exemplars_or_replaces_them():
    for f in PROMPT_DIR.glob("*.txt"):  # all exemplars: the file as it is
        kind, method = f.stem.split("_")
        assert fewshot_prompt(kind, method) == f.read_text().rstrip("\n") + "\n\n"
    one = fewshot_prompt("qa", "react", 1)
    assert one.count("Question: ") == 1 and one.startswith("Answer the question by working in steps")
    assert fewshot_prompt("qa", "react").startswith(one.rstrip("\n"))
    mine = fewshot_prompt("qa", "react", exemplars="Question: q?\nAction: finish[a]\n")
    assert mine.endswith("\n\nQuestion: q?\nAction: finish[a]\n\n") and mine.count("Question: ") == 1


def test_fireact_exemplars_are_multihop_training_trajectories(data_dir):
    """FireAct's exemplars: successful, two or more searches, no environment reward line, and
    never a HotpotQA dev question (dev-500 and HotpotQA-wiki are drawn from dev)."""
    from fireact_utils.data import fireact_exemplars

    text = fireact_exemplars(4, data_dir)
    shots = text.split("\n\n")
    assert len(shots) == 4
    dev = {q.strip().lower() for q in load_task("hotpotqa", "dev", data_dir).questions}
    for shot in shots:
        lines = shot.strip().split("\n")
        assert lines[0].startswith("Question: ") and lines[0][10:].strip().lower() not in dev
        assert sum(line.startswith("Action: search[") for line in lines) >= 2
        assert lines[-1].startswith("Action: finish[") and "reward" not in shot


def test_fewshot_variants_change_the_prompt(data_dir):
    """exemplars=fireact reaches ReAct on a qa task only; chat_template makes the prompt a chat."""
    p = load_params(SMOKE)
    hotpot, strategy = load_task("hotpotqa", "dev", data_dir), load_task("strategyqa", "dev", data_dir)
    fire = AgentParams(exemplars="fireact", n_exemplars=2)
    text = pipeline.fewshot_text(p, fire, hotpot)
    assert text.count("Question: ") == 2 and "Pride and Prejudice" not in text
    assert pipeline.fewshot_text(p, fire.model_copy(update={"method": "cot"}), hotpot) is None
    assert pipeline.fewshot_text(p, fire, strategy) is None
    ep = Episode("x", 0, "Who?", "a", "react")
    chat = Agent(hotpot, AgentParams(chat_template=True, n_exemplars=1), None).prompt(ep)
    assert isinstance(chat, list) and chat[0]["role"] == "user" and chat[0]["content"].endswith("Question: Who?\n")
    assert Agent(hotpot, AgentParams(), None, fewshot=text).prompt(ep).startswith(text)


def test_dataset_tasks_keep_one_task(data_dir):
    from fireact_utils.data import load_fireact, mix

    recs = load_fireact("multitask_multimethod", data_dir=data_dir)
    hot = mix(recs, tasks=["hotpotqa"])
    assert hot and {r["task"] for r in hot} == {"hotpotqa"} and len(hot) < len(mix(recs))
    with pytest.raises(ValueError, match="matches no trajectories; have tasks: .*hotpotqa"):
        mix(recs, tasks=["hotpotqa-wiki"])


def test_variants_are_validated_overrides():
    p = load_params(SMOKE, {"study.recipes": {"r8": {"train.lora_r": 8, "dataset.tasks": ["hotpotqa"]}}})
    (q,) = recipes.variants(p, "recipes").values()
    assert q.train.lora_r == 8 and q.dataset.tasks == ["hotpotqa"] and q.train.method == p.train.method
    with pytest.raises(ParamsError, match="r8.*'agent.n_exemplars' is not a train. or dataset. key"):
        load_params(SMOKE, {"study.recipes": {"r8": {"agent.n_exemplars": 1}}})
    with pytest.raises(ParamsError, match="study.recipes.bad"):
        override(p, {"train.lora_r": 0}, "study.recipes.bad")


def _rec(idx: int, pred: str | None, em: bool, tokens: int = 10) -> dict:
    return {"id": f"t/dev/{idx}", "answer": pred, "pred": pred or "", "em": em, "prompt_tokens": tokens,
            "completion_tokens": 1}


def test_majority_vote_ties_go_to_the_first_answer():
    assert majority_vote([_rec(0, "b", False), _rec(0, "a", True), _rec(0, "a", True)])["pred"] == "a"
    assert majority_vote([_rec(0, "b", False), _rec(0, "a", True)])["pred"] == "b"  # 1-1: the first
    assert majority_vote([_rec(0, None, False), _rec(0, "a", True), _rec(0, None, False)])["pred"] == "a"
    assert majority_vote([_rec(0, None, False), _rec(0, None, False)])["answer"] is None


def test_vote_curve_by_hand():
    """Two questions, three samples: q0 is right only by vote (a, b, b with b gold); q1 right at k=1 only."""
    runs = [[_rec(0, "a", False), _rec(1, "x", True)],
            [_rec(0, "b", True), _rec(1, "y", False)],
            [_rec(0, "b", True), _rec(1, "y", False)]]
    df = vote_curve(runs, [3, 1], [2.0, 3.0, 5.0], n_boot=200).set_index("k")
    assert df.loc[1, "em"] == 0.5 and df.loc[3, "em"] == 0.5
    assert df.loc[1, "pass_at_k"] == 0.5 and df.loc[3, "pass_at_k"] == 1.0  # q1's right answer is outvoted
    assert df.loc[1, "tokens_per_question"] == 11 and df.loc[3, "tokens_per_question"] == 33
    assert df.loc[1, "seconds_per_question"] == 2.0 and df.loc[3, "seconds_per_question"] == 10.0
    runs[2] = runs[2][::-1]
    with pytest.raises(ValueError, match="same questions"):
        vote_curve(runs, [3], [1, 1, 1], 200)


def test_seed_table_and_chosen_by_hand():
    p = load_params(SMOKE, {"evaluate.bootstrap": 200})
    runs = {1: [_rec(0, "a", True), _rec(1, "b", False)], 2: [_rec(0, "a", True), _rec(1, "b", True)],
            3: [_rec(0, "a", False), _rec(1, "b", False)]}
    for recs in runs.values():
        for r in recs:
            r.update(f1=float(r["em"]), turns=1, status="finished")
    table = recipes.seed_table(p, runs).set_index("condition")
    mean = table.loc["mean over 3 seeds"]
    assert mean["em"] == pytest.approx(0.5) and mean["em_seed_sd"] == pytest.approx(0.5)
    assert (mean["em_seed_min"], mean["em_seed_max"]) == (0.0, 1.0)
    assert "gain" not in table
    # Per-question seed means are q0 2/3, q1 1/3. Against a baseline right on q0 only, listed in
    # reverse, the paired differences are -1/3 and +1/3 (paired by file order: +2/3 and -2/3).
    baseline = [_rec(1, "b", False), _rec(0, "a", True)]
    mean = recipes.seed_table(p, runs, baseline).set_index("condition").loc["mean over 3 seeds"]
    assert mean["gain"] == pytest.approx(0.0)
    assert (mean["gain_lo"], mean["gain_hi"]) == (pytest.approx(-1 / 3), pytest.approx(1 / 3))
    with pytest.raises(ValueError, match="baseline must cover"):
        recipes.seed_table(p, runs, baseline[:1])
    assert recipes.chosen({"x": runs[1], "y": runs[2], "z": runs[2]}) == "y"  # ties: the first listed


def test_selection_table_pairs_each_row_with_the_chosen_one(tmp_path):
    """`vs_chosen` is the paired gain over the chosen row, matched by episode id, not file order."""
    p = load_params(SMOKE, [f"output_root={tmp_path}", "evaluate.bootstrap=200"])

    def recs(ems, order=(0, 1, 2, 3)):
        return [{"id": f"q{i}", "em": ems[i], "f1": float(ems[i]), "turns": 1, "status": "finished", "prompt_tokens": 9,
                 "completion_tokens": 3} for i in order]

    # c differs from the chosen b on q3 only; paired by file order it would also differ on q1, q2.
    conds = {"a": recs([1, 0, 0, 0]), "b": recs([1, 1, 0, 1], order=(3, 2, 1, 0)), "c": recs([1, 1, 0, 0])}
    t = recipes.selection_table(p, conds, {"a": {}, "b": {"x": 1}, "c": {}}).set_index("condition")
    assert t["chosen"].tolist() == [False, True, False] and t.loc["b", "settings"] == "x=1"
    assert (t.loc["a", "vs_chosen"], t.loc["c", "vs_chosen"]) == (-0.5, -0.25) and pd.isna(t.loc["b", "vs_chosen"])
    assert t.loc["c", "vs_chosen_hi"] == 0.0 and t.loc["c", "vs_chosen_lo"] < 0


def test_recipe_search_reuses_a_complete_evaluation(tmp_path, multihop_dir):
    """A recipe whose validation episodes are all saved is neither trained nor loaded again."""
    p = load_params(SMOKE, [f"output_root={tmp_path}", "study.select_n=3",
                            "study.recipes={r8: {train.lora_r: 8}}"])
    task = load_task("hotpotqa-wiki", "val", multihop_dir=multihop_dir)
    recs = [{"id": episode_id(task, i), "status": "finished", "em": i % 2 == 0} for i in eval_indices(task, 3)]
    write_jsonl(p.run_dir / "eval" / "recipe_r8.jsonl", recs)
    agent = pipeline.finetuned_agent(p)
    atomic_write_json(p.run_dir / "eval" / "recipe_r8.meta.json", {"key": pipeline.known_key(p, agent, task)})
    assert recipes.recipe_search(p) == {"r8": recs}
    assert not (p.run_dir / "recipes").exists()
    with pytest.raises(ValueError, match=r"recipe_r8.jsonl was made with other settings \(agent.max_turns 3 -> 4\)"):
        recipes.recipe_search(override(p, {"agent.max_turns": 4}))  # its episodes are not the new agent's
    write_jsonl(p.run_dir / "eval" / "recipe_r8.jsonl", recs[:2])  # one missing: not complete
    assert recipes.saved_selection(p, "recipe_r8", agent) is None


def test_seed_model_trains_once_with_its_own_provenance(tmp_path):
    """A training seed's model: the main fine-tune for train.seed, else trained under seeds/s<seed>
    (the real model, 2 LoRA steps) with its own provenance record, and found, not retrained, after.
    It trains in train.dtype, whatever model.dtype says (a decoding choice)."""
    p = load_params(SMOKE, [f"output_root={tmp_path}", "model.dtype=bfloat16"])
    main = tmp_path / "main"
    assert recipes.seed_model(p, p.train.seed, main) == main
    model = recipes.seed_model(p, 7, main)
    assert model == p.run_dir / "seeds" / "s7" / "final" and (model / "train_done.json").is_file()
    assert json.loads((model / "train_done.json").read_text())["params"]["dtype"] == "float32"
    prov = json.loads((p.run_dir / "provenance" / "seeds_s7.json").read_text())
    assert prov["params"]["train"]["seed"] == 7 and not (p.run_dir / "provenance" / "finetune.json").exists()
    stamp = (model / "train_done.json").stat().st_mtime_ns
    assert recipes.seed_model(p, 7, main) == model and (model / "train_done.json").stat().st_mtime_ns == stamp
