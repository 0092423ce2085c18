"""The run's tables from its saved conditions: readable condition labels, the columns beside each
(seconds per episode, search fidelity, environment, edits by hand), the paired gain of fine-tuning,
and the robustness and generalization tables of notebook 04.

Metrics on records (EM, bootstrap CIs, `results_table`) live in `evaluate`; this module names the
kit's conditions and reads their metas.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .io import atomic_write_json, read_json
from .pipeline import SEARCHING, condition_questions
from .provenance import condition_meta, hand_edit

if TYPE_CHECKING:
    import pandas as pd

    from .config import Params


def condition_table(p: Params, conds: dict[str, list[dict]]):
    """`evaluate.results_table` of conditions keyed by run name: labelled rows, CIs with
    `evaluate.bootstrap` resamples, the `table_extras` columns, and `questions` (`planned_questions`):
    a condition with fewer episodes, or with api_error ones, is flagged not final."""
    from .evaluate import results_table

    labelled = {condition_label(k): v for k, v in conds.items()}
    extra = table_extras(p, conds)
    for name, planned in planned_questions(p, conds).items():
        extra[condition_label(name)]["questions"] = planned
    return results_table(labelled, p.evaluate.bootstrap, extra=extra)


def main_table(p: Params, conds: dict[str, list[dict]]) -> pd.DataFrame:
    """`condition_table` of notebook 03's conditions, written to tables/main.{csv,md}; notebook 03
    and `headline` both write it here."""
    from .evaluate import write_table

    table = condition_table(p, conds)
    write_table(table, p.run_dir / "tables" / "main")
    return table


def paper_table(p: Params, table: pd.DataFrame) -> pd.DataFrame:
    """`evaluate.paper_summary` of the main table (this run, FireAct's released runs rescored, the
    paper's EM), written to tables/summary_vs_paper.csv."""
    from .evaluate import paper_summary
    from .io import atomic_write_text

    summary = paper_summary(table, p.data_dir)
    atomic_write_text(p.run_dir / "tables" / "summary_vs_paper.csv", summary.to_csv(index=False))
    return summary


def planned_questions(p: Params, conds: dict[str, list[dict]]) -> dict[str, int]:
    """How many questions each condition with a meta is to run: on evaluate.task and split, the
    first evaluate.n_questions; on any task, at least as many as the table's other condition on the
    same questions with the most episodes. A run that stopped early then shows as not final."""
    where = {n: (m["task"], m["split"]) for n in conds if "task" in (m := condition_meta(p, n))}
    most: dict[tuple, int] = {}
    for name, key in where.items():
        most[key] = max(most.get(key, 0), len(conds[name]))
    if where:
        task, idx = condition_questions(p)
        most[(task.name, task.split)] = max(most.get((task.name, task.split), 0), len(idx))
    return {name: most[key] for name, key in where.items()}


def table_extras(p: Params, names) -> dict[str, dict]:
    """Columns beside each condition: seconds/episode and the replayed-search hit rates."""
    out = {}
    for n in names:
        m = condition_meta(p, n)
        row = {}
        if m.get("episodes_run"):
            row["seconds_per_episode"] = m["wall_s"] / m["episodes_run"]
        if m.get("machines"):
            row["machine"] = " + ".join(m["machines"])  # seconds compare only within one machine
        if note := hand_edit(m):
            row["edited_by_hand"] = note
        tool = m.get("tool") or {}
        if "hit_rate" in tool:
            row["search_exact_hit_rate"] = tool["hit_rate"]
            row["search_bm25_rate"] = tool.get("bm25_rate")
        if "noise_rate" in tool:
            row["noise_rate"] = tool["noise_rate"]
            row["noise_kind"] = tool.get("noise_kind")
            row["noise_corrupted"] = tool.get("noise_corrupted")  # observations actually corrupted
        fid = m.get("fidelity") or {}
        if fid:
            row["gold_top_rate"] = fid["gold_top_rate"]
            row["saw_all_gold_rate"] = fid["saw_all_gold_rate"]
        if m.get("environment"):
            row["environment"] = environment_label(m["environment"])
        agent = m.get("agent") or {}
        if agent:  # lets plots tell prompted from fine-tuned agents without parsing names
            row["mode"], row["method"] = agent.get("mode"), agent.get("method")
        out[condition_label(n)] = row
    return out


def environment_label(card: dict) -> str:
    """One line of an environment card, for table columns: 'wiki hotpotqa (10,708 paragraphs), BM25 ...'."""
    if card.get("search") in (None, "none"):
        return "no search"
    return (f"{card['search']}: {card['corpus']}; {card['retriever']}; k={card['k']}; "
            f"{card['max_obs_chars']} chars; noise {card['noise']}")


NOISE_SAYS = {"none": '"None"', "random": "random other obs"}  # what a corrupted observation becomes


def condition_label(name: str) -> str:
    """'gen_hotpotqa-wiki_ft' -> 'hotpotqa-wiki: FireAct fine-tuned ReAct'; a noisy condition says what
    happened to the observations ('finetuned_react_noise_none_0.5' -> 'FireAct fine-tuned ReAct, 50% of
    obs -> "None"'), since 'noise none 0.5' read as no noise; other names spelled out."""
    labels = {"base_fewshot_io": "base few-shot IO", "base_fewshot_cot": "base few-shot CoT",
              "base_fewshot_react": "base few-shot ReAct", SEARCHING: "base few-shot ReAct, must search",
              "finetuned_react": "FireAct fine-tuned ReAct"}
    if m := re.fullmatch(r"(base_fewshot_searching|base_fewshot|finetuned)_react(?:_(.+))?_noise_(none|random)_([0-9.e-]+)", name):
        who, task, kind, rate = m.groups()
        agent = f"{labels[who + '_react']}, {float(rate) * 100:g}% of obs -> {NOISE_SAYS[kind]}"
        return f"{task}: {agent}" if task else agent
    if name.startswith("gen_") and name.endswith(("_base", "_ft")):
        task, _, who = name[4:].rpartition("_")
        return f"{task}: " + labels["base_fewshot_react" if who == "base" else "finetuned_react"]
    return labels.get(name, name.replace("_", " "))


def task_slug(task: str) -> str:
    """A task name or question file as it appears in condition names ('data/q.jsonl' -> 'data_q.jsonl')."""
    return task.replace(":", "_").replace("/", "_")


def paired_gain(p: Params, conds: dict[str, list[dict]], base: str = "base_fewshot_react",
                ft: str = "finetuned_react", save: bool = True) -> dict:
    """EM of `ft` minus `base` on the same questions with a paired bootstrap 95% CI, overall and
    per question type (`by_type`: two-option questions are half won by a coin), saved to
    tables/paired_gain.json when `save`. Episodes pair by id, in `base`'s order, so records read in
    the order they finished pair as well as those in question order."""
    from .evaluate import episode_values, paired_bootstrap_diff, question_type

    by_id = {r["id"]: r for r in conds[ft]}
    if len(by_id) != len(conds[ft]) or sorted(by_id) != sorted(r["id"] for r in conds[base]):
        raise ValueError(f"{base} and {ft} must cover the same questions, once each ({len(conds[base])} and "
                         f"{len(conds[ft])} episodes): episodes pair by id")
    both = [(a, by_id[a["id"]]) for a in conds[base]]

    def gain(keep) -> dict:
        pairs = [(a, b) for a, b in both if keep(b)]
        mean, lo, hi = paired_bootstrap_diff(*(episode_values(list(x), "em") for x in zip(*pairs, strict=True)),
                                             p.evaluate.bootstrap)
        return {"n": len(pairs), "gain": mean, "lo": lo, "hi": hi}

    types = sorted({question_type(r) for r in conds[ft]})
    out = {"metric": "em", "baseline": base, "treatment": ft, **gain(lambda r: True), "bootstrap": p.evaluate.bootstrap,
           "by_type": {t: gain(lambda r, t=t: question_type(r) == t) for t in types}}
    if save:
        atomic_write_json(p.run_dir / "tables" / "paired_gain.json", out)
    return out


def gain_summary(gain: dict) -> str:
    """`paired_gain`'s result as Markdown: the gain with its CI, then per question type."""
    from .evaluate import TYPE_HEADERS, fmt_gain

    head = (f"**{condition_label(gain['treatment'])} minus {condition_label(gain['baseline'])}**: "
            f"{fmt_gain(gain['gain'], gain['lo'], gain['hi'])} EM points (95% CI, {gain['n']} questions)")
    return head + "".join(f"\n- {TYPE_HEADERS[t].split(' EM')[0]} questions ({g['n']}): "
                          f"{fmt_gain(g['gain'], g['lo'], g['hi'])}" for t, g in gain.get("by_type", {}).items())


MIN_CORRUPTED = 20  # a noisy run with fewer corrupted observations measures searching, not robustness


def noise_effects(table: pd.DataFrame, noisy: dict[str, list[dict]], clean: dict[str, list[dict]],
                  n_boot: int) -> pd.DataFrame:
    """`table` (`condition_table` of clean and noisy runs) plus, beside each run of `noisy` (name ->
    records): `vs_clean` [`_lo`, `_hi`], its EM minus the clean EM of the same agent (`clean` keyed
    'finetuned' / 'base_fewshot', the name's prefix), paired by record id with a 95% bootstrap CI;
    and `too_few_corrupted` with a `note`: under MIN_CORRUPTED corrupted observations, a flat EM
    says the agent barely searched, not that it is robust."""
    import pandas as pd

    from .evaluate import paired_bootstrap_diff

    corrupted = dict(zip(table["condition"], table.get("noise_corrupted", [None] * len(table)), strict=True))
    rows = {}
    for name, recs in noisy.items():
        ref = {r["id"]: r["em"] for r in clean.get(name.split("_react")[0], [])}
        pairs = [(ref[r["id"]], r["em"]) for r in recs if r["id"] in ref]
        diff = paired_bootstrap_diff([a for a, _ in pairs], [b for _, b in pairs], n_boot)  # noisy - clean
        k = corrupted.get(condition_label(name))
        note = ("corrupted observations not recorded" if pd.isna(k) else
                (f"only {k:.0f} corrupted observation{'' if k == 1 else 's'} (< {MIN_CORRUPTED}) in {len(recs)} "
                 "episodes: the agent barely searched") if k < MIN_CORRUPTED else None)
        rows[condition_label(name)] = {"vs_clean": diff[0], "vs_clean_lo": diff[1], "vs_clean_hi": diff[2],
                                       "too_few_corrupted": note is not None, "note": note}
    cols = pd.DataFrame.from_dict(rows, orient="index",
                                  columns=["vs_clean", "vs_clean_lo", "vs_clean_hi", "too_few_corrupted", "note"])
    out = table.merge(cols, left_on="condition", right_index=True, how="left")
    return out.assign(too_few_corrupted=out["too_few_corrupted"].eq(True))  # clean rows: False


def robustness_markdown(table: pd.DataFrame) -> str:
    """A `robustness` table in Markdown: EM and the paired difference vs the clean agent (points,
    95% CIs) beside the corrupted-observation count; rows with too few corrupted observations are
    greyed with their reason, so no one reads them as robustness, and rows not final say why."""
    import pandas as pd

    from .evaluate import fmt_ci

    lines = ["| condition | n | EM % [95% CI] | corrupted obs | EM vs clean, points [95% CI] |", "|---|---|---|---|---|"]
    for _, r in table.iterrows():
        k, d = r.get("noise_corrupted"), r.get("vs_clean")
        cells = [str(r["condition"]), str(r["n"]), fmt_ci(r["em"], r["em_lo"], r["em_hi"]),
                 "clean tool" if pd.isna(k) else f"{k:.0f}",
                 "" if pd.isna(d) else fmt_ci(d, r["vs_clean_lo"], r["vs_clean_hi"])]
        if isinstance(r.get("not_final"), str):  # `evaluate.not_final`
            cells[0] += f" (not final: {r['not_final']})"
        if bool(r.get("too_few_corrupted", False)):  # a bool column (`noise_effects`)
            cells[0] += f" (greyed: {r['note']})"
            cells = [f'<span style="color:grey">{c}</span>' for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\nGrey: fewer than {MIN_CORRUPTED} corrupted observations, too few to measure "
                               "robustness; left out of the figure.\n")


def outcome_table(p: Params) -> pd.DataFrame:
    """Every wiki condition of the run (those with fidelity in their meta): the environment's
    fidelity (gold-top rate of searches, episodes that saw any / every gold paragraph) and the
    episodes by outcome (correct / saw evidence, wrong answer / missed evidence / never finished)."""
    import pandas as pd

    rows = []
    for f in sorted((p.run_dir / "eval").glob("*.meta.json")):
        m = read_json(f)
        if fid := m.get("fidelity"):
            rows.append({"condition": condition_label(m["condition"]), "task": m["task"], "split": m["split"],
                         "noise": (m.get("environment") or {}).get("noise"),
                         **{k: fid[k] for k in ("gold_top_rate", "saw_any_gold_rate", "saw_all_gold_rate")},
                         **fid["outcomes"]})
    return pd.DataFrame(rows)


GENERALIZATION_LABELS = {"base": "base few-shot ReAct", "ft": "FireAct fine-tuned"}


def generalization_table(p: Params, gen: dict[str, dict[str, list[dict]]]) -> pd.DataFrame:
    """`generalization`'s results per task, with each condition's environment and fidelity columns."""
    from .evaluate import grouped_results_table

    extra = {}
    for task in gen:
        names = {label: f"gen_{task_slug(task)}_{who}" for who, label in GENERALIZATION_LABELS.items()}
        cols = table_extras(p, names.values())
        extra[task] = {label: cols[condition_label(n)] for label, n in names.items()}
    return grouped_results_table(gen, p.evaluate.bootstrap, "task", extra)
