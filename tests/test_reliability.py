"""Reliability: a killed rollout resumes without loss or duplicates; API faults from a real
fault-injecting HTTP server are retried, bounded and recorded; bad input fails naming the culprit;
API keys never leak. Sleeps stay tiny (Retry-After 0 or 0.1, sub-second timeouts)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scripted import ScriptedLLM, staged_reply, staged_search, staged_task, wiki_reply
from servers import Fault, FaultServer

from fireact_utils.agent import run_episodes
from fireact_utils.config import AgentParams, LLMParams, ParamsError, load_params
from fireact_utils.io import DataFileError, iter_jsonl, read_jsonl
from fireact_utils.llm import OpenAIBackend
from fireact_utils.pipeline import run_condition

TESTS_DIR = Path(__file__).resolve().parent
FAKE_KEY = "sk-test-fake-0123456789abcdef"
STOP = ["\nObservation", "\nQuestion:"]
PARAMS = AgentParams(method="react", mode="finetuned", max_turns=8)  # short prompts, no exemplars


def _backend(fs: FaultServer, **kw) -> OpenAIBackend:
    p = {"backend": "openai", "base_url": fs.base_url, "model": "canned", "chat": False, "max_retries": 3,
         "retry_budget_s": 5.0, "timeout_s": 10.0, "concurrency": 4, **kw}
    return OpenAIBackend(LLMParams(**p))


# ---------------------------------------------------------------- (a) kill and resume

ROLLOUT_SCRIPT = """
import sys
sys.path.insert(0, {tests_dir!r})
from scripted import ScriptedLLM, staged_reply, staged_search, staged_task
from fireact_utils.agent import run_episodes
from fireact_utils.config import AgentParams

task = staged_task({n})
llm = ScriptedLLM(staged_reply, delay_s={delay})  # one turn per `delay` s: one episode saved per turn
run_episodes(task, range({n}), llm, staged_search, AgentParams(mode="finetuned", max_turns=8), {out!r}, progress=False)
"""


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().count("\n") >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"rollout exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} episodes saved after {timeout_s} s")


def test_killed_rollout_resumes_without_loss_or_duplicates(tmp_path):
    n, out = 6, tmp_path / "rollout.jsonl"
    script = tmp_path / "rollout.py"
    script.write_text(ROLLOUT_SCRIPT.format(tests_dir=str(TESTS_DIR), n=n, delay=0.5, out=str(out)))
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE)
    try:
        _wait_for_lines(out, 2, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    before = read_jsonl(out)
    assert 2 <= len(before) < n, "the kill should land mid-run"
    # A kill during a write leaves half a record and no newline.
    torn = json.dumps({"id": f"staged/dev/{n - 1}", "question": "Question #5", "steps": []})[:30]
    with open(out, "a") as f:
        f.write(torn)

    llm = ScriptedLLM(staged_reply)
    with pytest.warns(UserWarning, match="torn last line"):
        records = run_episodes(staged_task(n), range(n), llm, staged_search, PARAMS, out, progress=False)
    ids = [f"staged/dev/{k}" for k in range(n)]
    assert [r["id"] for r in records] == ids
    assert all(r["status"] == "finished" and r["em"] for r in records)
    saved = list(iter_jsonl(out, tolerate_torn_tail=False))  # the torn tail is gone, not glued to a record
    assert sorted(r["id"] for r in saved) == ids  # nothing lost, nothing twice
    assert saved[: len(before)] == before  # saved episodes are kept as they were
    redone = {int(p.split("Question #", 1)[1].split(":")[0]) for p in llm.prompts}
    assert redone == {r["idx"] for r in saved[len(before):]}  # only unsaved episodes were generated


CONDITION_SCRIPT = """
import sys
sys.path.insert(0, {tests_dir!r})
from scripted import ScriptedLLM, wiki_reply
from fireact_utils import pipeline
from fireact_utils.config import AgentParams, load_params

pipeline.META_EVERY_S = 0.0  # rewrite the meta at every saved episode
p = load_params("params/smoke.yaml", {{"output_root": {root!r}}})
pipeline.run_condition(p, "killed", ScriptedLLM(wiki_reply, delay_s={delay}), AgentParams(max_turns=6),
                       task="hotpotqa-wiki", n={n}, progress=False)
