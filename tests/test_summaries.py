"""The notebooks' closing summaries: built from real runs (the agent loop on a scripted model)."""

from pathlib import Path

import pytest
from scripted import ScriptedLLM, by_question

from fireact_utils import pipeline, summaries
from fireact_utils.agent import run_episodes
from fireact_utils.config import AgentParams, load_params
from fireact_utils.data import load_fireact
from fireact_utils.llm import Generation
from fireact_utils.tasks import Task, load_task

SMOKE = Path(__file__).resolve().parent.parent / "params" / "smoke.yaml"


def test_walkthrough_reports_the_episode():
    """Notebook 00: status, turns, answer against gold, EM, and the tokens, hand-counted."""
    task = Task("toy", "dev", "qa", ["Alpha: who wrote Hamlet?"], ["William Shakespeare"])
    replies = [Generation("Thought: Search.\nAction: search[Hamlet]", 900, 100),
               Generation("Thought: Done.\nAction: finish[Shakespeare]", 950, 50)]
    llm = ScriptedLLM(by_question({"Alpha": replies}))
    rec = run_episodes(task, [0], llm, lambda q: "Hamlet is a play by Shakespeare.",
                                AgentParams(n_exemplars=1), progress=False)[0]
    text = summaries.walkthrough(rec, 1)
    assert "few-shot react, 1 exemplar(s), `scripted`" in text
    assert "exit status **finished** after 2 turn(s): 1 search(es), 2 model call(s)" in text
    assert "answer `Shakespeare` against gold `William Shakespeare`: EM 0, F1 0.67" in text
    assert "1,850 prompt + 150 completion" in text and "is 92% of them" in text  # 1850 / 2000


def test_generation_reports_teacher_filter_and_dataset(tmp_path, monkeypatch, data_dir):
    """Notebook 01: a real `pipeline.generate` on 2 training questions (one answered right), then the
    dataset with and without the teacher's successes."""
    import fireact_utils.llm

    p = load_params(SMOKE, [f"output_root={tmp_path}", "dataset.n_trajectories=null"])
    task = load_task("hotpotqa", p.generate.split, p.data_dir)
    gold = dict(zip(task.questions, task.answers, strict=True))
    right = []

    def reply(text: str) -> str:  # the first question asked gets its gold answer, the other a wrong one
        q = text.rsplit("Question:", 1)[1].split("\n")[0].strip()
        right.append(right[0] if right else q)
        return f"Thought: I know.\nAction: finish[{gold[q] if q == right[0] else 'no idea'}]"

    monkeypatch.setattr(fireact_utils.llm, "make_llm", lambda *a, **k: ScriptedLLM(reply, name="teacher"))
    assert "Teacher**: not run" in summaries.generation(p.run_dir)
    pipeline.generate(p, progress=False)
    released = len(load_fireact("hotpotqa", data_dir=data_dir))
    pipeline.build_dataset(p)
    text = summaries.generation(p.run_dir)
    assert "**Teacher** (`teacher`): 2 episodes; the reward filter kept **1** and dropped 1 (1 wrong answer)." in text
    assert "| hotpotqa:react | 2 | 1 | 50% | 1.0 |" in text
    assert f"**Dataset**: {released + 1} trajectories (hotpotqa:react: " in text
    assert text.endswith("1 of them from this run's teacher.")
    without = p.model_copy(update={"dataset": p.dataset.model_copy(update={"teacher_episodes": False})})
    with pytest.raises(ValueError, match=r"dataset was made with other settings \(dataset.teacher_episodes true -> "
                                         r"false; pool [0-9a-f]+ -> [0-9a-f]+\)"):
        pipeline.build_dataset(without)  # the saved dataset is not silently reused under other settings
    monkeypatch.setenv("FIREACT_REDO", "1")
    pipeline.build_dataset(without)
    text = summaries.generation(p.run_dir)
    assert f"**Dataset**: {released} trajectories" in text
    assert text.endswith("0 of them from this run's teacher (`dataset.teacher_episodes` is false: the teacher's "
                         "successes stay out).")


