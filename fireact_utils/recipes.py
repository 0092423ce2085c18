"""Choosing on validation: fine-tuning recipes and few-shot prompts, then the chosen recipe over seeds.

Every choice is made on `study.select_task` / `study.select_split` (default HotpotQA-wiki `val`:
200 HotpotQA dev questions searched in their own Wikipedia paragraphs, none of them in FireAct's
dev-500), never on the questions a result is reported on. A recipe is a set of `train.*` /
`dataset.*` overrides of the run's params; a few-shot variant a set of `agent.*` overrides.

    conds = recipes.recipe_search(p)               # fine-tune + evaluate each of study.recipes
    table = recipes.selection_table(p, conds, p.study.recipes)   # EM with CIs; the chosen row marked
    runs = recipes.seed_runs(p, "outputs/runs/cpu/finetune/final")  # the main recipe over study.seeds
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import keys
from .config import Params, override
from .evaluate import bootstrap_ci, episode_values, paired_bootstrap_diff, results_table, write_table
from .holdout import check_choice, selecting
from .io import atomic_write_json
from .pipeline import (
    agent_model,
    dataset_pool,
    finetune,
    finetuned_agent,
    local_llm,
    run_condition,
    run_task,
    saved_condition,
)
from .tables import condition_label, table_extras

if TYPE_CHECKING:
    import pandas as pd


def variants(p: Params, which: str) -> dict[str, Params]:
    """The run's params with each entry of study.<which> (recipes | fewshot_variants) applied."""
    return {label: override(p, ov, f"study.{which}.{label}") for label, ov in getattr(p.study, which).items()}


def _select_n(p: Params) -> int:
    return p.study.select_n or len(run_task(p, p.study.select_task, p.study.select_split))


def select_condition(p: Params, name: str, llm, agent, progress: bool = True) -> list[dict]:
    """`run_condition` on the selection split (all of it unless study.select_n): a choice's data, so
    it is checked and recorded (`check_choice`) and is the one evaluation allowed on a split chosen
    on (`holdout.selecting`); every other evaluation of that split is refused from then on."""
    check_choice(p)
    with selecting():
        return run_condition(p, name, llm, agent, task=p.study.select_task, split=p.study.select_split,
                             n=_select_n(p), progress=progress)


def saved_selection(p: Params, name: str, agent) -> list[dict] | None:
    """A selection condition already complete on disk under `agent`'s settings (its model need not
    be loaded or trained); one saved under other settings is refused (`keys`)."""
    return saved_condition(p, name, p.study.select_task, p.study.select_split, _select_n(p), agent=agent)


def recipe_search(p: Params, progress: bool = True, only: list[str] | None = None) -> dict[str, list[dict]]:
    """Fine-tune each recipe of study.recipes (or those labelled `only`) into recipes/<label>/ and
    evaluate it on the selection split (condition recipe_<label>); both resume. Refused on a test
    split (`holdout`)."""
    check_choice(p)
    out = {}
    for label, q in variants(p, "recipes").items():
        if only is not None and label not in only:
            continue
        if (recs := saved_selection(p, f"recipe_{label}", finetuned_agent(q))) is not None:
            out[label] = recs
            continue
        trained = finetune(q, recipe_records(q), p.run_dir / "recipes" / label)
        out[label] = select_condition(p, f"recipe_{label}", local_llm(q, trained), finetuned_agent(q), progress)
    return out


def recipe_records(q: Params) -> list[dict] | None:
    """The training records of a recipe's params `q`: its dataset pool, mixed as `q.dataset` says;
    None under `keys.saved_only`, where `finetune` finds the bundle's and the data may be nowhere."""
    from .data import mix

    if keys.is_saved_only():
        return None
    pool, _ = dataset_pool(q)
    return mix(pool, q.dataset.mixture or None, q.dataset.n_trajectories, q.dataset.seed, q.dataset.tasks)


def fewshot_search(p: Params, progress: bool = True) -> dict[str, list[dict]]:
    """Each few-shot prompt of study.fewshot_variants (e.g. exemplars, their number, the chat
    template) with the base model on the selection split (condition fewshot_<label>)."""
    check_choice(p)
    out, llm = {}, None
    for label, q in variants(p, "fewshot_variants").items():
        agent = q.agent.model_copy(update={"mode": "fewshot"})
        if (recs := saved_selection(p, f"fewshot_{label}", agent)) is None:
            llm = llm or local_llm(p)
            recs = select_condition(p, f"fewshot_{label}", llm, agent, progress)
        out[label] = recs
    return out


