"""Notebook 04's sweeps around the main recipe: data scaling, dataset mixtures, a noisy search
tool, and transfer to other tasks. Each fine-tunes and evaluates through the stages of `pipeline`,
so every sweep resumes by condition name. The `report_*` functions write each sweep's table and
figure; notebook 04 and `python -m fireact_utils sweeps` both call them, so both write the same files:

    python -m fireact_utils sweeps params/cpu_full.yaml     # every sweep the params turn on (`report`)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .config import Params
from .pipeline import (
    SEARCHING,
    dataset_pool,
    evaluate,
    fewshot_react,
    finetune,
    finetuned_agent,
    local_llm,
    run_condition,
    run_task,
    searching_react,
)
from .tables import GENERALIZATION_LABELS, condition_table, noise_effects, outcome_table, task_slug

if TYPE_CHECKING:
    import pandas as pd


def scaling_runs(p: Params) -> dict[int, tuple[Params, list[dict], Path]]:
    """Per N in study.data_sizes: params, the first N trajectories and the dir to fine-tune into.
    An N whose trajectories are the main dataset's uses the main fine-tune (`finetune/`): same
    data, same recipe, so it is trained once."""
    import json

    from .data import load_dataset_source, mix

    def canonical(recs: list[dict]) -> list[str]:  # the same records in any order compare equal
        return sorted(json.dumps(r, sort_keys=True) for r in recs)

    main = p.run_dir / "dataset" / "trajectories.jsonl"
    main_recs = canonical(load_dataset_source(str(main))) if main.is_file() else None
    source, _ = dataset_pool(p)  # released and generated: a size above the released 500 can work
    runs = {}
    for n in p.study.data_sizes:
        q = p.model_copy(update={"dataset": p.dataset.model_copy(update={"n_trajectories": n})})
        recs = mix(source, q.dataset.mixture or None, n, q.dataset.seed, q.dataset.tasks)
        same = canonical(recs) == main_recs
        runs[n] = (q, recs, p.run_dir / "finetune" if same else p.run_dir / "scaling" / f"n{n}")
    return runs


def data_scaling(p: Params, progress: bool = True) -> dict[int, list[dict]]:
    """Fine-tune on the first N trajectories for each N in study.data_sizes; evaluate each."""
    out = {}
    for n, (q, recs, out_dir) in scaling_runs(p).items():
        trained = finetune(q, recs, out_dir)
        out[n] = run_condition(p, f"scaling_n{n}", local_llm(p, trained), finetuned_agent(p), progress=progress)
    return out


def mixtures(p: Params, progress: bool = True) -> dict[str, list[dict]]:
    """Fine-tune on each FireAct dataset in study.mixtures (label -> fireact:<name>); evaluate each."""
    from .data import load_dataset_source, mix

    out = {}
    for label, source in p.study.mixtures.items():
        recs = mix(load_dataset_source(source, p.data_dir, p.train.format), None, None, p.dataset.seed)
        trained = finetune(p, recs, p.run_dir / "mixtures" / label)
        out[label] = run_condition(p, f"mix_{label}", local_llm(p, trained), finetuned_agent(p), progress=progress)
    return out


def noise_conditions(p: Params, trained: str | Path, task: str | None = None,
                     progress: bool = True) -> dict[str, list[dict]]:
    """The fine-tuned agent (and, if asked, the few-shot base: on the main task also its prompt that
    must search, whose episodes see the noise) with a noisy search tool on `task` (default
    evaluate.task; another task runs study.generalization_n of its questions)."""
    conds: dict[str, list[dict]] = {}
    runs = [("finetuned", trained, finetuned_agent(p))]
    main = task in (None, p.evaluate.task)
    if p.study.noisy_fewshot:
        runs.append(("base_fewshot", None, fewshot_react(p)))
        if main and p.evaluate.searching_baseline:
            runs.append(("base_fewshot_searching", None, searching_react(p)))
    # The main task keeps the names it always had; another task's conditions carry its name.
    tag, n = ("", None) if main else (f"_{task_slug(task)}", transfer_n(p, task))
    for label, model, ap in runs:
        llm = local_llm(p, model)
        for kind in p.study.noise_kinds:
            for rate in p.study.noise_rates:
                sp = p.search.model_copy(update={"noise_rate": rate, "noise_kind": kind})
                name = f"{label}_react{tag}_noise_{kind}_{rate:g}"
                conds[name] = run_condition(p, name, llm, ap, sp, None if main else task, n, progress=progress)
    return conds


def robustness(p: Params, trained: str | Path, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Per task of study.noise_tasks (default: evaluate.task), e.g. the replay's HotpotQA and
    HotpotQA-wiki: a condition table of the clean ReAct agents and each noisy condition, with
    `noise_effects`' columns (paired EM vs the clean agent, too few corrupted observations)."""
    tables = {}
    for task in p.study.noise_tasks or [p.evaluate.task]:
        if task == p.evaluate.task:
            names = {"base_fewshot": "base_fewshot_react", "base_fewshot_searching": SEARCHING,
                     "finetuned": "finetuned_react"}
            clean = {k: v for k, v in evaluate(p, trained, progress).items() if k in names.values()}
        else:
            names = {"base_fewshot": f"gen_{task_slug(task)}_base", "finetuned": f"gen_{task_slug(task)}_ft"}
            clean = transfer_pair(p, trained, task, progress)
        noisy = noise_conditions(p, trained, task, progress)
        by_agent = {who: clean[n] for who, n in names.items() if n in clean}
        tables[task] = noise_effects(condition_table(p, clean | noisy), noisy, by_agent, p.evaluate.bootstrap)
    return tables