@pytest.mark.parametrize("n", [0, 1])
def test_walkthrough_counts_plurals_from_the_record(n):
    """An episode cut before any search still reports its numbers (no division by zero on tokens)."""
    task = Task("toy", "dev", "qa", ["Beta: capital of France?"], ["Paris"])
    llm = ScriptedLLM(by_question({"Beta": [Generation("Thought: x\nAction: search[France]", 0, 0)]}))
    rec = run_episodes(task, [0], llm, lambda q: "France.", AgentParams(max_turns=n + 1), progress=False)[0]
    text = summaries.walkthrough(rec, 3)
    assert f"exit status **max_turns** after {n + 1} turn(s): {n + 1} search(es)" in text
    assert "answer *none* (never finished) against gold `Paris`: EM 0, F1 0.00" in text and "is 0% of them" in text


# ---------------------------------------------------------------- a skipped section; notebook 03

@pytest.mark.parametrize("key", list(summaries.SKIPPED))
def test_skipped_names_a_command_that_runs_the_section(key):
    """Each skipped line's params file sets the key that turns its section on, and its command parses."""
    from fireact_utils.cli import _parser

    section, params_file, cost, command = summaries.SKIPPED[key]
    repo = SMOKE.parent.parent
    resolved = load_params(repo / params_file)
    group, name = key.split(".")
    assert getattr(getattr(resolved, group), name), f"{params_file} does not set {key}"
    assert _parser().parse_args([command, params_file]).cmd == command
    line = summaries.skipped_line(key)
    assert line == f"{section}: not in this run; `python -m fireact_utils {command} {params_file}` runs this section ({cost})."
    assert "\n" not in line


def test_evaluation_summary_from_saved_tables(tmp_path, data_dir):
    """Notebook 03: real records (agent loop, scripted model) written as the notebook writes them."""
    import pandas as pd
    from eval_records import WRONG, react_records

    from fireact_utils import failures, tables
    from fireact_utils.evaluate import fmt_pct_ci

    base, ft, _ = react_records(data_dir)
    p = load_params(SMOKE, [f"output_root={tmp_path}"])
    conds = {"base_fewshot_react": base, "finetuned_react": ft}
    table = tables.main_table(p, conds)  # written as notebook 03 and `headline` write it
    assert pd.read_csv(p.run_dir / "tables" / "main.csv")["condition"].tolist() == table["condition"].tolist()
    assert "Paired gain" not in summaries.evaluation(p.run_dir)  # before paired_gain.json exists
    gain = tables.paired_gain(p, conds)
    text = summaries.evaluation(p.run_dir)
    assert text.startswith("**This run's evaluation** (`tables/main.csv`, 3 questions per condition):")
    for _, r in table.iterrows():
        assert f"- **{r['condition']}**: EM {fmt_pct_ci(r['em'], r['em_lo'], r['em_hi'])}; {r['turns']:.2f} turns, {r['finish']:.0%} finished" in text
    assert f"searched in 33% of episodes; most frequent answer `{WRONG}` (2 of 3)" in text  # a number, read as text
    assert "FireAct fine-tuned ReAct**: EM 33.3% [0.0, 100.0]; 2.33 turns, 67% finished" in text  # by hand: 4, 1, 2 turns; one at max_turns
    assert gain["gain"] == 0  # one win each way
    assert (f"**Paired gain** (`finetuned_react` minus `base_fewshot_react`, the same 3 questions): "
            f"+0.0 [{gain['lo'] * 100:+.1f}, {gain['hi'] * 100:+.1f}] EM points; its CI includes 0") in text
    assert "Why episodes failed" not in text  # before failures.csv exists
    summary = tables.paper_table(p, table)  # ours, FireAct's released runs, the paper's EM, as notebook 03 saves them
    saved = pd.read_csv(p.run_dir / "tables" / "summary_vs_paper.csv")
    assert list(saved["source"]) == list(summary["source"]) and saved["source"].iloc[0] == "this run"
    assert {"FireAct released run", "FireAct paper"} <= set(saved["source"])
    failures.report(p, conds)
    text = summaries.evaluation(p.run_dir)
    # by hand: few-shot never searched twice; fine-tuned once never searched, once at the turn limit (a tie:
    # the class first in failures.CLASSES)
    assert ("**Why episodes failed** (`tables/failures.csv`; the most frequent class other than right):\n\n"
            "- base few-shot ReAct: never searched, 2 of 3 episodes (67%)\n"
            "- FireAct fine-tuned ReAct: never searched, 1 of 3 episodes (33%)\n") in text


# ---------------------------------------------------------------- notebooks 02, 04, 05

