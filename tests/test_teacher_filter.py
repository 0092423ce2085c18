"""The reward filter between the teacher and the dataset, explained episode by episode.

Episode records come from the real agent loop driven by a scripted model (tests/scripted.py):
one correct answer, one wrong answer, one that searches until max_turns, one that loses the format.
"""

from pathlib import Path

from scripted import ScriptedLLM, by_question

from fireact_utils import pipeline
from fireact_utils.agent import run_episodes
from fireact_utils.config import AgentParams, load_params
from fireact_utils.data import (
    annotated_episode,
    episode_table,
    filter_outcome,
    generated_episodes,
    load_dataset_source,
    load_fireact,
    rejected_example,
)
from fireact_utils.llm import Generation
from fireact_utils.tasks import Task
from fireact_utils.trajectories import react_text

SMOKE = Path(__file__).resolve().parent.parent / "params" / "smoke.yaml"
TOY = Task("toy", "dev", "qa", ["Alpha: who wrote Hamlet?", "Beta: what is the capital of France?",
                                "Gamma: how tall is Everest?", "Delta: who painted the Mona Lisa?"],
           ["William Shakespeare", "Paris", "8,849 m", "Leonardo da Vinci"])
SCRIPT = {
    "Alpha": ["Thought: Search it.\nAction: search[Hamlet]", "Thought: Found it.\nAction: finish[William Shakespeare]"],
    "Beta": ["Thought: I know this.\nAction: finish[Lyon]"],
    "Gamma": ["Thought: Search more.\nAction: search[Everest height]"],
    "Delta": ["Thought: Hmm.\nAction: dance[Mona Lisa]"],
}
AGENT = AgentParams(max_turns=3, n_exemplars=1)


def toy_episodes(out: Path, llm=None) -> list[dict]:
    """The four scripted episodes, saved as a teacher run saves them (generate/<task>_<method>.jsonl)."""
    llm = llm or ScriptedLLM(by_question(SCRIPT))
    return run_episodes(TOY, range(4), llm, lambda q: f"Results for {q}.", AGENT, out, progress=False)


def test_each_episode_gets_its_outcome_and_reason(tmp_path):
    recs = toy_episodes(tmp_path / "generate" / "toy_react.jsonl")
    table = episode_table(generated_episodes(tmp_path / "generate"))
    assert list(table["status"]) == ["finished", "finished", "max_turns", "parse_error"]
    assert list(table["outcome"]) == ["kept", "wrong answer", "max_turns", "parse_error"]
    assert list(table["turns"]) == [r["turns"] for r in recs] == [2, 1, 3, 3]
    reasons = list(table["reason"])
    assert reasons[0] == "correct: 'William Shakespeare' vs gold 'William Shakespeare'"
    assert reasons[1] == "finished with a wrong answer: 'Lyon' vs gold 'Paris' (F1 0.00)"
    assert "no finish[...] in 3 turns (agent.max_turns)" in reasons[2]
    assert "unknown tool dance" in reasons[3]
    # The table and the dataset's filter agree: what it calls kept is exactly what training reads.
    kept = {r["id"] for r in load_dataset_source(str(tmp_path / "generate" / "toy_react.jsonl"))}
    assert kept == set(table.loc[table["outcome"] == "kept", "id"]) == {recs[0]["id"]}


def test_a_rerun_episode_counts_once_as_its_newest_record(tmp_path):
    """An api_error episode is re-run and appended again; the table shows the newest record only."""
    out = tmp_path / "generate" / "toy_react.jsonl"
    down = ScriptedLLM(lambda text: Generation("", 0, 0, error="HTTP 503"))
    assert [r["status"] for r in toy_episodes(out, down)] == ["api_error"] * 4
    assert filter_outcome(generated_episodes(out.parent)[0]) == ("api_error", "never finished: api error, last: 'HTTP 503'")
    toy_episodes(out)
    assert len(out.read_text().splitlines()) == 8
    assert list(episode_table(generated_episodes(out.parent))["outcome"]) == [
        "kept", "wrong answer", "max_turns", "parse_error"]


def test_the_rejected_example_is_annotated(tmp_path):
    recs = toy_episodes(tmp_path / "toy_react.jsonl")
    chosen = rejected_example(recs)
    assert chosen["id"] == recs[1]["id"]  # the well-formed wrong answer comes before the lost format
    text = annotated_episode(chosen)
    assert text.startswith("Question: Beta: what is the capital of France?\nGold answer: Paris\n")
    assert react_text(chosen["steps"]) in text and "'Lyon' vs gold 'Paris'" in text
    assert rejected_example([recs[0], recs[3]])["id"] == recs[3]["id"]
    assert rejected_example([recs[0]]) is None and "No episode was dropped" in annotated_episode(None)
    assert "unknown tool dance" in annotated_episode(recs[3])  # the step errors are listed


def test_released_failures_are_explained_without_a_status(data_dir):
    """FireAct's multimethod file holds reward-False rows: no status, no gold, the answer in the last step."""
    failed = [r for r in load_fireact("hotpotqa_multimethod", data_dir=data_dir, keep_failed=True) if r["reward"] is False]
    assert failed
    outcome, reason = filter_outcome(failed[0])
    assert outcome == "wrong answer" and reason == f"finished with a wrong answer: {failed[0]['steps'][-1]['arg']!r}"


def test_teacher_episodes_false_keeps_the_released_data_alone(tmp_path, data_dir):
    """dataset.teacher_episodes: the demo's data stays FireAct's 500 trajectories even after the teacher ran."""
    toy_episodes(tmp_path / "smoke" / "generate" / "toy_react.jsonl")
    on = load_params(SMOKE, [f"output_root={tmp_path}"])
    off = load_params(SMOKE, [f"output_root={tmp_path}", "dataset.teacher_episodes=false"])
    released = load_fireact("hotpotqa", data_dir=data_dir)
    pool_on, envs_on = pipeline.dataset_pool(on)
    pool_off, envs_off = pipeline.dataset_pool(off)
    assert pool_off == released and list(envs_off) == ["fireact:hotpotqa"]
    assert pool_on[:500] == released and [r["question"] for r in pool_on[500:]] == [TOY.questions[0]]
    assert "toy_react.jsonl" in envs_on