def transfer_n(p: Params, task: str) -> int:
    """Questions a sweep runs on another task: study.generalization_n, else all of its default split."""
    return p.study.generalization_n or len(run_task(p, task))


def transfer_pair(p: Params, trained: str | Path, task: str, progress: bool = True) -> dict[str, list[dict]]:
    """Base few-shot ReAct and the fine-tuned agent on `task` (its default split, study.generalization_n
    questions; a wiki task in its own Wikipedia corpus), named gen_<task>_base / gen_<task>_ft."""
    slug, n = task_slug(task), transfer_n(p, task)
    return {f"gen_{slug}_base": run_condition(p, f"gen_{slug}_base", local_llm(p), fewshot_react(p), task=task, n=n,
                                              progress=progress),
            f"gen_{slug}_ft": run_condition(p, f"gen_{slug}_ft", local_llm(p, trained), finetuned_agent(p), task=task,
                                            n=n, progress=progress)}


def generalization(p: Params, trained: str | Path, progress: bool = True) -> dict[str, dict[str, list[dict]]]:
    """Base few-shot ReAct vs fine-tuned on each of study.generalization_tasks (`transfer_pair`)."""
    out: dict[str, dict[str, list[dict]]] = {}
    for task in p.study.generalization_tasks:
        base, ft = transfer_pair(p, trained, task, progress).values()
        out[task] = {GENERALIZATION_LABELS["base"]: base, GENERALIZATION_LABELS["ft"]: ft}
    return out


# ---------------------------------------------------------------- tables and figures (notebook 04, `sweeps`)

def react_rows(clean: pd.DataFrame) -> pd.DataFrame:
    """The clean ReAct rows of a `condition_table` (few-shot and fine-tuned): a sweep's reference lines."""
    return clean[clean["method"] == "react"]


def robustness_stem(p: Params, task: str) -> str:
    """The tables/ and figures/ stem of `task`'s noisy-tool study: `robustness` on evaluate.task,
    else `robustness_<task>` (`summaries.scaling_and_robustness` reads them back by these names)."""
    return "robustness" if task == p.evaluate.task else f"robustness_{task_slug(task)}"