def test_fine_tune_summary_from_the_saved_record(tmp_path):
    """Notebook 02: a 3-epoch run over 500 examples at batch 8 (189 steps) whose loss is logged every
    5 steps, written by the trainer's own log writer: the step count comes from the params, not the
    last logged step (185); the minutes, tokens/s and memory from train_done.json."""
    from fireact_utils.config import TrainParams
    from fireact_utils.io import atomic_write_json
    from fireact_utils.train import _write_log

    tp = TrainParams(method="full", epochs=3, batch_size=8, logging_steps=5, learning_rate=1e-4)
    log = [{"step": s, "epoch": s / 63, "loss": 2.0 - s / 200, "num_tokens": 1000.0 * s} for s in range(5, 189, 5)]
    out = tmp_path / "finetune"
    _write_log(out, log)
    meta = {"params": tp.model_dump(mode="json"), "model": {"name": "smollm2-135m"}, "n_examples": 500,
            "n_tokens": 291_000, "n_loss_tokens": 120_500, "train_runtime_s": 3723.0, "resumed_from": None,
            "peak_memory_gb": 18.94, "peak_memory_of": "process RSS", "tokens_per_s": 49.7}
    atomic_write_json(out / "final" / "train_done.json", meta)
    text = summaries.fine_tune(tmp_path)
    assert text.startswith("**This run's fine-tune** (`smollm2-135m`, full fine-tune, loss on agent tokens, lr 0.0001):")
    assert "- 189 optimizer steps, 3.00 epochs over 500 examples (291,000 tokens, 120,500 of them with loss)" in text
    assert "- loss 1.975 at step 5 -> 1.075 at step 185" in text
    assert "- 62.0 min of training, 50 tokens/s" in text and "- peak memory 18.9 GB (process RSS)" in text
    atomic_write_json(out / "final" / "train_done.json", meta | {"resumed_from": str(out / "checkpoint-150")})
    assert "- 62.0 min of training (summed over resumes, the last from `checkpoint-150`), 50 tokens/s" \
        in summaries.fine_tune(tmp_path)
    atomic_write_json(out / "final" / "train_done.json", meta | {"train_runtime_s": None, "resumed_from": "c"})
    assert "- training time unknown (resumed from a checkpoint saved without its clock), 50 tokens/s" \
        in summaries.fine_tune(tmp_path)


def test_a_fine_tune_that_logged_no_step_draws_no_loss_curve(tmp_path, capsys):
    """Fewer steps than train.logging_steps: the trainer's log has no row, and `finetune` ends with a
    line saying so, not an error after the model is saved."""
    from fireact_utils.plots import plot_run_loss_curve
    from fireact_utils.train import _write_log

    _write_log(tmp_path / "finetune", [])
    assert plot_run_loss_curve(tmp_path) is None
    assert "nothing to plot for the loss curve" in capsys.readouterr().out
    assert not (tmp_path / "figures").exists()


