"""The base-model axis: FireAct's comparison across students, each with its own recipe.

For each model of study.base_models: the recipe is re-chosen on the selection split (study.recipes,
`recipes.recipe_search`; a recipe good for one model need not be for another, and choosing on a test
split is refused by `holdout.check_choice`), the chosen recipe's fine-tune is evaluated beside the
model's few-shot ReAct on each of study.base_model_evals (default: all 300 HotpotQA-wiki test
questions and FireAct's dev-500), and one table and one figure put the models side by side.

Each model works in its own run dir, <run>/base_models/<model>/, holding what a run of its own would
(recipes/<label>/ fine-tunes, eval/ conditions, tables/recipes_selection.*), so no two models ever
share a condition or a fine-tune; everything resumes.

    python -m fireact_utils base-models params/base_models.yaml
    table = base_models.report(p)   # tables/base_models.{csv,md}, figures/base_models.{png,svg}

Shortcut: the few-shot prompt is the run's (agent.*), not re-chosen per model. Peak memory is the
fine-tune's own record (train_done.json: torch's allocated peak on GPU, the process's peak RSS on CPU).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Params, override
from .evaluate import results_table, write_table
from .holdout import check_choice
from .io import atomic_write_text
from .pipeline import (
    agent_model,
    fewshot_react,
    finetune,
    finetuned_agent,
    local_llm,
    run_condition,
    saved_condition,
)
from .recipes import chosen_label, recipe_records, recipe_search, report_selection, variants
from .tables import paired_gain, table_extras, task_slug
from .train import read_train_meta

if TYPE_CHECKING:
    import pandas as pd

AGENTS = {"fewshot": "few-shot ReAct", "finetuned": "fine-tuned ReAct"}  # condition prefix -> table label
COLUMNS = ("task", "condition", "recipe", "n", "em", "em_lo", "em_hi", "gain", "gain_lo", "gain_hi", "seconds_per_episode",
           "tokens_per_episode", "train_tokens_per_s", "train_peak_memory_gb")  # shown by the CLI


def model_slug(spec: str) -> str:
    """A model's folder name: its alias, or the last part of its path or HF id."""
    return re.sub(r"[^\w.-]+", "_", Path(spec.rstrip("/")).name)


def model_run(p: Params, spec: str) -> Params:
    """`p` for one model: model.name `spec` and run dir <run>/base_models/<slug>."""
    return override(p, {"model.name": spec, "model.adapter": None, "output_root": str(p.run_dir / "base_models"),
                        "name": model_slug(spec)}, f"study.base_models {spec}")


def eval_sets(p: Params) -> list[tuple[str, str, int]]:
    """study.base_model_evals as (task, split, n)."""
    return [(t, s, int(n)) for t, s, n in (e.rsplit(":", 2) for e in p.study.base_model_evals)]


def check_study(p: Params) -> None:
    """Before any work: distinct model folders, and no evaluation set sharing a question with the
    selection split (`check_choice`)."""
    slugs = [model_slug(m) for m in p.study.base_models]
    if dup := sorted({s for s in slugs if slugs.count(s) > 1}):
        raise ValueError(f"study.base_models: two models would share the folder {dup[0]!r}")
    check_choice(p)  # holdout's evaluation sets include study.base_model_evals


def chosen_finetune(q: Params, progress: bool = True) -> tuple[Params, str, Path]:
    """(params of the chosen recipe, its label, its fine-tune) for one model's run `q`: every
    recipe of study.recipes fine-tuned and scored on the selection split, the best by EM
    (`recipes.report_selection`); the chosen one's fine-tune is the search's own, reused."""
    label = chosen_label(report_selection(q, recipe_search(q, progress), "recipes"))
    qq = variants(q, "recipes")[label]
    return qq, label, finetune(qq, recipe_records(qq), q.run_dir / "recipes" / label)  # trained by the search


def condition_name(agent: str, task: str, split: str, n: int, recipe: str | None = None) -> str:
    """A condition of the axis; the fine-tuned agent's names its recipe (each recipe's piece scores its own)."""
    return f"{agent}_react_{task_slug(task)}_{split}_n{n}" + (f"_{recipe}" if agent == "finetuned" else "")


def model_conditions(q: Params, qq: Params | None, label: str | None, trained: Path | None,
                     progress: bool = True, fewshot: bool = True) -> dict[str, list[dict]]:
    """Condition name (`condition_name`) -> episodes: the base model's few-shot ReAct (run's prompt;
    with `fewshot`) and, given a recipe (its params `qq`, `label` and fine-tune), its fine-tuned
    agent, on each evaluation set; a model is loaded only if something is missing."""
    out = {}
    agents = [("fewshot", q.model, (q, None), fewshot_react(q))] if fewshot else []
    if qq is not None:
        agents.append(("finetuned", agent_model(qq, trained), (qq, trained), finetuned_agent(qq)))
    for agent, mp, llm_p, ap in agents:
        llm = None
        for task, split, n in eval_sets(q):
            name = condition_name(agent, task, split, n, label)
            recs = saved_condition(q, name, task, split, n, model=mp, agent=ap)
            if recs is None:
                llm = llm or local_llm(*llm_p)
                recs = run_condition(q, name, llm, ap, task=task, split=split, n=n, progress=progress)
            out[name] = recs
        del llm
    return out