SEARCHES = {"fewshot_variants": fewshot_search, "recipes": recipe_search}  # prompts first, then recipes


def selections(p: Params, progress: bool = True) -> dict[str, pd.DataFrame]:
    """`report_selection` of each choice the params list (study.fewshot_variants, study.recipes),
    scored on the selection split and written with its figure; notebook 02 and `select` both run
    them here. A choice with nothing listed is left out."""
    return {which: report_selection(p, search(p, progress), which) for which, search in SEARCHES.items()
            if getattr(p.study, which)}


def selection_markdown(selection: dict[str, pd.DataFrame]) -> str:
    """Each choice of `selections` as Markdown: its title, the chosen label, its table and each
    variant's settings; a choice the params leave out, the line naming the params file that runs it."""
    from .evaluate import markdown_table
    from .summaries import skipped_line

    parts = []
    for which in SEARCHES:
        if (t := selection.get(which)) is None:
            parts.append(skipped_line(f"study.{which}"))
            continue
        settings = "\n".join(f"- `{r.condition}`: {r.settings}" for r in t.itertuples())
        parts.append(f"**{TITLES[which]}**, chosen: `{chosen_label(t)}`\n\n{markdown_table(t)}\n{settings}")
    return "\n\n".join(parts)


def chosen(conds: dict[str, list[dict]], metric: str = "em") -> str:
    """The label with the highest mean `metric` (em, or grounded_em: right after searching at
    least once); a tie goes to the one listed first."""
    ems = {label: float(np.mean(episode_values(recs, metric))) for label, recs in conds.items()}
    return max(ems, key=lambda k: (ems[k], -list(ems).index(k)))


def chosen_label(table: pd.DataFrame) -> str:
    return str(table.loc[table["chosen"], "condition"].iloc[0])


def selection_table(p: Params, conds: dict[str, list[dict]], settings: dict[str, dict[str, Any]],
                    prefix: str = "recipe_") -> pd.DataFrame:
    """One row per variant: EM etc. with CIs on the selection split, its settings, the
    `tables.table_extras` columns (seconds per episode, search fidelity, environment), `chosen`
    on the best row, and `vs_chosen` (+_lo/_hi): each row's paired EM gain over the chosen one,
    so a reader sees how clearly the choice won. Few-shot prompts are chosen by study.fewshot_rule
    (`grounded_em` by default: a prompt that answers without searching wins nothing by it)."""
    rule = rule_of(p, prefix)
    best = chosen(conds, rule) if conds else None
    ref = {r["id"]: float(r["em"]) for r in conds[best]} if conds else {}  # paired by episode id, whatever the file order
    extra = {}
    for label in conds:
        name = prefix + label
        extra[label] = {**table_extras(p, [name])[condition_label(name)],
                        "settings": ", ".join(f"{k}={v}" for k, v in settings[label].items()) or "(run's params)",
                        "chosen": label == best, "split": f"{p.study.select_task} {p.study.select_split}",
                        "rule": rule, **dict(zip(("grounded_em", "grounded_em_lo", "grounded_em_hi"), bootstrap_ci(
                            episode_values(conds[label], "grounded_em"), p.evaluate.bootstrap), strict=True))}
        if label != best:
            pairs = [(ref[r["id"]], float(r["em"])) for r in conds[label]]
            gain = paired_bootstrap_diff(*zip(*pairs, strict=True), p.evaluate.bootstrap)
            extra[label].update(zip(("vs_chosen", "vs_chosen_lo", "vs_chosen_hi"), gain, strict=True))
    return results_table(conds, p.evaluate.bootstrap, extra=extra)


PREFIX = {"recipes": "recipe_", "fewshot_variants": "fewshot_"}
TITLES = {"recipes": "Fine-tuning recipes", "fewshot_variants": "Few-shot prompts of the base model"}


def rule_of(p: Params, prefix: str) -> str:
    """The metric a selection maximizes: study.fewshot_rule for prompts, EM for recipes."""
    return p.study.fewshot_rule if prefix == PREFIX["fewshot_variants"] else "em"


