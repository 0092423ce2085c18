"""Guards of `holdout`: no choice on a test split, no training question from a held-out set, no
score on a split chosen on, no evaluation of a pre-registered study under other settings. Real
data (FireAct's and the multihop questions), real params and stage functions (a scripted model
where an evaluation must run); each refusal comes before any model is loaded."""

import re
from pathlib import Path

import pytest
from scripted import ScriptedLLM

from fireact_utils import holdout, keys, pipeline, recipes
from fireact_utils.config import AgentParams, load_params
from fireact_utils.data import load_dataset_source
from fireact_utils.io import read_json, read_jsonl
from fireact_utils.tasks import eval_indices, load_task

PARAMS = Path(__file__).resolve().parent.parent / "params"


def _params(tmp_path, name="smoke.yaml", **ov):
    return load_params(PARAMS / name, {"output_root": str(tmp_path), **ov})


@pytest.mark.parametrize(("task", "split"), [("hotpotqa", "dev"), ("hotpotqa-wiki", "test")])
def test_no_choice_on_a_split_the_run_is_scored_on(tmp_path, data_dir, multihop_dir, task, split):
    """Choosing prompts or recipes on dev (the evaluated split) or on HotpotQA-wiki test (which
    holds 58 dev-500 questions and is the kit's standing test split) is refused at once."""
    p = _params(tmp_path, **{"study.select_task": task, "study.select_split": split})
    with pytest.raises(holdout.HoldoutError, match="would be made on test questions") as e:
        recipes.fewshot_search(p)
    assert "\n" not in str(e.value) and "hotpotqa dev" in str(e.value)
    with pytest.raises(holdout.HoldoutError):
        recipes.recipe_search(p)
    holdout.check_choice(_params(tmp_path))  # the default, HotpotQA-wiki val, shares nothing


def test_a_generalization_task_cannot_be_chosen_on(tmp_path, data_dir, multihop_dir):
    p = _params(tmp_path, **{"study.select_task": "strategyqa", "study.select_split": "dev",
                             "study.transfer_tasks": ["strategyqa-wiki"]})  # the same 229 questions, another name
    with pytest.raises(holdout.HoldoutError, match="229 questions of evaluated: strategyqa-wiki dev"):
        holdout.check_choice(p)


def test_generation_never_draws_a_held_out_question(tmp_path, data_dir, multihop_dir):
    """params/paper.yaml generates from HotpotQA dev, which also holds HotpotQA-wiki val and test:
    1,500 training questions drawn from it avoid those and all of dev-500, not only the first n."""
    p = load_params(PARAMS / "paper.yaml", {"evaluate.n_questions": 100, "generate.n_questions": 1500})
    dev = load_task("hotpotqa", "dev", data_dir)
    picked = pipeline.generation_indices(dev, 1500, 0, holdout.reserved_keys(p))
    keys = {holdout.question_key(dev.questions[i]) for i in picked}
    assert len(picked) == 1500
    dev500 = {holdout.question_key(dev.questions[i]) for i in eval_indices(dev, 500, 233)}
    assert not keys & dev500
    for split in ("val", "test"):
        assert not keys & {holdout.question_key(q) for q in load_task("hotpotqa-wiki", split).questions}
    everything = pipeline.generation_indices(dev, 1500, 0)  # without the held-out set, some would be drawn
    assert {holdout.question_key(dev.questions[i]) for i in everything} & dev500


