"""Tasks: metrics on hand-worked cases and against FireAct's recorded scores, loaders on the real data."""

import json
import re
from pathlib import Path

import pytest

from fireact_utils.io import DataFileError
from fireact_utils.tasks import (
    KINDS,
    METHODS,
    PROMPT_DIR,
    Task,
    choice_letter,
    eval_indices,
    exact_match,
    f1_score,
    fewshot_prompt,
    load_task,
    mmlu_subjects,
    normalize_answer,
    yes_no,
)

# ----------------------------------------------------------------------------
# metrics, hand-worked


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("The  Eiffel Tower!", "eiffel tower"),
        ("U.S.A.", "usa"),
        ("an apple, the pie and a cake", "apple pie and cake"),
        ("Theory of Anne", "theory of anne"),  # articles only as whole words
        ("  Seth\tMacFarlane\n", "seth macfarlane"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match():
    assert exact_match("The Beatles", "beatles")
    assert exact_match("Yes.", "yes")
    assert not exact_match("the Beatles band", "Beatles")


@pytest.mark.parametrize(
    "pred, gold, f1",
    [
        ("Barack Obama", "Obama", 2 * 0.5 * 1.0 / 1.5),  # precision 1/2, recall 1/1
        ("the cat sat", "cat sat on mat", 2 * 1.0 * 0.5 / 1.5),  # precision 2/2, recall 2/4
        ("x y y", "y y z", 2 / 3),  # repeated tokens count as often as they occur on both sides
        ("Paris", "London", 0.0),
        ("Yes.", "yes", 1.0),
        ("", "", 0.0),  # no common token, as in the HotpotQA script
    ],
)
def test_f1_score(pred, gold, f1):
    assert f1_score(pred, gold) == pytest.approx(f1)


def test_f1_yes_no_rule():
    # token overlap would give 2/3, but yes/no/noanswer get no partial credit on either side
    assert f1_score("yes sir", "yes") == 0.0
    assert f1_score("no", "no idea") == 0.0
    assert f1_score("noanswer", "the noanswer case") == 0.0
    assert f1_score("no", "No!") == 1.0


def test_yes_no_and_choice_letter():
    assert yes_no("Yes, because it is.") == "yes"
    assert yes_no("NO") == "no"
    assert yes_no("nope") == "nope"
    assert yes_no("Not really") == "not really"
    for ans in ["B", "(B)", "B. sight", "b)", "b", "( b )", "Answer: B", "The answer is B.", "option b"]:
        assert choice_letter(ans) == "B", ans
    for ans in ["Because", "E", "a dog", "", "sight"]:
        assert choice_letter(ans) is None, ans


# ----------------------------------------------------------------------------
# against FireAct's recorded evaluation runs


def _traj_files(data_dir: Path) -> list[Path]:
    files = sorted((data_dir / "trajs").glob("*.json"))
    assert len(files) == 3
    return files


def test_recorded_em_f1(data_dir):
    checked = 0
    for path in _traj_files(data_dir):
        for key, rec in json.loads(path.read_text()).items():
            # FireAct's files hold booleans and numbers; accept their string forms too
            em = rec["em"] if isinstance(rec["em"], bool) else rec["em"] == "True"
            assert exact_match(rec["pred"], rec["gt"]) == em, (path.name, key)
            assert f1_score(rec["pred"], rec["gt"]) == pytest.approx(float(rec["f1"]), abs=1e-6), (path.name, key)
            checked += 1
    assert checked == 500 + 499 + 465


def test_eval_indices_reproduce_fireact_dev500(data_dir):
    task = load_task("hotpotqa", "dev")
    idx = eval_indices(task, 500)
    assert idx == eval_indices(7405, 500) and len(set(idx)) == 500
    sizes = {}
    for path in _traj_files(data_dir):
        recs = json.loads(path.read_text())
        keys = {int(k) for k in recs}
        assert keys <= set(idx), path.name
        sizes[len(keys)] = keys
        # the recorded gold is our gold, normalized
        assert all(rec["gt"] == task.evaluate(int(k), "")["gt"] for k, rec in recs.items())
    assert sorted(sizes) == [465, 499, 500]
    assert sizes[500] == set(idx)


def test_eval_indices_edges():
    assert eval_indices(10, 10) != list(range(10)) and sorted(eval_indices(10, 10)) == list(range(10))
    assert eval_indices(10, 3) == eval_indices(10, 10)[:3]
    assert eval_indices(10, 3, seed=1) != eval_indices(10, 3)
    assert eval_indices(5, 50) == eval_indices(5, 5)  # n beyond the task takes all
    with pytest.raises(ValueError, match="n must be"):
        eval_indices(5, -1)


# ----------------------------------------------------------------------------
# loading the real data


@pytest.mark.parametrize(
    "name, split, n, kind, labeled",
    [
        ("hotpotqa", "dev", 7405, "qa", True),
        ("hotpotqa", "test", 7405, "qa", False),
        ("bamboogle", "test", 125, "qa", True),
        ("strategyqa", "dev", 229, "yesno", True),
        ("strategyqa", "train", 2821, "yesno", True),
        ("strategyqa", "test", 490, "yesno", False),
        ("mmlu", "dev", 57 * 5, "mc", True),
        ("mmlu", "val", 1531, "mc", True),
        ("mmlu", "test", 14042, "mc", True),
        ("mmlu:anatomy", "test", 135, "mc", True),
    ],
)
def test_load_counts(data_dir, name, split, n, kind, labeled):
    task = load_task(name, split)
    assert (len(task), len(task.answers), task.kind, task.labeled, task.split) == (n, n, kind, labeled, split)
    assert all(isinstance(q, str) and q for q in task.questions)
    assert all(a for a in task.answers) == labeled


def test_default_splits_and_subjects(data_dir):
    splits = {name: load_task(name).split for name in ("hotpotqa", "bamboogle", "strategyqa", "mmlu:virology")}
    assert splits == {"hotpotqa": "dev", "bamboogle": "test", "strategyqa": "dev", "mmlu:virology": "test"}
    for split in ("dev", "val", "test"):
        subjects = mmlu_subjects(split)
        assert len(subjects) == 57 and "anatomy" in subjects and "high_school_us_history" in subjects


def test_hotpotqa_scoring(data_dir):
    task = load_task("hotpotqa")
    assert task.questions[0].startswith("Were Scott Derrickson and Ed Wood")
    assert task.evaluate(0, "Yes.") == {"em": True, "f1": 1.0, "pred": "yes", "gt": "yes"}
    assert task.evaluate(0, None)["em"] is False
    with pytest.raises(ValueError, match="no gold answers"):
        load_task("hotpotqa", "test").evaluate(0, "yes")


def test_bamboogle_row(data_dir):
    task = load_task("bamboogle")
    assert task.questions[0].startswith("Who was president of the United States in the year that Citibank")
    assert task.evaluate(0, "James Madison")["em"]


def test_strategyqa_scoring(data_dir):
    task = load_task("strategyqa")
    assert task.questions[0].startswith("Will the Albany in Georgia")
    assert task.answers[0] == "no" and set(task.answers) == {"yes", "no"}
    assert task.evaluate(0, "No, because Albany, GA is smaller.") == {"em": True, "f1": 1.0, "pred": "no", "gt": "no"}
    assert task.evaluate(0, "Yes.") == {"em": False, "f1": 0.0, "pred": "yes", "gt": "no"}
    assert task.evaluate(0, "nope")["pred"] == "nope"
    assert task.evaluate(0, None)["em"] is False


def test_mmlu_scoring(data_dir):
    task = load_task("mmlu:anatomy", "test")
    q = task.questions[0]
    assert q.startswith("A lesion causing compression of the facial nerve")
    assert q.split("\n")[1:] == [
        "A. paralysis of the facial muscles.",
        "B. paralysis of the facial muscles and loss of taste.",
        "C. paralysis of the facial muscles, loss of taste and lacrimation.",
        "D. paralysis of the facial muscles, loss of taste, lacrimation and decreased salivation.",
    ]
    assert task.answers[0] == "A"
    for ans in ["A", "(A)", "a)", "A. paralysis of the facial muscles.", "Answer: A"]:
        assert task.evaluate(0, ans) == {"em": True, "f1": 1.0, "pred": "A", "gt": "A"}, ans
    assert task.evaluate(0, "B")["em"] is False
    assert task.evaluate(0, "paralysis") == {"em": False, "f1": 0.0, "pred": "paralysis", "gt": "A"}


# ----------------------------------------------------------------------------
# custom tasks and errors


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_custom_jsonl(tmp_path, monkeypatch):
    monkeypatch.setenv("FIREACT_DATA_DIR", str(tmp_path / "absent"))  # a custom file needs no data dir
    path = _write_jsonl(
        tmp_path / "mine.jsonl",
        [
            json.dumps({"question": "Capital of France?", "answer": "Paris", "extra": 1}),
            "",
            json.dumps({"question": "Year of the Moon landing?", "answer": 1969}),
        ],
    )
    task = load_task(str(path))
    assert (task.kind, task.split, task.questions, task.answers) == (
        "qa",
        "custom",
        ["Capital of France?", "Year of the Moon landing?"],
        ["Paris", "1969"],
    )
    assert task.evaluate(0, "paris.")["em"] and task.evaluate(1, "in 1969")["f1"] == pytest.approx(2 / 3)


def test_custom_json_booleans_are_yesno(tmp_path):
    path = tmp_path / "yn.json"
    path.write_text(
        json.dumps([{"question": "Is ice cold?", "answer": True}, {"question": "Is fire wet?", "answer": False}])
    )
    task = load_task(str(path), split="mine")
    assert (task.kind, task.split, task.answers) == ("yesno", "mine", ["yes", "no"])
    assert task.evaluate(1, "No way")["em"]


def test_bad_data_dir_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("FIREACT_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="FIREACT_DATA_DIR"):
        load_task("hotpotqa")


@pytest.mark.parametrize("name", ["hotpot", "mmlu:", "bamboogle:x", "data.csv"])
def test_unknown_task(name):
    with pytest.raises(ValueError, match=r"unknown task .*hotpotqa, bamboogle, strategyqa, mmlu"):
        load_task(name)


def test_unknown_split_and_subject(data_dir):
    with pytest.raises(ValueError, match=r"unknown split 'train' for hotpotqa; valid: dev, test"):
        load_task("hotpotqa", "train")
    with pytest.raises(ValueError, match=r"unknown split 'dev' for bamboogle; valid: test"):
        load_task("bamboogle", "dev")
    with pytest.raises(ValueError, match=r"unknown MMLU subject 'astrology'; valid: .*astronomy"):
        load_task("mmlu:astrology")


def test_missing_files_name_the_path(tmp_path):
    (tmp_path / "hotpotqa").mkdir()
    with pytest.raises(DataFileError, match=re.escape(str(tmp_path / "hotpotqa" / "dev.json"))):
        load_task("hotpotqa", data_dir=tmp_path)
    with pytest.raises(DataFileError, match="absent.jsonl"):
        load_task(str(tmp_path / "absent.jsonl"))


def test_malformed_jsonl_names_the_line(tmp_path):
    ok = json.dumps({"question": "q", "answer": "a"})
    bad_json = _write_jsonl(tmp_path / "bad.jsonl", [ok, ok, "{not json"])
    with pytest.raises(DataFileError, match=r"bad\.jsonl at line 3"):
        load_task(str(bad_json))
    no_answer = _write_jsonl(tmp_path / "noans.jsonl", [ok, "", ok, json.dumps({"question": "q"})])
    with pytest.raises(DataFileError, match=r"noans\.jsonl line 4: record has no 'answer'"):
        load_task(str(no_answer))
    no_question = tmp_path / "noq.json"
    no_question.write_text(json.dumps([{"question": "q", "answer": "a"}, {"text": "q", "answer": "a"}]))
    with pytest.raises(DataFileError, match=r"noq\.json record 1: record has no string 'question'"):
        load_task(str(no_question))


def test_malformed_mmlu_row(tmp_path):
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "toy_test.csv").write_text("q1,a,b,c,d,A\nq2,a,b,c,d,E\n")
    with pytest.raises(DataFileError, match=r"toy_test\.csv row 2: answer 'E'"):
        load_task("mmlu", data_dir=tmp_path)


def test_task_checks_its_fields():
    with pytest.raises(ValueError, match="kind"):
        Task("t", "s", "essay", ["q"], ["a"])
    with pytest.raises(ValueError, match="1 questions but 2 answers"):
        Task("t", "s", "qa", ["q"], ["a", "b"])


# ----------------------------------------------------------------------------
# few-shot prompts

_ANSWER = {"qa": r".+", "yesno": r"yes|no", "mc": r"[ABCD]"}


def _exemplars(text: str) -> tuple[str, list[list[str]]]:
    """Split a prompt into its instruction and its exemplars (each a list of lines)."""
    instruction, *blocks = text.strip("\n").split("\n\n")
    return instruction, [b.split("\n") for b in blocks]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_prompt_format(kind, method):
    raw = (PROMPT_DIR / f"{kind}_{method}.txt").read_text()
    assert raw.endswith("\n") and not raw.endswith("\n\n")
    text = fewshot_prompt(kind, method)
    assert text.endswith("\n\n")  # so the appended "Question: ...\n" starts a separate exemplar
    instruction, exemplars = _exemplars(text)
    assert "Question:" not in instruction and "finish[" in instruction
    assert len(exemplars) >= (2 if (kind, method) == ("mc", "react") else 3)
    answer = _ANSWER[kind]
    for lines in exemplars:
        assert lines[0].startswith("Question: ") and len(lines[0]) > len("Question: ")
        if kind == "mc":
            assert [line[:3] for line in lines[1:5]] == ["A. ", "B. ", "C. ", "D. "]
            lines = lines[5:]
        else:
            lines = lines[1:]
        assert re.fullmatch(rf"Action: finish\[({answer})\]", lines[-1]), lines[-1]
        final = re.fullmatch(r"Action: finish\[(.+)\]", lines[-1]).group(1)
        if method == "io":
            assert len(lines) == 1
        elif method == "cot":
            assert len(lines) == 2 and lines[0].startswith("Thought: ")
            assert lines[0].endswith(f"So the answer is {final}.")
        else:
            # Thought, Action, then (Observation, Thought, Action)* with only the last action a finish
            assert [line.split(":")[0] for line in lines] == ["Thought", "Action"] + [
                "Observation",
                "Thought",
                "Action",
            ] * ((len(lines) - 2) // 3)
            actions = [line for line in lines if line.startswith("Action: ")]
            assert all(re.fullmatch(r"Action: search\[[^\]]+\]", a) for a in actions[:-1]) and len(actions) >= 2
    if method == "react":
        assert len(text) <= 2500
        assert all(w in instruction for w in ("Thought", "Action", "Observation", "search[", "finish["))


def test_prompt_plus_question_parses():
    _, exemplars = _exemplars(fewshot_prompt("qa", "react") + "Question: Who wrote Hamlet?\n")
    assert exemplars[-1] == ["Question: Who wrote Hamlet?"]


@pytest.mark.parametrize("kind, method", [("qa", "reflexion"), ("essay", "io"), ("QA", "react")])
def test_prompt_unknown(kind, method):
    with pytest.raises(ValueError, match="no few-shot prompt"):
        fewshot_prompt(kind, method)