def report_selection(p: Params, conds: dict[str, list[dict]], which: str) -> pd.DataFrame:
    """`selection_table` of study.<which>, written to tables/<which>_selection.{csv,md} with its
    figure, and the chosen variant to tables/<which>_chosen.json."""
    from .plots import plot_selection

    check_choice(p)  # a choice written from saved conditions is a choice too
    settings = getattr(p.study, which)
    table = selection_table(p, conds, settings, PREFIX[which])
    if conds:
        best = chosen_label(table)
        write_table(table, p.run_dir / "tables" / f"{which}_selection")
        plot_selection(table, TITLES[which], p.run_dir / "figures" / f"{which}_selection")
        row = table[table["condition"] == best].iloc[0]
        atomic_write_json(p.run_dir / "tables" / f"{which}_chosen.json",
                          {"label": best, "overrides": settings[best], "em": row["em"], "em_lo": row["em_lo"],
                           "em_hi": row["em_hi"], "n": int(row["n"]), "rule": row["rule"], "task": p.study.select_task,
                           "split": p.study.select_split})
    return table


def seed_runs(p: Params, trained: str | Path, progress: bool = True) -> dict[int, list[dict]]:
    """The main recipe fine-tuned with each of study.seeds (seeds/s<seed>/; train.seed is the
    main fine-tune `trained` itself), each evaluated like finetuned_react on evaluate.task."""
    out = {}
    for seed in p.study.seeds:
        name = "finetuned_react" if seed == p.train.seed else f"finetuned_react_seed{seed}"
        out[seed] = run_condition(p, name, local_llm(p, seed_model(p, seed, trained)), finetuned_agent(p),
                                  progress=progress)
    return out


def seed_model(p: Params, seed: int, trained: str | Path) -> Path:
    """The main recipe trained with `seed`: `trained` itself for train.seed, else seeds/s<seed>/final
    (fine-tuned now if it is not there yet)."""
    if seed == p.train.seed:
        return Path(trained)
    q = p.model_copy(update={"train": p.train.model_copy(update={"seed": seed})})
    return finetune(q, None, p.run_dir / "seeds" / f"s{seed}")


SEED_COLUMNS = ("condition", "n", "em", "em_lo", "em_hi", "em_seed_sd", "gain", "gain_lo", "gain_hi")  # shown of seed_table


def report_seeds(p: Params, trained: str | Path, baseline: list[dict] | None = None,
                 progress: bool = True) -> pd.DataFrame:
    """`seed_table` of `seed_runs` (with the mean's paired gain over `baseline`'s episodes, e.g.
    few-shot ReAct's), written to tables/headline_seeds.csv."""
    from .io import atomic_write_text

    table = seed_table(p, seed_runs(p, trained, progress), baseline)
    atomic_write_text(p.run_dir / "tables" / "headline_seeds.csv", table.to_csv(index=False))
    return table


def seed_table(p: Params, runs: dict[int, list[dict]], baseline: list[dict] | None = None) -> pd.DataFrame:
    """A row per training seed, then `mean over seeds`: EM mean and standard deviation over the
    seeds (`em_seed_sd`) beside a bootstrap CI over questions of the per-question mean. With
    `baseline` (episodes of the same questions), the mean row also gets `gain`/`gain_lo`/`gain_hi`:
    the per-question seed mean minus the baseline, paired by episode id."""
    table = results_table({f"seed {s}": recs for s, recs in runs.items()}, p.evaluate.bootstrap)
    if len(runs) < 2:
        return table
    per_seed = np.array([episode_values(recs, "em") for recs in runs.values()])
    ids = [[r["id"] for r in recs] for recs in runs.values()]
    if any(i != ids[0] for i in ids):
        raise ValueError("seed runs must cover the same questions in the same order")
    mean, lo, hi = bootstrap_ci(per_seed.mean(axis=0), p.evaluate.bootstrap)
    ems = per_seed.mean(axis=1)
    summary = {"condition": f"mean over {len(runs)} seeds", "n": per_seed.shape[1], "em": mean, "em_lo": lo,
               "em_hi": hi, "em_seed_sd": float(ems.std(ddof=1)), "em_seed_min": float(ems.min()),
               "em_seed_max": float(ems.max())}
    if baseline is not None:
        by_id = {r["id"]: float(r["em"]) for r in baseline}
        if set(by_id) != set(ids[0]):
            raise ValueError("the baseline must cover the seed runs' questions")
        base = [by_id[i] for i in ids[0]]
        summary["gain"], summary["gain_lo"], summary["gain_hi"] = paired_bootstrap_diff(
            base, per_seed.mean(axis=0), p.evaluate.bootstrap)
    import pandas as pd

    return pd.concat([table, pd.DataFrame([summary])], ignore_index=True)