def model_rows(q: Params, label: str, trained: Path, conds: dict[str, list[dict]]) -> pd.DataFrame:
    """`results_table` rows of one model (EM with CIs, by question type, tokens), with the eval set
    (`task`), seconds per episode, the fine-tuned rows' paired gain over few-shot (overall and by
    question type) and the fine-tune's cost (its train_done.json)."""
    meta = read_train_meta(trained)
    keyed, extra = {}, {}
    for (task, split, n), agent in ((e, a) for e in eval_sets(q) for a in AGENTS):
        name, where = condition_name(agent, task, split, n, label), f"{task} {split}"
        key, recs = f"{q.name}: {AGENTS[agent]} ({where})", conds[name]
        row = {"task": where, "model": q.model.name, "agent": agent, "mode": agent, "recipe": label,
               **next(iter(table_extras(q, [name]).values())),
               "tokens_per_episode": sum(r["prompt_tokens"] + r["completion_tokens"] for r in recs) / len(recs)}
        if agent == "finetuned":
            base = conds[condition_name("fewshot", task, split, n, label)]
            g = paired_gain(q, {"fewshot": base, "finetuned": recs}, "fewshot", "finetuned", save=False)
            row.update(gain=g["gain"], gain_lo=g["lo"], gain_hi=g["hi"],
                       **{f"gain_{t}{s}": v[k] for t, v in g["by_type"].items() for s, k in (("", "gain"), ("_lo", "lo"), ("_hi", "hi"))},
                       train_tokens_per_s=meta.get("tokens_per_s"), train_runtime_s=meta.get("train_runtime_s"),
                       train_peak_memory_gb=meta.get("peak_memory_gb"))
        keyed[key], extra[key] = recs, row
    return results_table(keyed, q.evaluate.bootstrap, extra=extra).assign(
        condition=lambda d: [f"{q.name}: {AGENTS[a]}" for a in d["agent"]])


def run_fewshot(p: Params, spec: str, progress: bool = True) -> None:
    """A piece (`pieces`): model `spec`'s few-shot ReAct on every evaluation set."""
    check_study(p)
    model_conditions(model_run(p, spec), None, None, None, progress)


def run_recipe(p: Params, spec: str, label: str, progress: bool = True) -> None:
    """A piece (`pieces`): model `spec` fine-tuned with recipe `label`, scored on the selection split
    and on every evaluation set. Every recipe's piece scores the evaluation sets, so no piece waits
    for another's choice; the report shows only the recipe chosen on the selection split."""
    check_study(p)
    q = model_run(p, spec)
    recipe_search(q, progress, only=[label])
    qq = variants(q, "recipes")[label]
    trained = finetune(qq, recipe_records(qq), q.run_dir / "recipes" / label)  # the search's own, reused
    model_conditions(q, qq, label, trained, progress, fewshot=False)


def report(p: Params, progress: bool = True) -> pd.DataFrame:
    """Every model of study.base_models chosen, fine-tuned and evaluated (resuming), written to
    tables/base_models.{csv,md} (the md with a gain-and-cost table below) and figures/base_models."""
    import pandas as pd

    from .plots import plot_base_models

    if not p.study.base_models:
        raise ValueError("study.base_models is empty: name the models, e.g. 'study.base_models=[smollm2-135m, gemma3-270m]'")
    check_study(p)
    parts = []
    for spec in p.study.base_models:
        q = model_run(p, spec)
        qq, label, trained = chosen_finetune(q, progress)
        parts.append(model_rows(q, label, trained, model_conditions(q, qq, label, trained, progress)))
    table = pd.concat(parts, ignore_index=True)
    _, md = write_table(table, p.run_dir / "tables" / "base_models")
    atomic_write_text(md, md.read_text() + "\n" + cost_markdown(table))
    plot_base_models(table, p.run_dir / "figures" / "base_models")
    return table


def cost_markdown(table: pd.DataFrame) -> str:
    """Per model and evaluation set: the paired gain (fine-tuned minus few-shot EM, points, 95% CI;
    by question type), the chosen recipe, the fine-tune's cost, and each agent's cost per episode."""
    from .evaluate import fmt_ci

    def ci(r, c: str) -> str:
        return "" if c not in r or r[c] != r[c] else fmt_ci(r[c], r[f"{c}_lo"], r[f"{c}_hi"])

    def num(x, fmt: str) -> str:
        return "" if x is None or x != x else format(x, fmt)

    lines = ["| model | evaluation set | recipe | gain, EM points [95% CI] | two-option gain | open gain | "
             "train tokens/s | train peak GB | s/episode few-shot, fine-tuned | tokens/episode few-shot, fine-tuned |",
             "|" + "---|" * 10]
    for (model, where), d in table.groupby(["model", "task"], sort=False):
        fs, ft = (d[d["agent"] == a].iloc[0] for a in ("fewshot", "finetuned"))
        lines.append(f"| {model_slug(model)} | {where} | {ft['recipe']} | {ci(ft, 'gain')} | {ci(ft, 'gain_two_option')} | "
                     f"{ci(ft, 'gain_open')} | {num(ft['train_tokens_per_s'], '.0f')} | "
                     f"{num(ft['train_peak_memory_gb'], '.1f')} | {num(fs.get('seconds_per_episode'), '.1f')}, "
                     f"{num(ft.get('seconds_per_episode'), '.1f')} | {fs['tokens_per_episode']:.0f}, "
                     f"{ft['tokens_per_episode']:.0f} |")
    return "\n".join(lines) + "\n"
