"""The command line, driven as a user would: overrides in any order, and a user's mistakes
answered by one `error:` line and exit code 2, never a traceback."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from fireact_utils import pipeline
from fireact_utils.cli import main
from fireact_utils.config import load_params
from fireact_utils.io import atomic_write_json
from fireact_utils.provenance import machine_label
from fireact_utils.self_consistency import sample_agent
from fireact_utils.tasks import load_task


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[0].startswith("error: ") and "Traceback" not in "\n".join(err)
    return "\n".join(err)


def test_params_with_overrides_before_and_after_flags(capsys):
    assert main(["params", "params/smoke.yaml", "train.epochs=3"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["epochs"] == 3


def test_bad_params_key_is_one_error_line(capsys):
    assert main(["params", "params/smoke.yaml", "train.epochz=3"]) == 2
    assert "train.epochz" in _error_line(capsys)


@pytest.mark.parametrize(("lines", "named"), [
    (['{"question": "q1", "answer": "a"}', '{"question": "q2", "answer": '], "q.jsonl at line 2"),
    (['{"question": "q1", "answer": "a"}', '{"question": "q2"}'], "q.jsonl line 2: record has no 'answer' field"),
])
def test_malformed_question_file_named(tmp_path, capsys, lines, named):
    q = tmp_path / "q.jsonl"
    q.write_text("\n".join(lines) + "\n")
    # the override after the flags: accepted in any order
    assert main(["evaluate", "params/smoke.yaml", "--task", str(q), f"output_root={tmp_path}"]) == 2
    assert named in _error_line(capsys)


def test_missing_data_dirs_name_the_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FIREACT_DATA_DIR", str(tmp_path / "nope"))
    assert main(["evaluate", "params/smoke.yaml", f"output_root={tmp_path}"]) == 2
    assert "FIREACT_DATA_DIR" in _error_line(capsys)
    monkeypatch.setenv("FIREACT_MULTIHOP_DIR", str(tmp_path / "nope"))
    assert main(["evaluate", "params/smoke.yaml", "--task", "hotpotqa-wiki", f"output_root={tmp_path}"]) == 2
    assert "FIREACT_MULTIHOP_DIR" in _error_line(capsys)


def test_unknown_task_and_missing_trained_dir(tmp_path, capsys):
    assert main(["evaluate", "params/smoke.yaml", "--task", "hotpotqa-wikki", f"output_root={tmp_path}"]) == 2
    assert "unknown task 'hotpotqa-wikki'" in _error_line(capsys)


def test_evaluate_a_question_file_end_to_end(tmp_path, capsys, model_path):
    """The real model on two questions of a user's file, in the Wikipedia environment."""
    q = tmp_path / "q.jsonl"
    q.write_text('{"question": "Who directed the film Big Stone Gap?", "answer": "Adriana Trigiani"}\n'
                 '{"question": "Is Paris in France?", "answer": "yes"}\n')
    code = main(["evaluate", "params/smoke.yaml", "--task", str(q), "--search", "wiki", "--corpus", "hotpotqa",
                 "--model", model_path, "--name", "mine", f"output_root={tmp_path}", "evaluate.n_questions=2",
                 "agent.max_turns=2", "agent.max_new_tokens=32"])
    out = capsys.readouterr().out
    assert code == 0 and json.loads(out[: out.rindex("}") + 1])["n"] == 2
    recs = [json.loads(line) for line in open(tmp_path / "smoke" / "eval" / "mine.jsonl")]
    assert len(recs) == 2
    meta = json.loads((tmp_path / "smoke" / "eval" / "mine.meta.json").read_text())
    assert meta["environment"]["search"] == "wiki" and meta["environment"]["corpus"].startswith("hotpotqa (")