# ---------------------------------------------------------------- the pre-registered headline

# Its registration, checked at every evaluation from any entry point: `holdout.preregister`.


def transfer_sets(p: Params) -> dict[str, tuple[str, int]]:
    """task -> (slug, questions) of study.transfer_tasks (whole default splits unless study.generalization_n)."""
    from .studies import transfer_n
    from .tables import task_slug

    return {t: (task_slug(t), transfer_n(p, t)) for t in p.study.transfer_tasks}


def transfer_base(p: Params, progress: bool = True) -> dict[str, list[dict]]:
    """task -> few-shot ReAct's episodes on each transfer task (gen_<task>_base); the model is loaded
    only if one is not saved."""
    from .pipeline import fewshot_react

    tasks = transfer_sets(p)
    base = {t: saved_condition(p, f"gen_{slug}_base", t, None, n, model=p.model, agent=fewshot_react(p))
            for t, (slug, n) in tasks.items()}
    if any(v is None for v in base.values()):
        llm = local_llm(p)
        base = {t: run_condition(p, f"gen_{slug}_base", llm, fewshot_react(p), task=t, n=n, progress=progress)
                for t, (slug, n) in tasks.items()}
    return base


def transfer_seed(p: Params, seed: int, trained: str | Path | None, progress: bool = True) -> dict[str, list[dict]]:
    """task -> the fine-tuned agent of training `seed` on each transfer task (gen_<task>_ft[_seed<s>]);
    `trained` is the main fine-tune (needed for train.seed only); a model is loaded (or trained)
    only if a condition is missing."""
    tasks = transfer_sets(p)
    names = {t: f"gen_{slug}_ft" + ("" if seed == p.train.seed else f"_seed{seed}") for t, (slug, _) in tasks.items()}
    known = agent_model(p, trained) if seed == p.train.seed and trained else None  # another seed's: checked on resume
    saved = {t: saved_condition(p, names[t], t, None, tasks[t][1], model=known, agent=finetuned_agent(p))
             for t in tasks}
    llm = None if all(v is not None for v in saved.values()) else local_llm(p, seed_model(p, seed, trained))
    return {t: saved[t] if saved[t] is not None else run_condition(p, names[t], llm, finetuned_agent(p), task=t,
                                                                    n=n, progress=progress)
            for t, (_, n) in tasks.items()}


def transfer_runs(p: Params, trained: str | Path, progress: bool = True) -> dict[str, tuple[dict[int, list[dict]], list[dict]]]:
    """task -> (training seed -> the fine-tuned agent's episodes, few-shot ReAct's episodes) on each
    of study.transfer_tasks (whole default split, its own Wikipedia environment); every seed of
    study.seeds (or train.seed alone) is loaded once for all tasks."""
    base = transfer_base(p, progress)
    by_seed = {seed: transfer_seed(p, seed, trained, progress) for seed in p.study.seeds or [p.train.seed]}
    return {t: ({s: runs[t] for s, runs in by_seed.items()}, base[t]) for t in base}


def report_transfer(p: Params, trained: str | Path, progress: bool = True) -> pd.DataFrame:
    """`seed_table` per transfer task (a row per seed, their mean with its paired gain over few-shot
    ReAct on the same questions), written to tables/headline_transfer.{csv,md}."""
    import pandas as pd

    parts = [seed_table(p, runs, base).assign(task=t) for t, (runs, base) in transfer_runs(p, trained, progress).items()]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if len(table):
        table = table[["task", *[c for c in table.columns if c != "task"]]]
        write_table(table, p.run_dir / "tables" / "headline_transfer")
    return table
