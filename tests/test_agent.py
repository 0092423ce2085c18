"""The agent loop: real model episodes (local and served), resume, malformed generations, reflexion.

Real-model episodes are few and short (max_turns 2, a couple dozen tokens): they check the
plumbing and the records, not accuracy. Malformed output is driven by a scripted model through
the real `run_episodes`, one episode per failure kind, all in one batch.
"""

from __future__ import annotations

import pytest
from scripted import CountingLLM, ScriptedLLM, by_question

from fireact_utils.agent import EXIT_STATUSES, INVALID_ACTION, MAX_TOOL_ERRORS, run_episodes, summarize
from fireact_utils.config import AgentParams, LLMParams
from fireact_utils.io import read_jsonl
from fireact_utils.llm import Generation, OpenAIBackend
from fireact_utils.tasks import Task, eval_indices, load_task
from fireact_utils.tools import RecordedSearch

# What every record carries: the Episode fields (t_start dropped) and the scoring/run context.
RECORD_FIELDS = {
    "id", "idx", "question", "gold", "method", "steps", "answer", "status", "trial", "reflections",
    "pending_thought", "prompt_tokens", "completion_tokens", "llm_calls", "tool_calls", "tool_errors", "errors",
    "wall_s", "task", "split", "mode", "format", "model", "turns", "em", "f1", "pred", "gt", "reward",
}
STEP_FIELDS = {"thought", "action", "arg", "observation"}


@pytest.fixture(scope="module")
def hotpot(data_dir) -> Task:
    return load_task("hotpotqa", "dev", data_dir)


@pytest.fixture(scope="module")
def search(data_dir, tmp_path_factory) -> RecordedSearch:
    with pytest.MonkeyPatch.context() as mp:  # the extracted-pairs cache goes to a temp dir
        mp.setenv("FIREACT_CACHE", str(tmp_path_factory.mktemp("cache")))
        return RecordedSearch(data_dir)


def _check_records(records: list[dict], method: str, ids: list[str]) -> None:
    assert [r["id"] for r in records] == ids
    for r in records:
        assert set(r) == RECORD_FIELDS
        assert r["status"] in EXIT_STATUSES and r["method"] == method
        assert r["llm_calls"] >= 1 and r["prompt_tokens"] > 0
        assert r["turns"] == len(r["steps"]) and all(set(s) == STEP_FIELDS for s in r["steps"])
        assert r["reward"] == r["em"] and 0.0 <= r["f1"] <= 1.0
        if r["status"] == "finished":
            assert r["answer"] is not None and r["steps"][-1]["action"] == "finish"
        else:
            assert r["answer"] is None and not r["em"]


# ---------------------------------------------------------------- real model


def test_react_local_episodes_and_resume(local_llm, hotpot, search, tmp_path):
    idx = eval_indices(hotpot, 3)
    ids = [f"hotpotqa/dev/{i}" for i in idx]
    params = AgentParams(method="react", max_turns=2, max_new_tokens=24)
    out = tmp_path / "react.jsonl"
    llm = CountingLLM(local_llm)
    records = run_episodes(hotpot, idx, llm, search, params, out, progress=False)
    _check_records(records, "react", ids)
    assert llm.calls >= 1 and all(r["turns"] <= 2 for r in records)
    saved = read_jsonl(out)
    assert sorted(r["id"] for r in saved) == sorted(ids)  # one line per episode, in finishing order
    assert {r["id"]: r for r in saved} == {r["id"]: r for r in records}

    again = CountingLLM(local_llm)
    assert run_episodes(hotpot, idx, again, search, params, out, progress=False) == records
    assert again.calls == 0  # everything was saved: nothing is generated
    assert len(read_jsonl(out)) == 3  # and nothing appended


def _served_backend(served, chat: bool) -> OpenAIBackend:
    return OpenAIBackend(LLMParams(backend="openai", base_url=served.base_url, model=served.model, chat=chat,
                                   timeout_s=120, max_retries=1, concurrency=2))


