"""FireAct's released trajectories as records, both formats, mixing and dataset cards."""

import json

import pytest

from fireact_utils.data import FIREACT_SETS, load_dataset_source, load_fireact, mix, save_dataset
from fireact_utils.io import read_json, read_jsonl
from fireact_utils.trajectories import parse_react_text, react_text, to_alpaca, to_chat


@pytest.mark.parametrize("name", FIREACT_SETS)
def test_released_alpaca_round_trips_and_counts(data_dir, name):
    raw = json.loads((data_dir / "finetune" / "alpaca_format" / f"{name}.json").read_text())
    recs = load_fireact(name, data_dir=data_dir, keep_failed=True)
    assert len(recs) == len(raw) == {"hotpotqa": 500, "hotpotqa_multimethod": 734, "multitask": 1344,
                                     "multitask_multimethod": 2063}[name]
    same = sum(to_alpaca(r) == row for r, row in zip(recs, raw, strict=True))
    # Byte-exact except 10 multitask_multimethod rows whose text breaks the line format.
    assert same >= len(raw) - 10
    kept = load_fireact(name, data_dir=data_dir)
    assert all(r["reward"] is not False for r in kept)
    if name == "multitask_multimethod":
        assert len(recs) - len(kept) == 49  # the rows ending in "reward = False"


def test_released_chat_shapes(data_dir):
    raw = read_jsonl(data_dir / "finetune" / "gpt_format" / "hotpotqa.jsonl")
    recs = load_fireact("hotpotqa", fmt="chat", data_dir=data_dir)
    assert [to_chat(r) for r in recs] == raw
    msgs = raw[0]["messages"]
    assert [m["role"] for m in msgs[:3]] == ["user", "assistant", "user"] and msgs[2]["content"].startswith("Observation: ")
    assert len(load_fireact("hotpotqa_multimethod", fmt="chat", data_dir=data_dir, keep_failed=True)) == 733


def test_labels_and_mixing(data_dir):
    recs = load_fireact("multitask_multimethod", data_dir=data_dir)
    groups = {f"{r['task']}:{r['method']}" for r in recs}
    assert {"hotpotqa:react", "hotpotqa:cot", "mmlu:cot", "strategyqa:react"} <= groups
    m = mix(recs, {"hotpotqa:react": 50, "mmlu:cot": 0.1}, seed=1)
    n_mmlu_cot = sum(1 for r in mix(recs) if f"{r['task']}:{r['method']}" == "mmlu:cot")
    assert sum(r["task"] == "hotpotqa" for r in m) == 50
    assert sum(r["task"] == "mmlu" for r in m) == round(0.1 * n_mmlu_cot)
    assert m == mix(recs, {"hotpotqa:react": 50, "mmlu:cot": 0.1}, seed=1)  # seeded
    assert len({r["question"] for r in m}) == len(m)  # deduplicated
    small, big = mix(recs, n=100), mix(recs, n=200)
    assert big[:100] == small  # scaling subsets are nested
    with pytest.raises(ValueError, match="only"):
        mix(recs, {"strategyqa:cot": 10_000})
    with pytest.raises(ValueError, match="'hotpotqa:rect' matches no trajectories; have: .*hotpotqa:react"):
        mix(recs, {"hotpotqa:rect": 0.5})  # a misspelled key with a ratio weight used to select nothing


def test_save_dataset_writes_both_formats_and_card(tmp_path, data_dir):
    recs = mix(load_fireact("hotpotqa", data_dir=data_dir), n=20)
    out = save_dataset(recs, tmp_path / "ds")
    card = json.loads((out / "card.json").read_text())
    assert card["n"] == 20 and card["by_task_method"] == {"hotpotqa:react": 20}
    assert len(json.loads((out / "alpaca.json").read_text())) == 20
    assert len(read_jsonl(out / "chat.jsonl")) == 20
    assert load_dataset_source(str(out / "trajectories.jsonl")) == recs


def test_react_text_parse_inverse():
    steps = [{"thought": "Find X.", "action": "search", "arg": "X [film]", "observation": "X is a film."},
             {"thought": "Done.", "action": "finish", "arg": "film", "observation": "Episode finished, reward = True"}]
    pre, back = parse_react_text(react_text(steps))
    assert pre == "" and back == steps


