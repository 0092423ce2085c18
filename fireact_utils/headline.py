"""The headline study: few-shot baselines and the fine-tuned agent on evaluate.task, the recipe over
study.seeds, every seed's agent in the held-out environments of study.transfer_tasks, and the
self-consistency curve of both agents (study.sc_ks). study.preregistered freezes it (`holdout`).

    python -m fireact_utils headline params/headline.yaml     # in one process
    python -m fireact_utils pieces params/headline.yaml       # or in pieces (`pieces`): baselines, fewshot-votes, seed-<s>...

`report` computes whatever is not saved yet and writes the tables; the pieces split that work by
model (`run_baselines`, `run_fewshot_votes`: the base model's greedy and sampled evaluations; `run_seed`: one training seed's fine-tune and
all of its evaluations), so `report` after a merge only reads episodes.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import pipeline, recipes, self_consistency
from .config import Params


def run_baselines(p: Params, progress: bool = True) -> None:
    """The base model's greedy evaluations: few-shot baselines and their transfer rows."""
    from .holdout import preregister

    preregister(p)
    pipeline.baselines(p, progress)
    if p.study.transfer_tasks:
        recipes.transfer_base(p, progress)


def run_fewshot_votes(p: Params, progress: bool = True) -> None:
    """The base model's self-consistency samples (study.sc_n questions x max(sc_ks) episodes)."""
    from .holdout import preregister

    preregister(p)
    self_consistency.samples(p, "fewshot", None, progress)


def run_seed(p: Params, seed: int, progress: bool = True) -> Path:
    """Training seed `seed`'s fine-tune (the main one for train.seed) and every evaluation of it:
    evaluate.task, the transfer tasks, its self-consistency samples. Returns the fine-tune."""
    from .holdout import preregister

    preregister(p)
    main = seed == p.train.seed
    trained = pipeline.finetune(p) if main else recipes.seed_model(p, seed, None)
    name = "finetuned_react" if main else f"finetuned_react_seed{seed}"
    pipeline.run_condition(p, name, pipeline.local_llm(p, trained), pipeline.finetuned_agent(p), progress=progress)
    if p.study.transfer_tasks:
        recipes.transfer_seed(p, seed, trained, progress)
    samplers = self_consistency.finetuned_samplers(p)
    who = next((w for w, s in samplers.items() if s == seed or (s is None and main)), None)
    if p.study.sc_ks and "finetuned" in p.study.sc_agents and who is not None:
        self_consistency.samples(p, who, trained, progress)
    return trained


def report(p: Params, progress: bool = True) -> dict:
    """The headline's tables (notebook 03's: main, paired_gain, summary_vs_paper, failures; then
    headline_seeds, headline_transfer, self_consistency) and figures, running whatever is not saved
    yet; printed as the CLI shows them."""
    from . import failures
    from .holdout import preregister
    from .tables import main_table, paired_gain, paper_table

    preregister(p)
    trained = pipeline.finetune(p)
    conds = pipeline.evaluate(p, trained, progress)
    table = main_table(p, conds)  # the same functions as notebook 03, so the same files
    out = {"main": table, "gain": paired_gain(p, conds), "paper": paper_table(p, table),
           "failures": failures.report(p, conds)[0]}
    print(table[["condition", "n", "em", "em_lo", "em_hi", "turns", "completion_tokens"]].to_string(index=False))
    print(json.dumps(out["gain"]))
    print(failures.failure_markdown(out["failures"]))
    if p.study.seeds:
        out["seeds"] = recipes.report_seeds(p, trained, conds.get("base_fewshot_react"), progress)
        print(out["seeds"][[c for c in recipes.SEED_COLUMNS if c in out["seeds"]]].to_string(index=False))
    if p.study.transfer_tasks:
        out["transfer"] = recipes.report_transfer(p, trained, progress)
        print(out["transfer"][["task", *[c for c in recipes.SEED_COLUMNS if c in out["transfer"]]]].to_string(index=False))
    if p.study.sc_ks:
        out["self_consistency"] = self_consistency.report(p, trained, progress)
        print(out["self_consistency"].to_string(index=False))
    return out
