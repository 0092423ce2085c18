"""Self-improvement by rejection sampling: the student fine-tuned again on its own successes.

Round r = 1..self_improve.rounds: the round r-1 student (round 0 is the SFT student) samples
self_improve.k episodes per training question at self_improve.temperature, searching the
training task's own environment; the reward-1 episodes are kept, each distinct trajectory once;
the base model is fine-tuned afresh, with the run's recipe, on the run's GPT-4 data plus every
success of rounds 1..r (re-training from the base, as STaR does, so errors do not compound
across rounds). Training questions (default HotpotQA-wiki `train`) share no question with any
validation or test set: `holdout.check_training` refuses the round otherwise.

Each round's student is scored on the selection split (validation) and on evaluate.task (test),
paired with the SFT student on the same questions. A round also trains more optimizer steps than
the SFT student (more data, same epochs); its equal-steps control (`self_improve.controls`) is the
base model fine-tuned on the GPT-4 data alone for the round's steps, so the round's gain over its
control is what the student's own episodes add.

    table = self_improve.report(p, "outputs/runs/cpu/finetune/final")   # a row per round, saved

run_dir/self_improve/round<r>/ holds the round's data (trajectories.jsonl) and model (final/),
control<r>/ its control's model; samples are conditions si_r<r>_s<j> in eval/, scores
si_round<r>_{val,test} and si_control<r>_{val,test} (the SFT student's: sft_val, and notebook 03's
finetuned_react).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .evaluate import bootstrap_ci, episode_values, paired_bootstrap_diff
from .holdout import check_training, question_key
from .io import read_jsonl, write_jsonl
from .pipeline import finetune, finetuned_agent, local_llm, run_condition, training_records
from .provenance import condition_meta
from .tasks import load_task
from .train import optimizer_steps, read_train_meta
from .trajectories import react_text

if TYPE_CHECKING:
    import pandas as pd

    from .config import Params, TrainingQuestions


def training_questions(p: Params, where: TrainingQuestions | None = None):
    """(task, indices): `where`'s training questions (default p.self_improve), all of the split
    unless n_questions, checked disjoint from every held-out set (`holdout`)."""
    w = where or p.self_improve
    t = load_task(w.task, w.split, p.data_dir, p.multihop_dir)
    idx = list(range(min(w.n_questions or len(t), len(t))))
    check_training(p, [t.questions[i] for i in idx], f"{t.name} {t.split}")
    return t, idx


def sample(p: Params, r: int, trained: str | Path, progress: bool = True) -> list[list[dict]]:
    """self_improve.k sampled runs of the round r-1 student `trained` on the training questions."""
    import torch

    s = p.self_improve
    task, idx = training_questions(p)
    llm = local_llm(p, trained)
    agent = finetuned_agent(p).model_copy(update={"temperature": s.temperature})
    runs = []
    for j in range(s.k):
        torch.manual_seed(1000 * r + j)  # a sample re-run from scratch draws the same tokens
        runs.append(run_condition(p, f"si_r{r}_s{j}", llm, agent, task=s.task, split=s.split, n=len(idx),
                                  progress=progress))
    return runs


def sample_yield(runs: list[list[dict]]) -> dict:
    """What a round's samples (`sample`) found: questions and episodes, the share of episodes that
    earned reward 1 (`yield`) and the share of questions some episode solved (`questions_solved`)."""
    episodes = [e for run in runs for e in run]
    return {"questions": len(runs[0]), "episodes": len(episodes),
            "yield": sum(e["reward"] for e in episodes) / max(len(episodes), 1),
            "questions_solved": len({e["id"] for e in episodes if e["reward"]}) / max(len(runs[0]), 1)}


def successes(runs: list[list[dict]], r: int) -> list[dict]:
    """The reward-1 episodes as trajectory records, each distinct (question, text) once."""
    seen: set[tuple[str, str]] = set()
    out = []
    for run in runs:
        for e in run:
            key = (question_key(e["question"]), react_text(e["steps"]))
            if e["reward"] and key not in seen:
                seen.add(key)
                out.append({"question": e["question"], "preamble": "", "steps": e["steps"], "task": e["task"],
                            "method": "react", "reward": True, "source": f"self:round{r}", "episode": e["id"]})
    return out


def run_round(p: Params, r: int, sampler: str | Path, gpt4: list[dict], earlier: list[dict],
              progress: bool = True) -> tuple[Path, dict]:
    """Round r: sample with `sampler`, keep successes, fine-tune on `gpt4` + `earlier` + them.
    Returns the round's model and its figures (yield, data, cost)."""
    out = p.run_dir / "self_improve" / f"round{r}"
    runs = sample(p, r, sampler, progress)
    new = successes(runs, r)
    write_jsonl(out / "trajectories.jsonl", new)
    records = [*gpt4, *earlier, *new]
    trained = finetune(p, records, out)
    episodes = [e for run in runs for e in run]
    metas = [condition_meta(p, f"si_r{r}_s{j}") for j in range(len(runs))]
    return trained, {
        "round": r, "control": False, **sample_yield(runs), "added": len(new), "self_total": len(earlier) + len(new),
        "steps": optimizer_steps(p.train, len(records)),
        "sample_s": sum(m.get("wall_s", 0.0) for m in metas),
        "sample_tokens": sum(e["prompt_tokens"] + e["completion_tokens"] for e in episodes),
        "train_s": _train_seconds(trained)}