def test_generate_with_served_teacher_filters_and_converts(served_model, tmp_path, data_dir):
    """A real teacher behind `transformers serve`, reached through the openai client."""
    from fireact_utils import pipeline
    from fireact_utils.config import load_params
    from fireact_utils.trajectories import parse_chat

    p = load_params("params/smoke.yaml", {
        "output_root": str(tmp_path), "generate.n_questions": 2, "generate.methods": ["react", "cot"],
        "generate.teacher.backend": "openai", "generate.teacher.base_url": served_model.base_url,
        "generate.teacher.model": served_model.model, "generate.teacher.price_per_1k_prompt": 0.03,
        "agent.max_turns": 2, "agent.max_new_tokens": 32})
    summary = pipeline.generate(p, progress=False)
    assert set(summary) == {"hotpotqa:react", "hotpotqa:cot"}
    for s in summary.values():
        assert s["n"] == 2 and s["prompt_tokens"] > 0 and s["cost_usd"] > 0
    eval_q = set(pipeline.eval_indices(pipeline.load_task("hotpotqa", "dev", data_dir), p.evaluate.n_questions,
                                       p.evaluate.seed))
    for f in (p.run_dir / "generate").glob("*.jsonl"):
        recs = read_jsonl(f)
        assert len(recs) == 2 and not {r["idx"] for r in recs} & eval_q  # never trains on eval questions
        for r in recs:  # both formats are pure functions of the record and parse back to it
            pre, steps = parse_react_text(to_alpaca(r)["output"])
            assert steps == r["steps"] and pre == ""
            assert parse_chat(to_chat(r)["messages"]) == (r["question"], r["steps"])
        kept = load_dataset_source(str(f))
        assert [r["id"] for r in kept] == [r["id"] for r in recs if r["reward"]]  # reward filter


def test_generate_in_the_wiki_environment_with_served_teacher(served_model, tmp_path, multihop_dir):
    """Teacher trajectories for questions no recorded search covers: HotpotQA-wiki `train`, the
    teacher behind `transformers serve`, every search answered from the Wikipedia corpus."""
    from fireact_utils import pipeline
    from fireact_utils.config import load_params
    from fireact_utils.tasks import load_task
    from fireact_utils.wiki import WikiSearch

    p = load_params("params/smoke.yaml", {
        "output_root": str(tmp_path), "generate.n_questions": 2, "generate.tasks": ["hotpotqa-wiki"], "generate.split": "train",
        "generate.teacher.backend": "openai", "generate.teacher.base_url": served_model.base_url,
        "generate.teacher.model": served_model.model, "generate.teacher.chat": False,  # few-shot text: it searches
        "agent.max_turns": 2, "agent.max_new_tokens": 48})
    summary = pipeline.generate(p, progress=False)
    assert summary["hotpotqa-wiki:react"]["n"] == 2
    assert summary["hotpotqa-wiki:react"]["environment"]["corpus"] == "hotpotqa (10,708 paragraphs)"
    recs = read_jsonl(p.run_dir / "generate" / "hotpotqa-wiki_react.jsonl")
    train = load_task("hotpotqa-wiki", "train", multihop_dir=multihop_dir)
    assert {r["question"] for r in recs} <= set(train.questions) and {r["split"] for r in recs} == {"train"}
    tool = WikiSearch("hotpotqa", multihop_dir=multihop_dir)
    searches = [s for r in recs for s in r["steps"] if s["action"] == "search"]
    assert searches, "the served teacher made no search"
    for s in searches:  # each observation is what the wiki tool answers for that query
        assert s["observation"] == tool(s["arg"])
    recs_kept = pipeline.build_dataset(p)
    card = read_json(p.run_dir / "dataset" / "card.json")
    assert card["environments"]["fireact:hotpotqa"]["search"] == "serpapi"
    assert card["environments"]["hotpotqa-wiki_react.jsonl"]["search"] == "wiki"
    assert card["n"] == len(recs_kept)