def test_fine_tuning_refuses_held_out_questions(tmp_path, data_dir, multihop_dir):
    """Every fine-tune passes `pipeline.finetune`: a record whose question is the 500th of dev-500
    (the smoke run evaluates only 4) or a StrategyQA dev question under its wiki name is refused,
    before any model loads."""
    p = _params(tmp_path)
    dev = load_task("hotpotqa", "dev", data_dir)
    recs = load_dataset_source("fireact:hotpotqa", data_dir)[:4]
    last = {**recs[0], "question": "  " + dev.questions[eval_indices(dev, 500, 233)[-1]].upper()}
    with pytest.raises(holdout.HoldoutError, match=r"1 of evaluate: hotpotqa dev \(FireAct's dev-500\)"):
        pipeline.finetune(p, [*recs, last], tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_fireacts_multitask_data_holds_strategyqa_dev(tmp_path, data_dir, multihop_dir):
    """FireAct's released multi-task mixture holds 37 StrategyQA dev questions; a run evaluated
    there (paper.yaml's generalization) refuses it, or drops them with dataset.drop_held_out."""
    recs = load_dataset_source("fireact:multitask", data_dir)
    p = load_params(PARAMS / "paper.yaml", {"output_root": str(tmp_path), "dataset.drop_held_out": False})
    with pytest.raises(holdout.HoldoutError, match="37 of evaluated: strategyqa dev"):
        pipeline.finetune(p, recs, tmp_path / "never")
    kept = holdout.without_held_out(p, recs)
    assert len(kept) == len(recs) - 37
    holdout.check_training(p, [r["question"] for r in kept], "kept")
    holdout.check_training(p, [r["question"] for r in load_dataset_source("fireact:hotpotqa", data_dir)], "released")


def test_the_base_model_axis_evaluation_sets_are_held_out(tmp_path, data_dir, multihop_dir):
    """study.base_model_evals' questions (first n of each seeded shuffle) are never trained on;
    the next question of that split is free."""
    p = _params(tmp_path, **{"study.base_models": ["smollm2-135m"], "study.base_model_evals": ["hotpotqa-wiki:train:5"]})
    t = load_task("hotpotqa-wiki", "train", data_dir, multihop_dir)
    idx = eval_indices(t, 6, p.evaluate.seed)
    with pytest.raises(holdout.HoldoutError, match="study.base_model_evals: hotpotqa-wiki:train:5"):
        holdout.check_training(p, [t.questions[idx[4]]], "a fine-tune")
    holdout.check_training(p, [t.questions[idx[5]]], "a fine-tune")


def test_dev500_and_the_wiki_splits_are_held_out_whatever_evaluate_names(tmp_path, data_dir, multihop_dir):
    """evaluate.seed=1 scores 4 other HotpotQA dev questions; FireAct's dev-500 (seed 233) is a fact
    about the data and stays held out: a fine-tune on its last question is refused, and generation
    draws none of it, nor of HotpotQA-wiki val or test."""
    p = _params(tmp_path, **{"evaluate.seed": 1})
    dev = load_task("hotpotqa", "dev", data_dir)
    dev500 = {holdout.question_key(dev.questions[i]) for i in eval_indices(dev, 500, 233)}
    last = dev.questions[eval_indices(dev, 500, 233)[-1]]
    assert holdout.question_key(last) not in {holdout.question_key(dev.questions[i]) for i in eval_indices(dev, 4, 1)}
    recs = load_dataset_source("fireact:hotpotqa", data_dir)[:4]
    with pytest.raises(holdout.HoldoutError, match="1 of FireAct's dev-500"):
        pipeline.finetune(p, [*recs, {**recs[0], "question": last}], tmp_path / "never")
    picked = pipeline.generation_indices(dev, 1500, 0, holdout.reserved_keys(p))
    assert not {holdout.question_key(dev.questions[i]) for i in picked} & dev500
    for split in ("val", "test"):
        wiki = {holdout.question_key(q) for q in load_task("hotpotqa-wiki", split, multihop_dir=multihop_dir).questions}
        assert wiki <= holdout.reserved_keys(p)


def test_a_split_chosen_on_is_never_scored_again(tmp_path, multihop_dir):
    """A prompt chosen on 2 HotpotQA-wiki val questions (`select_condition`, as `select` runs it)
    is recorded in <output_root>/choices.jsonl; afterwards val is scored by no other condition,
    under this run's name or another's, through run_condition (the CLI's `evaluate`, notebooks,
    studies); the selection itself resumes, and HotpotQA-wiki test stays free."""
    p = _params(tmp_path)
    llm, io = ScriptedLLM(lambda _: "Action: finish[Paris]"), AgentParams(method="io")
    assert len(recipes.select_condition(p, "fewshot_io", llm, io, progress=False)) == 2
    val = load_task("hotpotqa-wiki", "val", multihop_dir=multihop_dir)
    chosen = [{"question": holdout.question_key(val.questions[i])} for i in eval_indices(val, 2, p.evaluate.seed)]
    assert read_jsonl(tmp_path / "choices.jsonl") == [
        {"run": "smoke", "task": "hotpotqa-wiki", "split": "val", "n": 2, "key": keys.data_hash(chosen)}]
    other = load_params(PARAMS / "smoke.yaml", {"output_root": str(tmp_path), "name": "other",
                                                "evaluate.task": "hotpotqa-wiki", "evaluate.split": "val"})
    with pytest.raises(holdout.HoldoutError, match=r"^4 of the 4 questions to score on hotpotqa-wiki val are of "
                       r"hotpotqa-wiki val, which run 'smoke' chose on .*; evaluate on another split$"):
        pipeline.run_condition(other, "fewshot_io", llm, io, progress=False)
    with pytest.raises(holdout.HoldoutError, match="which run 'smoke' chose on"):
        pipeline.run_condition(p, "io_val", llm, io, task="hotpotqa-wiki", split="val", n=2, progress=False)
    assert len(recipes.select_condition(p, "fewshot_io", llm, io, progress=False)) == 2
    assert len(read_jsonl(tmp_path / "choices.jsonl")) == 1  # a resumed selection is the same choice
    assert len(pipeline.run_condition(other, "io_test", llm, io, task="hotpotqa-wiki", n=2, progress=False)) == 2


def test_a_preregistered_study_evaluates_only_as_registered(tmp_path, data_dir):
    """The registration binds every evaluation, from any entry point (run_condition), by resolved
    settings: headline_gpu.yaml's explicit fp32 and headline.yaml's `auto` are one setting on a
    CPU, while a GPU (auto: bf16) or switching the lock off is refused, naming what differs."""
    def evaluate(name: str, **ov) -> list[dict]:
        p = load_params(PARAMS / "headline.yaml", {"output_root": str(tmp_path), "model.device": "cpu", **ov})
        return pipeline.run_condition(p, name, ScriptedLLM(lambda _: "Action: finish[Paris]"), AgentParams(method="io"),
                                      n=1, progress=False)

    evaluate("first", **{"model.dtype": "float32"})  # the first evaluation registers the study
    settings = read_json(tmp_path / "headline" / "preregistration.json")["settings"]
    assert (settings["model.device"], settings["model.dtype"]) == ("cpu", "float32")
    assert len(evaluate("second")) == 1  # model.dtype auto: fp32 on a CPU, as registered
    with pytest.raises(ValueError, match=r"^headline was pre-registered with other settings \(model.device cpu -> "
                       r"cuda; model.dtype float32 -> bfloat16"):
        evaluate("gpu", **{"model.device": "cuda"})
    with pytest.raises(ValueError, match=r"\(study.preregistered true -> false\)"):
        evaluate("unlocked", **{"study.preregistered": False})
    assert not (tmp_path / "headline" / "eval" / "gpu.jsonl").exists()


def test_the_committed_question_keys_are_the_datas(multihop_dir, tmp_path):
    """holdout.QUESTION_KEYS holds every split of every wiki task, in split order, exactly as the
    multihop data gives them (`write_question_keys` regenerates the same bytes); a key is the hashed
    folded question, so a question's case and spacing do not matter."""
    assert holdout.read_json(holdout.QUESTION_KEYS) == holdout.wiki_question_keys(multihop_dir)
    again = holdout.write_question_keys(multihop_dir, tmp_path / "keys.json")
    assert again.read_bytes() == holdout.QUESTION_KEYS.read_bytes()
    val = load_task("hotpotqa-wiki", "val", multihop_dir=multihop_dir)
    assert holdout.split_keys(_params(tmp_path), "hotpotqa-wiki", "val") == (
        "hotpotqa-wiki", "val", [holdout.question_key(q) for q in val.questions])
    assert holdout.question_key("  Who  WAS\nfirst? ") == holdout.question_key("who was first?")
    assert len(holdout.question_key("who was first?")) == 16


@pytest.mark.parametrize("name", ["cpu.yaml", "smoke.yaml"])
def test_the_demos_guards_read_fireacts_data_alone(tmp_path, monkeypatch, data_dir, multihop_dir, name):
    """With FIREACT_MULTIHOP_DIR at an empty dir, the demo's and the smoke run's params build their
    dataset, pass the fine-tune's guard (training itself stubbed), generate (a scripted teacher on
    the recorded search) and check evaluations: the wiki tasks' held-out questions come from the
    committed keys, and are still refused (read here from the real multihop data)."""
    from scripted import ScriptedLLM

    from fireact_utils import llm, train
    from fireact_utils.io import DataFileError

    empty = tmp_path / "no-multihop"
    empty.mkdir()
    monkeypatch.setenv("FIREACT_MULTIHOP_DIR", str(empty))
    p = load_params(PARAMS / name, {"output_root": str(tmp_path / "runs")})
    with pytest.raises(DataFileError, match="questions.jsonl: `make data` fetches it$"):
        load_task("hotpotqa-wiki", "val")  # out of reach indeed

    recs = pipeline.build_dataset(p)
    trained = []
    monkeypatch.setattr(train, "finetune", lambda records, out, *a, **k: trained.append(len(records)) or out)
    pipeline.finetune(p)
    assert trained == [len(recs)] and len(recs) == (p.dataset.n_trajectories or 500)
    val = load_task("hotpotqa-wiki", "val", multihop_dir=multihop_dir)
    with pytest.raises(holdout.HoldoutError, match=r"\(1 of study\.select_task: hotpotqa-wiki val\), e\.g\. "
                       + re.escape(repr(val.questions[0]))):
        pipeline.finetune(p, [*recs[:2], {**recs[0], "question": val.questions[0]}], tmp_path / "never")

    monkeypatch.setattr(llm, "make_llm", lambda *a, **k: ScriptedLLM(lambda _: "Thought: t\nAction: finish[x]"))
    made = pipeline.generate(p, progress=False)
    assert made["hotpotqa:react"]["n"] == p.generate.n_questions

    dev = load_task("hotpotqa", "dev", data_dir)
    in_val = next(i for i, q in enumerate(dev.questions) if holdout.question_key(q) == holdout.question_key(val.questions[0]))
    holdout.record_choice(p)  # as a selection on HotpotQA-wiki val records it
    holdout.check_evaluation(p, dev, eval_indices(dev, p.evaluate.n_questions, p.evaluate.seed))
    with pytest.raises(holdout.HoldoutError, match="are of hotpotqa-wiki val, which run"):
        holdout.check_evaluation(p, dev, [in_val])