def control(p: Params, r: int, steps: int, gpt4: list[dict]) -> tuple[Path, dict]:
    """Round r's equal-steps control: the base model fine-tuned on `gpt4` alone for the round's
    `steps` optimizer steps (same recipe and learning-rate schedule length); its model and figures."""
    pc = p.model_copy(update={"train": p.train.model_copy(update={"max_steps": steps})})
    trained = finetune(pc, gpt4, p.run_dir / "self_improve" / f"control{r}")
    return trained, {"round": r, "control": True, "steps": steps, "train_s": _train_seconds(trained)}


def _train_seconds(trained: Path) -> float | None:
    return read_train_meta(trained).get("train_runtime_s")  # None: resumed without the checkpoint's clock


def scores(p: Params, tag: str, trained: str | Path, progress: bool = True) -> dict[str, list[dict]]:
    """A student on validation (the selection split, condition <tag>_val) and test (evaluate.task,
    <tag>_test); the SFT student (tag "sft") is tested as notebook 03's `finetuned_react`, which
    must be its episodes (`run_condition` checks the model): test runs first, so a run of another
    student is refused before any validation episode."""
    from .recipes import select_condition

    llm, agent = local_llm(p, trained), finetuned_agent(p)
    test = run_condition(p, "finetuned_react" if tag == "sft" else f"{tag}_test", llm, agent, progress=progress)
    return {"val": select_condition(p, f"{tag}_val", llm, agent, progress), "test": test}


def rounds(p: Params, trained: str | Path, progress: bool = True) -> list[dict]:
    """Round 0 (the SFT student `trained`), rounds 1..self_improve.rounds and the controls asked
    for (each after its round, `control` True): a dict each with its figures and `val`/`test` records."""
    gpt4 = training_records(p)  # the run's GPT-4 data, in every round's and control's training set
    rows = [{"round": 0, "control": False, "steps": optimizer_steps(p.train, len(gpt4)), "model": str(trained),
             **scores(p, "sft", trained, progress)}]
    model, earlier = Path(trained), []
    for r in range(1, p.self_improve.rounds + 1):
        model, info = run_round(p, r, model, gpt4, earlier, progress)
        earlier += read_jsonl(p.run_dir / "self_improve" / f"round{r}" / "trajectories.jsonl")
        rows.append({**info, "model": str(model), **scores(p, f"si_round{r}", model, progress)})
        if r in p.self_improve.controls:
            ctrl, info = control(p, r, info["steps"], gpt4)
            rows.append({**info, "model": str(ctrl), **scores(p, f"si_control{r}", ctrl, progress)})
    return rows


def round_table(p: Params, rows: list[dict]) -> pd.DataFrame:
    """A row per round (and control): yield, data added, EM with CIs on val and test, the paired
    gain over the SFT student (round 0) with its CI, and the cost. A control's row also holds its
    round's paired gain over it (`{split}_own`: what the student's own episodes add); a round
    after the first, its paired gain over the round before (`{split}_prev`: does it compound)."""
    import pandas as pd

    out, prev = [], None
    for i, row in enumerate(rows):
        line = {k: v for k, v in row.items() if k not in ("val", "test", "model")}
        for split in ("val", "test"):
            em = episode_values(row[split], "em")
            line[f"{split}_n"] = len(em)
            line[f"{split}_em"], line[f"{split}_lo"], line[f"{split}_hi"] = bootstrap_ci(em, p.evaluate.bootstrap)
            base = episode_values(rows[0][split], "em")
            line[f"{split}_gain"], line[f"{split}_gain_lo"], line[f"{split}_gain_hi"] = \
                paired_bootstrap_diff(base, em, p.evaluate.bootstrap)
            if row.get("control"):  # rows[i - 1] is its round
                line[f"{split}_own"], line[f"{split}_own_lo"], line[f"{split}_own_hi"] = \
                    paired_bootstrap_diff(em, episode_values(rows[i - 1][split], "em"), p.evaluate.bootstrap)
            elif prev is not None and prev > 0:
                line[f"{split}_prev"], line[f"{split}_prev_lo"], line[f"{split}_prev_hi"] = \
                    paired_bootstrap_diff(episode_values(rows[prev][split], "em"), em, p.evaluate.bootstrap)
        if not row.get("control"):
            prev = i
        out.append(line)
    return pd.DataFrame(out)


def report(p: Params, trained: str | Path, progress: bool = True) -> pd.DataFrame:
    """`round_table` of `rounds`, written to tables/self_improve.csv with its figure."""
    from .io import atomic_write_text
    from .plots import plot_rounds

    table = round_table(p, rounds(p, trained, progress))
    atomic_write_text(p.run_dir / "tables" / "self_improve.csv", table.to_csv(index=False))
    plot_rounds(table, p.run_dir / "figures" / "self_improve")
    return table