def test_select_consistency_mistakes_and_resumed_tables(tmp_path, capsys, multihop_dir):
    """`consistency` without k values or a model is refused; `select` on complete saved
    evaluations only reads them back and writes the table and the choice."""
    from fireact_utils.agent import episode_id
    from fireact_utils.io import write_jsonl
    from fireact_utils.tasks import eval_indices

    assert main(["consistency", "params/smoke.yaml", "--trained", str(tmp_path), f"output_root={tmp_path}",
                 "study.sc_ks=[]"]) == 2
    assert "study.sc_ks is empty" in _error_line(capsys)
    assert main(["consistency", "params/smoke.yaml", "study.sc_ks=[1]"]) == 2
    assert "name it with --trained" in _error_line(capsys)
    dev = load_task("hotpotqa", "dev")  # the main fine-tune's sample saved, seed 7's not: still one line, no traceback
    write_jsonl(tmp_path / "smoke" / "eval" / "sc_finetuned_s0.jsonl",
                [{"id": episode_id(dev, i), "status": "finished", "em": True} for i in eval_indices(dev, 2)])
    p = load_params("params/smoke.yaml", [f"output_root={tmp_path}", "study.sc_ks=[1]"])
    atomic_write_json(tmp_path / "smoke" / "eval" / "sc_finetuned_s0.meta.json",
                      {"key": pipeline.known_key(p, sample_agent(p, finetuned=True), dev)})
    assert main(["consistency", "params/smoke.yaml", f"output_root={tmp_path}", "study.sc_ks=[1]"]) == 2
    assert "finetuned_seed7 not all saved" in _error_line(capsys)
    task = load_task("hotpotqa-wiki", "val", multihop_dir=multihop_dir)
    ov = [f"output_root={tmp_path}", "study.select_n=2", "study.fewshot_variants={}",
          "study.recipes={a: {train.lora_r: 4}, b: {train.lora_r: 8}}"]
    for label, ems in (("a", (False, False)), ("b", (True, False))):
        write_jsonl(tmp_path / "smoke" / "eval" / f"recipe_{label}.jsonl",
                    [{"id": episode_id(task, i), "status": "finished", "em": e, "f1": float(e), "turns": 1,
                      "prompt_tokens": 1, "completion_tokens": 1} for i, e in zip(eval_indices(task, 2), ems, strict=True)])
        atomic_write_json(tmp_path / "smoke" / "eval" / f"recipe_{label}.meta.json",
                          {"key": pipeline.known_key(p, pipeline.finetuned_agent(p), task)})
    assert main(["select", "params/smoke.yaml", *ov]) == 0
    assert "chosen: b" in capsys.readouterr().out
    chosen = json.loads((tmp_path / "smoke" / "tables" / "recipes_chosen.json").read_text())
    assert chosen["label"] == "b" and chosen["overrides"] == {"train.lora_r": 8} and chosen["em"] == 0.5
    assert not (tmp_path / "smoke" / "recipes").exists()  # nothing trained
    from fireact_utils import recipes  # notebook 02 shows the same choice, read back, and the one it skips

    shown = recipes.selection_markdown(recipes.selections(load_params("params/smoke.yaml", ov)))
    skipped, recipes_part = shown.split("\n\n", 1)
    assert skipped.startswith("Few-shot prompt selection on validation: not in this run; `python -m fireact_utils select")
    assert recipes_part.startswith("**Fine-tuning recipes**, chosen: `b`\n\n| condition |")
    assert recipes_part.endswith("- `a`: train.lora_r=4\n- `b`: train.lora_r=8")