def report_generalization(p: Params, trained: str | Path, progress: bool = True) -> pd.DataFrame:
    """`generalization`'s table, to tables/generalization.{csv,md} with its figure."""
    from .evaluate import write_table
    from .plots import plot_generalization
    from .tables import generalization_table

    table = generalization_table(p, generalization(p, trained, progress))
    write_table(table, p.run_dir / "tables" / "generalization")
    plot_generalization(table, stem=p.run_dir / "figures" / "generalization")
    return table


def report_robustness(p: Params, trained: str | Path, progress: bool = True) -> dict[str, pd.DataFrame]:
    """`robustness`' table of each noise task, to tables/<robustness_stem>.{csv,md} with its figure."""
    from .evaluate import write_table
    from .plots import plot_robustness

    out = robustness(p, trained, progress)
    for task, table in out.items():
        write_table(table, p.run_dir / "tables" / robustness_stem(p, task))
        plot_robustness(table, stem=p.run_dir / "figures" / robustness_stem(p, task))
    return out


def report_outcomes(p: Params) -> pd.DataFrame:
    """`tables.outcome_table` (every wiki condition the run has), to tables/wiki_outcomes.csv with its
    figure; a run with no wiki condition writes nothing and gets an empty table."""
    from .io import atomic_write_text
    from .plots import plot_outcomes

    table = outcome_table(p)
    if len(table):
        atomic_write_text(p.run_dir / "tables" / "wiki_outcomes.csv", table.to_csv(index=False))
        plot_outcomes(table, stem=p.run_dir / "figures" / "outcomes")
    return table


def report_data_scaling(p: Params, clean: pd.DataFrame, progress: bool = True) -> pd.DataFrame:
    """EM per N of study.data_sizes (`data_scaling`, column `n_trajectories`), to
    tables/data_scaling.{csv,md}; its figure puts `clean`'s ReAct rows (a `condition_table`) beside it."""
    from .evaluate import results_table, write_table
    from .plots import plot_data_scaling

    scaling = data_scaling(p, progress)
    table = results_table(scaling, p.evaluate.bootstrap).assign(n_trajectories=list(scaling))
    write_table(table, p.run_dir / "tables" / "data_scaling")
    plot_data_scaling(table, reference=react_rows(clean), stem=p.run_dir / "figures" / "data_scaling")
    return table


def report_mixtures(p: Params, clean: pd.DataFrame, progress: bool = True) -> pd.DataFrame:
    """EM per dataset of study.mixtures (`mixtures`), to tables/mixtures.{csv,md}; its figure puts
    `clean`'s ReAct rows beside it."""
    from .evaluate import results_table, write_table
    from .plots import plot_mixtures

    table = results_table(mixtures(p, progress), p.evaluate.bootstrap)
    write_table(table, p.run_dir / "tables" / "mixtures")
    plot_mixtures(table, reference=react_rows(clean), stem=p.run_dir / "figures" / "mixtures")
    return table


def any_sweep(p: Params) -> bool:
    """Whether the params turn on any of notebook 04's sweeps."""
    s = p.study
    return bool(s.generalization_tasks or (s.noise_rates and s.noise_kinds) or s.data_sizes or s.mixtures)


def report(p: Params, trained: str | Path, progress: bool = True) -> dict[str, object]:
    """Every sweep the params turn on, in notebook 04's order, each written by its `report_*`."""
    s, out = p.study, {}
    clean = condition_table(p, evaluate(p, trained, progress))
    if s.generalization_tasks:
        out["generalization"] = report_generalization(p, trained, progress)
    if s.noise_rates and s.noise_kinds:
        out["robustness"] = report_robustness(p, trained, progress)
    if len(outcomes := report_outcomes(p)):
        out["outcomes"] = outcomes
    if s.data_sizes:
        out["data_scaling"] = report_data_scaling(p, clean, progress)
    if s.mixtures:
        out["mixtures"] = report_mixtures(p, clean, progress)
    return out