"""


def test_killed_condition_keeps_its_seconds_and_tool_calls(tmp_path):
    """A condition killed mid-run has already written what its saved episodes cost, so a resumed
    sample's seconds per episode are not those of its last few episodes alone."""
    n, root = 8, tmp_path / "runs"
    script = tmp_path / "condition.py"
    script.write_text(CONDITION_SCRIPT.format(tests_dir=str(TESTS_DIR), root=str(root), n=n, delay=0.5))
    out = root / "smoke" / "eval" / "killed.jsonl"
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, cwd=TESTS_DIR.parent)
    try:
        _wait_for_lines(out, 2, proc, timeout_s=120)
        time.sleep(0.2)  # past the meta write that follows the second record
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    killed = json.loads(out.with_suffix(".meta.json").read_text())
    saved = read_jsonl(out, skip_bad=True)
    assert 2 <= killed["episodes_run"] == len(saved) < n, "the kill should land mid-run, after a meta write"
    assert killed["wall_s"] >= 0.5 and killed["tool"]["calls"] >= len(saved)

    p = load_params("params/smoke.yaml", {"output_root": str(root)})
    run_condition(p, "killed", ScriptedLLM(wiki_reply), AgentParams(max_turns=6), task="hotpotqa-wiki", n=n,
                  progress=False)
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    assert meta["episodes_run"] == n == len(read_jsonl(out))
    assert meta["wall_s"] > killed["wall_s"] and meta["tool"]["calls"] > killed["tool"]["calls"]
    assert "fidelity" in meta  # the resumed run's final write covers every episode


def test_complete_last_record_without_newline_is_kept(tmp_path):
    out = tmp_path / "rollout.jsonl"
    first = run_episodes(staged_task(2), [0], ScriptedLLM(staged_reply), staged_search, PARAMS, out, progress=False)
    out.write_text(out.read_text().rstrip("\n"))  # e.g. edited by hand
    llm = ScriptedLLM(staged_reply)
    records = run_episodes(staged_task(2), [0, 1], llm, staged_search, PARAMS, out, progress=False)
    assert records[0] == first[0] and all("Question #0" not in p for p in llm.prompts)
    assert [r["id"] for r in iter_jsonl(out, tolerate_torn_tail=False)] == ["staged/dev/0", "staged/dev/1"]


def test_resume_refuses_a_corrupt_results_file(tmp_path):
    out = tmp_path / "rollout.jsonl"
    out.write_text('{"id": "staged/dev/0"}\n{"id": oops\n{"id": "staged/dev/1"}\n')
    with pytest.raises(DataFileError, match=r"rollout\.jsonl at line 2"):
        run_episodes(staged_task(3), range(3), ScriptedLLM(staged_reply), staged_search, PARAMS, out, progress=False)


# ---------------------------------------------------------------- (b) API faults


def test_429_with_retry_after_then_success():
    with FaultServer([Fault("429", times=2, retry_after="0.1")]) as fs:
        llm = _backend(fs)
        t0 = time.monotonic()
        (g,) = llm.generate(["Question: hi"], STOP, max_new_tokens=8)
        elapsed = time.monotonic() - t0
        assert fs.outcomes() == ["429", "429", "canned"]
    assert g.error is None and g.text == "Thought: canned.\nAction: finish[canned]"
    assert g.prompt_tokens > 0 and g.completion_tokens > 0
    assert llm.retries == 2 and llm.failures == []
    assert 0.2 <= elapsed < 3.0  # Retry-After honoured, not replaced by the (1 s+) backoff


def test_unusable_retry_after_falls_back_to_backoff():
    # A negative Retry-After once made time.sleep raise, crashing the whole batch.
    with FaultServer([Fault("429", times=1, retry_after="-1")]) as fs:
        llm = _backend(fs)
        (g,) = llm.generate(["hi"], STOP, max_new_tokens=8)
    assert g.error is None and llm.retries == 1


def test_500s_beyond_max_retries_fail_only_that_episode(tmp_path):
    n = 3
    faults = [Fault("500", times=100, match="Question #1:", retry_after="0")]
    with FaultServer(faults, reply=lambda req: staged_reply(req["prompt"])) as fs:
        llm = _backend(fs, max_retries=2)
        records = run_episodes(staged_task(n), range(n), llm, staged_search, PARAMS, tmp_path / "o.jsonl",
                               progress=False)
        assert fs.outcomes().count("500") == 3  # first try + 2 retries
    assert [r["status"] for r in records] == ["finished", "api_error", "finished"]
    (err,) = records[1]["errors"]
    assert err.startswith("InternalServerError") and "server error (injected)" in err and "after 2 retries" in err
    assert llm.failures == [err] and llm.retries == 2
    assert records[2]["em"] and records[2]["turns"] == 3  # the others ran their full course
    assert len(read_jsonl(tmp_path / "o.jsonl")) == n


def test_backoff_never_exceeds_the_retry_budget():
    # No Retry-After: the first backoff (0.5-1.5 s) would overrun a 0.2 s budget, so give up now.
    with FaultServer([Fault("500", times=10, retry_after=None)]) as fs:
        llm = _backend(fs, max_retries=5, retry_budget_s=0.2)
        t0 = time.monotonic()
        (g,) = llm.generate(["hi"], STOP, max_new_tokens=8)
        assert time.monotonic() - t0 < 0.5 and fs.outcomes() == ["500"]
    assert "after 0 retries" in g.error and llm.retries == 0