@pytest.mark.parametrize("method, mode, chat", [
    ("cot", "fewshot", True),
    # Fine-tuned (Alpaca) prompts are ~10x shorter than the few-shot ones: cheap multi-turn episodes.
    ("react", "finetuned", False),
    ("react", "fewshot", True),
])
def test_served_episodes(served_model, hotpot, search, tmp_path, method, mode, chat):
    idx = eval_indices(hotpot, 2)
    llm = _served_backend(served_model, chat=chat)
    params = AgentParams(method=method, mode=mode, max_turns=2, max_new_tokens=16)
    records = run_episodes(hotpot, idx, llm, search, params, tmp_path / "out.jsonl", progress=False)
    _check_records(records, method, [f"hotpotqa/dev/{i}" for i in idx])
    assert all(r["model"] == served_model.model and r["completion_tokens"] > 0 for r in records)
    assert not any(r["status"] == "api_error" for r in records), [r["errors"] for r in records]
    if method == "cot":  # no tool: one generation decides the episode
        assert all(r["turns"] == 1 and r["tool_calls"] == 0 for r in records)
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 2


# ---------------------------------------------------------------- malformed generations, scripted


def _toy_task(markers: list[str]) -> Task:
    return Task("toy", "dev", "qa", [f"What about {m}?" for m in markers], ["Paris"] * len(markers))


def _search(query: str) -> str:
    if "boom" in query:
        raise RuntimeError("search backend down")
    return f"Results for {query}: Paris is the capital of France."


MALFORMED = {
    # marker: (scripted replies, expected status, expected answer)
    "noaction": (["Thought: I am not sure what to do."], "parse_error", None),
    "nobrackets": (["Thought: I know it.\nAction: finish Paris"], "finished", "Paris"),
    "unknowntool": (["Thought: look it up.\nAction: lookup[Paris]"], "parse_error", None),
    "unbalanced": (["Action: search[capital of France", "Action: finish[Paris"], "finished", "Paris"),
    "empty": ([""], "parse_error", None),
    "forced": (["Thought: I should search.", "search[capital of France]", "Thought: found it.", "finish[Paris]"],
               "finished", "Paris"),
    "apierror": ([Generation("", error="RateLimitError: injected (after 6 retries)")], "api_error", None),
    "toolraises": (["Action: search[boom]"], "tool_error", None),
}


def test_malformed_generations_end_with_the_right_status(tmp_path):
    markers = list(MALFORMED)
    task = _toy_task(markers)
    llm = ScriptedLLM(by_question({m: replies for m, (replies, _, _) in MALFORMED.items()}))
    params = AgentParams(method="react", mode="finetuned", max_turns=6)
    records = run_episodes(task, range(len(markers)), llm, _search, params, tmp_path / "out.jsonl", progress=False)
    by_marker = dict(zip(markers, records, strict=True))
    for m, (_, status, answer) in MALFORMED.items():
        assert (by_marker[m]["status"], by_marker[m]["answer"]) == (status, answer), m
    assert len(read_jsonl(tmp_path / "out.jsonl")) == len(markers)

    assert [s["observation"] for s in by_marker["empty"]["steps"]] == [INVALID_ACTION] * 3
    unknown = by_marker["unknowntool"]
    assert len(unknown["steps"]) == 3 and unknown["steps"][0]["action"] == "lookup"
    assert unknown["steps"][0]["observation"].startswith("Unknown tool 'lookup'")
    assert unknown["tool_calls"] == 0
    assert by_marker["unbalanced"]["steps"][0]["arg"] == "capital of France"
    assert by_marker["unbalanced"]["em"] is True
    forced = by_marker["forced"]  # Thought-only generations get an "Action:" prompt, as in ReAct
    assert [(s["thought"], s["action"], s["arg"]) for s in forced["steps"]] == [
        ("I should search.", "search", "capital of France"), ("found it.", "finish", "Paris")]
    assert forced["llm_calls"] == 4 and forced["pending_thought"] is None
    assert by_marker["apierror"]["errors"] == ["RateLimitError: injected (after 6 retries)"]
    tool = by_marker["toolraises"]
    assert tool["tool_calls"] == MAX_TOOL_ERRORS == len(tool["steps"])
    assert all("RuntimeError: search backend down" in e for e in tool["errors"])
    assert tool["steps"][-1]["observation"].startswith("Search failed")
    summary = summarize(records)
    assert (summary["status_finished"], summary["status_parse_error"], summary["status_api_error"],
            summary["status_tool_error"], summary["status_max_turns"]) == (3, 3, 1, 1, 0)