def test_consistency_of_the_fewshot_base_alone_then_over_seeds(tmp_path, capsys, model_path):
    """`study.sc_agents=[fewshot]` needs no fine-tuned model and samples nothing else: the real
    model, 2 questions, 2 samples each. Its saved samples, copied under the fine-tuned agents'
    names, are then re-drawn without a model: one agent, and with study.sc_seeds every seed and their mean."""
    ov = [f"output_root={tmp_path}", f"model.name={model_path}", "study.sc_ks=[1,2]", "study.sc_n=2",
          "study.sc_agents=[fewshot]", "study.sc_seeds=false", "agent.n_exemplars=1", "agent.max_turns=2",
          "agent.max_new_tokens=24"]
    assert main(["consistency", "params/smoke.yaml", *ov]) == 0
    table = pd.read_csv(tmp_path / "smoke" / "tables" / "self_consistency.csv")
    assert list(zip(table["agent"], table["k"], table["n"], strict=True)) == [("fewshot ReAct", 1, 2), ("fewshot ReAct", 2, 2)]
    assert table["tokens_per_question"].iloc[1] > table["tokens_per_question"].iloc[0]
    assert set(table["machine"]) == {machine_label()}  # the seconds' machine
    eval_dir = tmp_path / "smoke" / "eval"
    assert sorted(f.name for f in eval_dir.glob("*.jsonl")) == ["sc_fewshot_s0.jsonl", "sc_fewshot_s1.jsonl"]
    # saved samples re-drawn under another temperature would be mislabelled: a one-line error
    capsys.readouterr()
    assert main(["consistency", "params/smoke.yaml", *ov, "study.sc_temperature=0.9"]) == 2
    assert "was made with other settings (agent.temperature 0.4 -> 0.9): rerun with --redo" in _error_line(capsys)
    # complete saved samples re-draw the curve without --trained and without loading a model
    # (copied as the fine-tuned agent's, their meta names its settings and key)
    p = load_params("params/smoke.yaml", ov)
    for j in range(2):
        shutil.copy(eval_dir / f"sc_fewshot_s{j}.jsonl", eval_dir / f"sc_finetuned_s{j}.jsonl")
        meta = json.loads((eval_dir / f"sc_fewshot_s{j}.meta.json").read_text())
        meta["agent"] |= {"mode": "finetuned", "format": "alpaca"}
        meta["key"] = pipeline.known_key(p, sample_agent(p, finetuned=True), load_task("hotpotqa", "dev"))
        (eval_dir / f"sc_finetuned_s{j}.meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["consistency", "params/smoke.yaml", *ov, "study.sc_agents=[finetuned]", "model.name=/no/such/model"]) == 0
    again = pd.read_csv(tmp_path / "smoke" / "tables" / "self_consistency.csv")
    assert set(again["agent"]) == {"finetuned ReAct"} and again["em"].tolist() == table["em"].tolist()
    # Seeds 42 and 7: the same episodes, except one question that both of seed 42's samples answer
    # wrong and both of seed 7's right, so seed 7's vote scores 0.5 more at every k.
    for j in range(2):
        recs = [json.loads(line) for line in (eval_dir / f"sc_fewshot_s{j}.jsonl").read_text().splitlines()]
        target = min(r["id"] for r in recs)
        for who, answer, em in (("finetuned", "Rome", 0.0), ("finetuned_seed7", "Paris", 1.0)):
            for r in recs:
                if r["id"] == target:
                    r |= {"answer": answer, "pred": answer.lower(), "em": em}
            (eval_dir / f"sc_{who}_s{j}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        shutil.copy(eval_dir / f"sc_finetuned_s{j}.meta.json", eval_dir / f"sc_finetuned_seed7_s{j}.meta.json")
    capsys.readouterr()
    seeds_ov = ["study.sc_agents=[fewshot,finetuned]", "model.name=/no/such/model", "study.seeds=[42,7]",
                "study.sc_seeds=true"]
    assert main(["consistency", "params/smoke.yaml", *ov, *seeds_ov]) == 0
    both = pd.read_csv(tmp_path / "smoke" / "tables" / "self_consistency.csv").set_index(["agent", "k"])
    assert list(dict.fromkeys(both.index.get_level_values(0))) == [
        "fewshot ReAct", "finetuned ReAct, seed 42", "finetuned ReAct, seed 7", "finetuned ReAct, mean over 2 seeds"]
    for k in (1, 2):
        s42, s7 = both.loc[("finetuned ReAct, seed 42", k), "em"], both.loc[("finetuned ReAct, seed 7", k), "em"]
        mean = both.loc[("finetuned ReAct, mean over 2 seeds", k)]
        assert s7 == s42 + 0.5
        assert mean["em"] == pytest.approx((s42 + s7) / 2) and mean["em_lo"] <= mean["em"] <= mean["em_hi"]
        assert mean["em_seed_sd"] == pytest.approx(abs(s7 - s42) / 2 ** 0.5)
        assert (mean["em_seed_min"], mean["em_seed_max"]) == (min(s42, s7), max(s42, s7))
        # paired over the same questions, the gain over the few-shot vote is the difference of means
        assert mean["gain"] == pytest.approx(mean["em"] - both.loc[("fewshot ReAct", k), "em"])
        assert mean["gain_lo"] <= mean["gain"] <= mean["gain_hi"]
    capsys.readouterr()
    assert main(["params", "params/smoke.yaml", "study.seeds=[]", "study.sc_seeds=true"]) == 2
    assert "study.sc_seeds needs the training seeds" in _error_line(capsys)
    assert main(["params", "params/smoke.yaml", "study.sc_agents=[]"]) == 2  # nothing to sample
    assert "study.sc_agents" in _error_line(capsys)


def test_beyond_with_nothing_to_run_and_a_group_of_one(tmp_path, capsys):
    ov = [f"output_root={tmp_path}", "self_improve.rounds=0", "rl.steps=0"]
    assert main(["beyond", "params/smoke.yaml", "--trained", str(tmp_path), *ov]) == 2
    assert "self_improve.rounds and rl.steps are both 0" in _error_line(capsys)
    assert main(["params", "params/smoke.yaml", "rl.num_generations=1"]) == 2  # a group needs two episodes
    assert "rl.num_generations" in _error_line(capsys)


def test_select_and_sweeps_with_nothing_to_run(tmp_path, capsys):
    ov = [f"output_root={tmp_path}", "study.recipes={}", "study.fewshot_variants={}"]
    assert main(["select", "params/smoke.yaml", *ov]) == 2
    assert "study.fewshot_variants and study.recipes are both empty" in _error_line(capsys)
    ov = [f"output_root={tmp_path}", "study.generalization_tasks=[]", "study.noise_rates=[]", "study.data_sizes=[]"]
    assert main(["sweeps", "params/smoke.yaml", *ov]) == 2
    assert "nothing to run" in _error_line(capsys)
    assert not (tmp_path / "smoke").exists()


def _search_then_answer(text: str) -> str:
    """Stateless: search the episode's question, then a wrong answer (few-shot and fine-tuned prompts alike)."""
    episode = text.rsplit("Question:", 1)[-1].rsplit("### Instruction:", 1)[-1]
    if "Observation:" in episode:
        return "Thought: I give up.\nAction: finish[no idea]"
    return f"Thought: look it up.\nAction: search[{episode.strip().splitlines()[0][:60]}]"


def test_sweeps_writes_notebook_04s_tables_and_prints_its_summary(tmp_path, capsys, monkeypatch, data_dir,
                                                                  multihop_dir):
    """`sweeps` with every sweep on, at toy sizes, every model scripted (the real agent loop, replay and
    Wikipedia search) and no training: each table and figure under the names notebook 04 writes, and
    its summary, which reads them back by those names."""
    from scripted import ScriptedLLM

    from fireact_utils import studies

    fake = lambda *a, **k: ScriptedLLM(_search_then_answer)  # noqa: E731
    monkeypatch.setattr(pipeline, "local_llm", fake)
    monkeypatch.setattr(studies, "local_llm", fake)
    monkeypatch.setattr(pipeline, "finetune", lambda p: tmp_path / "trained")
    monkeypatch.setattr(studies, "finetune", lambda p, records, out: out)
    ov = [f"output_root={tmp_path}", "study.generalization_tasks=[hotpotqa-wiki]", "study.generalization_n=2",
          "study.noise_tasks=[]", "study.data_sizes=[4]", "study.mixtures={mm: 'fireact:hotpotqa_multimethod'}",
          "evaluate.n_questions=3"]
    assert main(["sweeps", "params/smoke.yaml", *ov]) == 0
    run = tmp_path / "smoke"
    stems = ["data_scaling", "generalization", "mixtures", "robustness"]
    assert sorted(f.name for f in (run / "tables").iterdir()) == sorted(
        [*(f"{s}.{e}" for s in stems for e in ("csv", "md")), "wiki_outcomes.csv"])
    assert sorted(f.name for f in (run / "figures").iterdir()) == sorted(
        f"{s}.{e}" for s in [*stems, "outcomes"] for e in ("png", "svg"))
    table = pd.read_csv(run / "tables" / "robustness.csv")
    assert (table["n"] == 3).all() and table["noise_rate"].notna().sum() == 3  # 3 agents x 1 kind x 1 rate
    out = capsys.readouterr().out
    assert out.startswith("**Noisy tool on hotpotqa** (`tables/robustness.csv`;")
    assert "- **Generalization**: hotpotqa-wiki (2 questions)" in out and "- **Data scaling** (" in out
    assert "- **Mixtures** (fine-tuned on each dataset): mm: EM" in out


def test_run_only_executes_the_named_notebooks(tmp_path, capsys):
    """`run --only` keeps chain order and the done markers: finished notebooks are skipped, the
    others never start; an unknown notebook name is a usage error (exit 2)."""
    from fireact_utils import keys
    from fireact_utils.config import load_params
    from fireact_utils.io import atomic_write_json

    nb_dir = tmp_path / "smoke" / "notebooks"
    made = keys.make("notebook", keys.run_settings(load_params("params/smoke.yaml", [f"output_root={tmp_path}"])))
    for nb in ("05_beyond_sft", "02_finetune"):
        atomic_write_json(nb_dir / f"{nb}.done", {"seconds": 1.0, "key": made})
    argv = ["run", "params/smoke.yaml", "--only", "05_beyond_sft", "--only", "02_finetune", "--no-html"]
    assert main([*argv, f"output_root={tmp_path}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["[skip] 02_finetune (executed with these settings; --redo executes it again)",
                   "[skip] 05_beyond_sft (executed with these settings; --redo executes it again)",
                   f"results in {nb_dir.parent}: headline table tables/main.md (not made yet), "
                   "figures figures/ (not made yet), executed notebooks notebooks/*.html"]  # the closing line
    with pytest.raises(SystemExit) as e:
        main(["run", "params/smoke.yaml", "--only", "06_nothing"])
    assert e.value.code == 2 and "invalid choice: '06_nothing'" in capsys.readouterr().err