def test_slow_responses_time_out_retry_and_fail_within_bounds():
    timeout_s, max_retries, budget = 0.3, 1, 2.0
    with FaultServer([Fault("slow", times=10, delay_s=2.0)]) as fs:
        llm = _backend(fs, timeout_s=timeout_s, max_retries=max_retries, retry_budget_s=budget)
        t0 = time.monotonic()
        (g,) = llm.generate(["hi"], STOP, max_new_tokens=8)
        elapsed = time.monotonic() - t0
        assert fs.outcomes() == ["slow", "slow"]
    assert g.text == "" and g.error.startswith("APITimeoutError") and "after 1 retries" in g.error
    assert llm.retries == 1
    # Worst case: every attempt waits out its timeout, plus at most the backoff budget.
    assert elapsed < timeout_s * (max_retries + 1) + budget + 1.0


def test_dropped_connection_is_retried():
    with FaultServer([Fault("drop", times=1)]) as fs:
        llm = _backend(fs)
        (g,) = llm.generate(["hi"], STOP, max_new_tokens=8)
        assert fs.outcomes() == ["drop", "canned"]
    assert g.error is None and g.text.endswith("finish[canned]") and llm.retries == 1


def test_fault_proxy_in_front_of_the_real_server(served_model):
    def backend(base_url: str) -> OpenAIBackend:
        return OpenAIBackend(LLMParams(backend="openai", base_url=base_url, model=served_model.model, chat=False,
                                       max_retries=2, timeout_s=120))

    (direct,) = backend(served_model.base_url).generate(["1, 2, 3,"], [], max_new_tokens=4)
    with FaultServer([Fault("429", times=1, retry_after="0")], upstream=served_model.base_url) as fs:
        llm = backend(fs.base_url)
        (g,) = llm.generate(["1, 2, 3,"], [], max_new_tokens=4)
        assert fs.outcomes() == ["429", "forwarded"]
    assert g.error is None and g.text == direct.text and g.completion_tokens == direct.completion_tokens
    assert llm.retries == 1


# ---------------------------------------------------------------- (c) bad input


def test_malformed_jsonl_names_path_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": 1}\n{"a": \n[1, 2]\n{"a": 4}\n')
    with pytest.raises(DataFileError, match=r"data\.jsonl at line 2"):
        list(iter_jsonl(path))
    with pytest.warns(UserWarning, match="skipped 2 malformed line"):
        assert list(iter_jsonl(path, skip_bad=True)) == [{"a": 1}, {"a": 4}]
    with pytest.raises(DataFileError, match="file not found"):
        list(iter_jsonl(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("overrides, key", [
    ({"agent.max_turn": 3}, "agent.max_turn"),  # misspelled: must not leave the default in force
    ({"agent.max_turns": "many"}, "agent.max_turns"),
    ({"llm.timeout_s": -1}, "llm.timeout_s"),
    ({"llm.api_key_env": FAKE_KEY}, "api_key_env"),  # a key where the variable's name belongs
])
def test_invalid_params_name_the_key(overrides, key):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")) as e:
        load_params(None, overrides)
    assert FAKE_KEY not in str(e.value)


def test_invalid_params_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("agent:\n  max_turns: 4\n  temprature: 0.7\n")
    with pytest.raises(ParamsError, match=r"bad\.yaml[\s\S]*agent\.temprature"):
        load_params(path)


# ---------------------------------------------------------------- (d) secrets


def test_api_key_never_leaks(monkeypatch, tmp_path):
    monkeypatch.setenv("FIREACT_TEST_KEY", FAKE_KEY)
    # A careless server echoes the Authorization header into its 401 body.
    with FaultServer([Fault("echo_auth", times=10)]) as fs:
        params = LLMParams(backend="openai", base_url=fs.base_url, model="canned", api_key_env="FIREACT_TEST_KEY",
                           max_retries=3)
        llm = OpenAIBackend(params)
        records = run_episodes(staged_task(1), [0], llm, staged_search, PARAMS, tmp_path / "o.jsonl", progress=False)
        assert fs.auth_seen == [f"Bearer {FAKE_KEY}"]  # the key was really sent, once: 401 is not retried
    assert records[0]["status"] == "api_error"
    err = records[0]["errors"][0]
    assert err.startswith("AuthenticationError") and "Bearer ***" in err
    full = load_params(None, {"llm": params.model_dump()})
    for text in (err, repr(llm), str(vars(llm)), params.model_dump_json(), json.dumps(full.dump()),
                 "\n".join(llm.failures), (tmp_path / "o.jsonl").read_text()):
        assert FAKE_KEY not in text