def test_cot_without_action_is_a_parse_error_at_once():
    task = _toy_task(["rambling", "sotheanswer"])
    llm = ScriptedLLM(by_question({"rambling": ["Thought: many things are true."],
                                   "sotheanswer": ["Thought: it is in France. So the answer is Paris."]}))
    records = run_episodes(task, [0, 1], llm, None, AgentParams(method="cot", mode="finetuned"), progress=False)
    assert [(r["status"], r["answer"], r["turns"]) for r in records] == [("parse_error", None, 1), ("finished", "Paris", 1)]


def test_max_turns_ends_an_episode_that_keeps_searching():
    task = _toy_task(["loop"])
    llm = ScriptedLLM(by_question({"loop": ["Action: search[capital of France]"]}))
    (rec,) = run_episodes(task, [0], llm, _search, AgentParams(mode="finetuned", max_turns=3), progress=False)
    assert (rec["status"], rec["turns"], rec["tool_calls"], rec["llm_calls"]) == ("max_turns", 3, 3, 3)


def test_reflexion_second_attempt_succeeds():
    task = _toy_task(["zanzibar"])
    script = ["Thought: guessing.\nAction: finish[Rome]",
              "I guessed without searching; next time I will search first.",
              "Thought: Paris it is.\nAction: finish[Paris]"]
    llm = ScriptedLLM(by_question({"zanzibar": script}))
    params = AgentParams(method="reflexion", mode="fewshot", reflexion_trials=2)
    (rec,) = run_episodes(task, [0], llm, _search, params, progress=False)
    assert (rec["status"], rec["answer"], rec["em"], rec["trial"]) == ("finished", "Paris", True, 1)
    assert rec["reflections"] == [script[1]]
    assert rec["llm_calls"] == 3 and len(rec["steps"]) == 1  # steps are the last attempt's
    assert "Reflection: I guessed without searching" in llm.prompts[-1]  # the retry sees its reflection
    assert "Reflection:" not in llm.prompts[0]


def test_reflexion_stops_after_its_trials():
    task = _toy_task(["stubborn"])
    llm = ScriptedLLM(by_question({"stubborn": ["Action: finish[Rome]", "Wrong again.", "Action: finish[Rome]"]}))
    params = AgentParams(method="reflexion", mode="fewshot", reflexion_trials=2)
    (rec,) = run_episodes(task, [0], llm, _search, params, progress=False)
    assert (rec["status"], rec["answer"], rec["em"], rec["trial"], len(rec["reflections"])) == (
        "finished", "Rome", False, 1, 1)


def test_reflexion_retry_starts_with_a_clean_tool_error_count():
    task = _toy_task(["flaky"])
    script = ["Action: search[boom]"] * MAX_TOOL_ERRORS + [
        "The search tool failed; try once more.",
        "Action: search[boom]",  # one failure in the new attempt must not end it
        "Action: search[capital of France]",
        "Action: finish[Paris]",
    ]
    llm = ScriptedLLM(by_question({"flaky": script}))
    params = AgentParams(method="reflexion", mode="fewshot", reflexion_trials=2, max_turns=6)
    (rec,) = run_episodes(task, [0], llm, _search, params, progress=False)
    assert (rec["status"], rec["answer"], rec["trial"], rec["tool_errors"]) == ("finished", "Paris", 1, 0)
    assert [s["action"] for s in rec["steps"]] == ["search", "search", "finish"]
