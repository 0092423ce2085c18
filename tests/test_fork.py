"""A fork begins a new run from another's outputs: on a run made by the real stages (the agent loop
on a scripted model), it copies what the stages reuse and nothing they make again, its conditions
continue under their keys on more questions without touching the source, and it refuses to overwrite."""

from __future__ import annotations

import json

import pytest
from scripted import ScriptedLLM

from fireact_utils.cli import main
from fireact_utils.config import load_params
from fireact_utils.fork import fork
from fireact_utils.io import atomic_write_json, atomic_write_text
from fireact_utils.pipeline import finetuned_agent, run_condition


def _reply(text: str) -> str:
    return "Thought: I know it.\nAction: finish[Paris]"


@pytest.fixture
def demo(tmp_path, data_dir):
    """A run `cpu` holding 2 fine-tuned episodes, a finished fine-tune with a checkpoint, and the
    tables, figures and notebooks a chain would have left."""
    p = load_params("params/smoke.yaml", [f"output_root={tmp_path / 'runs'}", "name=cpu", "evaluate.n_questions=2"])
    run_condition(p, "finetuned_react", ScriptedLLM(_reply), finetuned_agent(p), progress=False)
    ft = p.run_dir / "finetune"
    atomic_write_json(ft / "final" / "train_done.json", {"n_examples": 8})
    atomic_write_text(ft / "train_log.csv", "step,loss\n1,2.0\n")
    atomic_write_text(ft / "checkpoint-1" / "optimizer.pt", "state")
    for made in ("tables/main.csv", "figures/loss_curve.png", "notebooks/03_evaluate.done", "params.json"):
        atomic_write_text(p.run_dir / made, "x")
    return p


def test_fork_copies_what_stages_reuse(demo, capsys):
    src, dest = demo.run_dir, demo.run_dir.parent / "ex03_200"
    assert main(["fork", str(src), str(dest)]) == 0
    assert "run it with name=ex03_200" in capsys.readouterr().out
    got = sorted(str(f.relative_to(dest)) for f in dest.rglob("*") if f.is_file())
    assert got == ["eval/finetuned_react.jsonl", "eval/finetuned_react.meta.json", "finetune/final/train_done.json",
                   "finetune/train_log.csv"]
    assert (dest / "eval" / "finetuned_react.jsonl").read_bytes() == (src / "eval" / "finetuned_react.jsonl").read_bytes()
    assert (src / "finetune" / "checkpoint-1" / "optimizer.pt").is_file() and (src / "tables" / "main.csv").is_file()
    with pytest.raises(ValueError, match="exists: a fork starts a new run"):
        fork(src, dest)
    assert main(["fork", str(src / "eval"), str(dest.parent / "other")]) == 2  # not a run dir: one error line
    assert "is not a run directory" in capsys.readouterr().err


def test_a_forked_condition_runs_only_its_new_questions(demo):
    """Notebook 03's exercise 1: the fork on twice the questions reuses the saved episodes (same key)
    and runs only the new ones; the source's episodes file is left as it was."""
    fork(demo.run_dir, demo.run_dir.parent / "ex03_200")
    before = (demo.run_dir / "eval" / "finetuned_react.jsonl").read_bytes()
    q = load_params("params/smoke.yaml", [f"output_root={demo.output_root}", "name=ex03_200", "evaluate.n_questions=4"])
    llm = ScriptedLLM(_reply)
    recs = run_condition(q, "finetuned_react", llm, finetuned_agent(q), progress=False)
    assert len(recs) == 4 and len(llm.prompts) == 2  # one turn each, for the two new questions only
    saved = [json.loads(line)["id"] for line in (q.run_dir / "eval" / "finetuned_react.jsonl").read_text().splitlines()]
    assert saved == [r["id"] for r in recs]
    assert (demo.run_dir / "eval" / "finetuned_react.jsonl").read_bytes() == before