def test_scaling_and_robustness_summary_from_saved_tables(tmp_path, data_dir):
    """Notebook 04: tables built by the real table code from real records (agent loop, scripted
    model) and written as the notebook writes them; a sweep without a table gets no line."""
    import pandas as pd
    from eval_records import react_records

    from fireact_utils.evaluate import fmt_pct_ci, grouped_results_table, results_table, write_table
    from fireact_utils.tables import condition_label, noise_effects

    base, ft, _ = react_records(data_dir)
    tables = tmp_path / "tables"
    assert "wrote no table" in summaries.scaling_and_robustness(tmp_path, "hotpotqa")
    for stem, corrupted in (("robustness", 25), ("robustness_hotpotqa-wiki", 1)):
        name = "finetuned_react_noise_none_0.5"  # its records: the other agent's, so EM moves per question
        table = results_table({condition_label("finetuned_react"): ft, condition_label(name): base}, 200,
                              extra={condition_label(name): {"noise_rate": 0.5, "noise_corrupted": corrupted}})
        write_table(noise_effects(table, {name: base}, {"finetuned": ft}, 200), tables / stem)
    text = summaries.scaling_and_robustness(tmp_path, "hotpotqa")
    row = pd.read_csv(tables / "robustness.csv").iloc[1]
    assert text.startswith("**Noisy tool on hotpotqa** (`tables/robustness.csv`;")
    assert (f'- FireAct fine-tuned ReAct, 50% of obs -> "None": EM {fmt_pct_ci(row["em"], row["em_lo"], row["em_hi"])}, '
            f'vs clean {row["vs_clean"] * 100:+.1f} [{row["vs_clean_lo"] * 100:+.1f}, {row["vs_clean_hi"] * 100:+.1f}]; '
            '25 corrupted observations\n') in text
    assert row["vs_clean"] == 0 and row["vs_clean_lo"] < 0 < row["vs_clean_hi"]  # one question lost, one won
    assert "**Noisy tool on hotpotqa-wiki**" in text and "; 1 corrupted observation (too few to measure robustness)" in text
    assert text.count("- FireAct fine-tuned ReAct") == 2  # the clean rows are the reference, not lines
    assert "Generalization" not in text and "Data scaling" not in text and "Mixtures" not in text
    write_table(grouped_results_table({"hotpotqa-wiki": {"base few-shot ReAct": base, "FireAct fine-tuned": ft}}, 200),
                tables / "generalization")
    write_table(results_table({100: base, 500: ft}, 200).assign(n_trajectories=[100, 500]), tables / "data_scaling")
    write_table(results_table({"hotpotqa_multimethod": ft}, 200), tables / "mixtures")
    lines = summaries.scaling_and_robustness(tmp_path, "hotpotqa").splitlines()
    r = results_table({"ft": ft}, 200).iloc[0]
    em = f"EM {fmt_pct_ci(r['em'], r['em_lo'], r['em_hi'])}"
    assert r["em"] == results_table({"base": base}, 200).iloc[0]["em"] == 1 / 3  # one question right each
    assert lines[-3] == f"- **Generalization**: hotpotqa-wiki (3 questions): base few-shot ReAct {em}, FireAct fine-tuned {em}."
    assert lines[-2] == f"- **Data scaling** (fine-tuned on the first N trajectories): N = 100: {em}; N = 500: {em}."
    assert lines[-1] == f"- **Mixtures** (fine-tuned on each dataset): hotpotqa_multimethod: {em}."


def test_beyond_sft_summary_from_saved_tables(tmp_path, data_dir):
    """Notebook 05: `self_improve.round_table` and rl.report's table of real records, saved as their
    stages save them; the paired gains are read back with their sign."""
    from eval_records import react_records

    from fireact_utils.evaluate import fmt_pct_ci
    from fireact_utils.self_improve import round_table

    base, ft, _ = react_records(data_dir)
    p = load_params(SMOKE, [f"output_root={tmp_path}"])
    tables = p.run_dir / "tables"
    tables.mkdir(parents=True)
    assert "ran neither study" in summaries.beyond_sft(p.run_dir)
    si = round_table(p, [{"round": 0, "control": False, "steps": 126, "val": base, "test": base},
                         {"round": 1, "control": False, "steps": 176, "added": 204, "yield": 0.174, "val": ft, "test": base},
                         {"round": 1, "control": True, "steps": 176, "val": base, "test": base}])
    si.to_csv(tables / "self_improve.csv", index=False)
    text = summaries.beyond_sft(p.run_dir)
    assert "GRPO" not in text
    r0, r1 = si.iloc[0], si.iloc[1]
    em = f"{fmt_pct_ci(r0['val_em'], r0['val_lo'], r0['val_hi'])} (3 q)"
    gain = f"{r1['val_gain'] * 100:+.1f} [{r1['val_gain_lo'] * 100:+.1f}, {r1['val_gain_hi'] * 100:+.1f}]"
    assert f"- SFT student: val EM {em}; test EM {em}\n" in text
    assert f"- round 1 (+204 of its own episodes, yield 17%, 176 steps): val EM {em}, {gain}; " in text
    assert "- control of round 1 (GPT-4 data alone, 176 steps): " in text and "round 1 minus this control: val " in text
    assert r1["val_gain"] == 0 and r1["val_gain_lo"] < 0 < r1["val_gain_hi"]  # one question won, one lost
    rl_table = round_table(p, [{"round": 0, "val": base, "test": base}, {"round": 1, "val": ft, "test": ft}])
    rl_table.insert(0, "model", ["SFT student", "GRPO, 20 steps"])
    rl_table.to_csv(tables / "rl.csv", index=False)
    text = summaries.beyond_sft(p.run_dir)
    assert "**GRPO** (`tables/rl.csv`" in text and f"\n- SFT student: val EM {em}; test EM {em}\n- GRPO, 20 steps: " in text
    assert text.endswith(f"test EM {em}, {gain}")  # GRPO's records are round 1's: the same paired gain
