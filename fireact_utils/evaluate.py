"""Scores over episodes: means with bootstrap confidence intervals, and results tables.

A "condition" is one set of episode records (e.g. few-shot ReAct, fine-tuned, fine-tuned +
noisy tool). Tables put conditions side by side on the same questions, with 95% CIs obtained
by resampling questions (percentile bootstrap, seeded).

    table = results_table({"ReAct few-shot": recs_a, "FireAct (ours)": recs_b})
    write_table(table, run_dir / "metrics")      # metrics.csv + metrics.md
"""

from __future__ import annotations

from itertools import zip_longest
from pathlib import Path

import numpy as np
import pandas as pd

from .config import EvalParams, default
from .io import atomic_write_text
from .tasks import normalize_answer
from .trajectories import react_text

N_BOOT = default(EvalParams, "bootstrap")
METRICS = ("em", "f1", "turns", "finish", "prompt_tokens", "completion_tokens")
# What a blind guess scores per question type: two-option questions ("A or B?", yes/no) are half
# won by a coin; multiple choice a quarter; open questions have no chance rate.
CHANCE = {"two_option": 0.5, "four_option": 0.25, "open": None}


def bootstrap_ci(values, n_boot: int = N_BOOT, seed: int = 0, alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap over the items of `values`."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(x.mean()), float(lo), float(hi)


def paired_bootstrap_diff(a, b, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float, float]:
    """Mean of b - a over the same questions, with a 95% CI (resampling question pairs)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError("paired bootstrap needs the same questions in both conditions")
    return bootstrap_ci(b - a, n_boot, seed)


def question_type(rec: dict) -> str:
    """'two_option' (gold yes/no, or an "A or B?" question whose gold is one of the two),
    'four_option' (a lettered multiple-choice question) or 'open', read off the record alone."""
    gold, question = normalize_answer(rec["gold"]), rec["question"]
    if gold in ("yes", "no"):
        return "two_option"
    if rec["gold"] in tuple("ABCD") and "\nA. " in question:
        return "four_option"
    words, asked = gold.split(), set(normalize_answer(question).split())
    if " or " in question and words and sum(w in asked for w in words) >= len(words) / 2:
        return "two_option"
    return "open"


def searches(rec: dict) -> int:
    return sum(s.get("action") == "search" for s in rec.get("steps") or [])


def episode_values(records: list[dict], metric: str) -> list[float]:
    """Per-episode values of `metric`: a record field, `finish` (finished at all) or `grounded_em`
    (right and searched at least once: an answer from the prompt alone does not count)."""
    if metric == "finish":
        return [float(r["status"] == "finished") for r in records]
    if metric == "grounded_em":
        return [float(bool(r["em"]) and searches(r) > 0) for r in records]
    return [float(r[metric]) for r in records]


def behaviour(records: list[dict], n_boot: int = N_BOOT) -> dict:
    """What a condition's EM is made of: EM per question type (with CI and count), the share of
    episodes that searched, searches per episode, and the most frequent answer with its count."""
    out: dict = {}
    for qtype in CHANCE:
        recs = [r for r in records if question_type(r) == qtype]
        if recs:
            out[f"n_{qtype}"] = len(recs)
            out[f"em_{qtype}"], out[f"em_{qtype}_lo"], out[f"em_{qtype}_hi"] = bootstrap_ci(
                episode_values(recs, "em"), n_boot)
    if per := [searches(r) for r in records]:
        out["searched"] = float(np.mean([k > 0 for k in per]))
        out["searches_per_episode"] = float(np.mean(per))
    answers = pd.Series([r["pred"] for r in records if r.get("answer") is not None], dtype=object)
    if len(answers):
        counts = answers.value_counts()
        out["top_answer"], out["top_answer_count"] = str(counts.index[0]), int(counts.iloc[0])
    return out


def condition_row(name: str, records: list[dict], n_boot: int = N_BOOT, wall_s: float | None = None) -> dict:
    row: dict = {"condition": name, "n": len(records)}
    for m in METRICS:
        mean, lo, hi = bootstrap_ci(episode_values(records, m), n_boot)
        row[m], row[f"{m}_lo"], row[f"{m}_hi"] = mean, lo, hi
    statuses = pd.Series([r["status"] for r in records]).value_counts().to_dict()
    row["statuses"] = ", ".join(f"{k}:{v}" for k, v in sorted(statuses.items()))
    row["api_errors"] = statuses.get("api_error", 0)  # counted wrong until a resume re-runs them (`not_final`)
    if records and "gold" in records[0]:  # episode records (not hand-built rows)
        row.update(behaviour(records, n_boot))
    if wall_s is not None and records:
        row["seconds_per_episode"] = wall_s / len(records)
    return row


def not_final(row: dict) -> str | None:
    """Why a condition's numbers are not final, or None: episodes that ended in api_error (an
    outage, scored wrong until the condition is resumed, which re-runs them) and, where `row` has
    `questions` (how many the condition is to run), the questions it has not run yet."""
    why = []
    if errors := row.get("api_errors") or 0:
        why.append(f"{errors:.0f} of {row['n']} episodes ended in api_error (scored wrong)")
    if not pd.isna(planned := row.get("questions")) and row["n"] < planned:
        why.append(f"{planned - row['n']:.0f} of {planned:.0f} questions not run")
    return "; ".join(why) or None


def results_table(conditions: dict[str, list[dict]], n_boot: int = N_BOOT, wall: dict[str, float] | None = None,
                  extra: dict[str, dict] | None = None) -> pd.DataFrame:
    """One row per condition; `extra[name]` adds columns (e.g. search hit rates, noise rate,
    `questions` planned); `not_final` says why a row may still change (`markdown_table` marks it ‡)."""
    rows = []
    for name, recs in conditions.items():
        row = condition_row(name, recs, n_boot, (wall or {}).get(name))
        row.update((extra or {}).get(name, {}))
        row["not_final"] = not_final(row)
        rows.append(row)
    return pd.DataFrame(rows)


def fmt_ci(mean: float, lo: float, hi: float, scale: float = 100.0, digits: int = 1) -> str:
    return f"{mean * scale:.{digits}f} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"


def fmt_pct_ci(mean: float, lo: float, hi: float) -> str:
    """A rate in running text: '15.0% [8.0, 23.0]'."""
    return fmt_ci(mean, lo, hi).replace(" [", "% [", 1)


def fmt_gain(mean: float, lo: float, hi: float) -> str:
    """A paired difference in signed points with its CI: '+9.0 [+1.0, +17.0]'."""
    return f"{mean * 100:+.1f} [{lo * 100:+.1f}, {hi * 100:+.1f}]"


TYPE_HEADERS = {"two_option": "two-option EM %", "four_option": "four-option EM %", "open": "open EM %"}


def _pct(x) -> str:
    return "" if pd.isna(x) else f"{x * 100:.0f}"


def shorten(text: str, width: int = 40) -> str:
    """`text` cut to `width` characters for a table cell (a degenerate answer can repeat a phrase
    for hundreds); the CSV keeps it whole."""
    return text if len(text) <= width else text[:width - 1].rstrip() + "…"


def markdown_table(df: pd.DataFrame) -> str:
    """Human table: EM/F1/finish in % with CIs, turns and tokens as means; the search fidelity
    columns where the table has them (replay: exact-hit %; wiki: gold-top % and saw-all-gold %),
    and the environment card of each condition as a numbered note below the table. A row that is
    not final (api_error episodes, questions not run: `not_final`) is marked ‡ with its reason
    below, and an `api errors` column appears: its EM counts those episodes wrong."""
    lead = [c for c in ("task",) if c in df]  # grouped tables (grouped_results_table) show their group first
    fid = [(c, h) for c, h in (("search_exact_hit_rate", "exact hit %"), ("gold_top_rate", "gold top %"),
                               ("saw_all_gold_rate", "saw all gold %")) if c in df]
    envs = list(dict.fromkeys(e for e in df.get("environment", pd.Series(dtype=str)).dropna()))
    types = [t for t in CHANCE if f"em_{t}" in df]  # EM by question type, with its count
    tool = [c for c in ("searched", "top_answer") if c in df]
    grounded = ["grounded EM % [95% CI]"] if "grounded_em" in df else []  # selection tables: right after a search
    unfinal = "not_final" in df and bool(df["not_final"].map(lambda x: isinstance(x, str)).any())
    cols = [*lead, "condition", "n", *(["api errors"] if unfinal else []), "EM % [95% CI]", *grounded, *(TYPE_HEADERS[t] for t in types), "F1 %", "finish %", "turns",
            "prompt tok", "completion tok", *(["searched %", "searches/ep"] if "searched" in tool else []),
            *(["top answer (count)"] if "top_answer" in tool else []), *(h for _, h in fid), *(["env"] if envs else [])]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        by_type = ["" if pd.isna(r[f"em_{t}"]) else f"{r[f'em_{t}'] * 100:.1f} ({r[f'n_{t}']:.0f})" for t in types]
        acts = [_pct(r["searched"]), f"{r['searches_per_episode']:.2f}"] if "searched" in tool else []
        if "top_answer" in tool:
            acts.append("" if pd.isna(r["top_answer"]) else f"{shorten(r['top_answer'])} ({r['top_answer_count']:.0f})")
        edited, why = isinstance(r.get("edited_by_hand"), str), r.get("not_final")
        mark = (" †" if edited else "") + (" ‡" if isinstance(why, str) else "")
        cells = [*(str(r[c]) for c in lead), str(r["condition"]) + mark, str(r["n"]),
                 *([f"{r.get('api_errors') or 0:.0f}"] if unfinal else []), fmt_ci(r["em"], r["em_lo"], r["em_hi"]),
                 *([fmt_ci(r["grounded_em"], r["grounded_em_lo"], r["grounded_em_hi"])] if grounded else []), *by_type, f"{r['f1'] * 100:.1f}", f"{r['finish'] * 100:.0f}", f"{r['turns']:.2f}",
                 f"{r['prompt_tokens']:.0f}", f"{r['completion_tokens']:.0f}", *acts, *(_pct(r[c]) for c, _ in fid)]
        if envs:
            env = r.get("environment")
            cells.append(f"[{envs.index(env) + 1}]" if isinstance(env, str) else "")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"\n[{i}] {e}" for i, e in enumerate(envs, 1)]
    notes += [f"\n† {r['condition']}: edited by hand ({r['edited_by_hand']})" for _, r in df.iterrows()
              if isinstance(r.get("edited_by_hand"), str)]
    notes += [f"\n‡ {r['condition']}: not final: {r['not_final']}; resume the condition to finish it"
              for _, r in df.iterrows() if isinstance(r.get("not_final"), str)]
    if types:
        notes.insert(0, "\nEM by question type: % (questions). " + "; ".join(
            f"{TYPE_HEADERS[t].split(' EM')[0]}: chance {CHANCE[t] * 100:.0f}%" for t in types if CHANCE[t]) + ".")
    return "\n".join(lines) + "\n" + "".join(notes) + ("\n" if notes else "")


def behaviour_summary(df: pd.DataFrame) -> str:
    """A Markdown line per condition saying what its EM is made of: how often it searched, its
    most frequent answer, and its EM on two-option questions against the coin's 50%."""
    lines = []
    for _, r in df.iterrows():
        parts = []
        if not pd.isna(r.get("searched")):
            parts.append(f"searched in {r['searched'] * 100:.0f}% of episodes ({r['searches_per_episode']:.2f} "
                         "searches per episode)")
        if isinstance(r.get("top_answer"), str):
            parts.append(f"most frequent answer {shorten(r['top_answer'])!r}, {r['top_answer_count']:.0f} of {r['n']:.0f}")
        if not pd.isna(r.get("em_two_option")):
            parts.append(f"EM {r['em_two_option'] * 100:.0f}% on the {r['n_two_option']:.0f} two-option questions "
                         f"(a coin: 50%) and {r.get('em_open', float('nan')) * 100:.0f}% on the {r.get('n_open', 0):.0f} open ones")
        lines.append(f"- **{r['condition']}**: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def write_table(df: pd.DataFrame, stem: str | Path) -> tuple[Path, Path]:
    stem = Path(stem)
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    atomic_write_text(csv_path, df.to_csv(index=False))
    atomic_write_text(md_path, markdown_table(df))
    return csv_path, md_path


# `fireact_reference`'s rows of the data's trajs/ (a test holds them equal): what a merge's summary
# shows, since it reads no data (`keys.saved_only`)
FIREACT_RELEASED = [
    {"condition": "FireAct GPT-3.5 FT (released run)", "n": 465, "em": 0.43010752688172044,
     "em_lo": 0.3849462365591398, "em_hi": 0.4774193548387097, "f1": 0.5829389319976812},
    {"condition": "FireAct Llama-2-13B LoRA (released run)", "n": 499, "em": 0.34468937875751504,
     "em_lo": 0.3046092184368738, "em_hi": 0.3847695390781563, "f1": 0.4800981472324158},
    {"condition": "FireAct Llama-2-7B LoRA (released run)", "n": 500, "em": 0.262, "em_lo": 0.224, "em_hi": 0.302,
     "f1": 0.38006390716800137},
]


def fireact_reference(data_dir=None) -> pd.DataFrame:
    """FireAct's released evaluation runs (HotpotQA dev-500) as table rows, for the summary."""
    from . import keys
    from .config import data_dir as resolve
    from .config import data_file
    from .io import read_json

    if keys.is_saved_only():
        return pd.DataFrame(FIREACT_RELEASED)
    rows = []
    for f in sorted(data_file(resolve(data_dir), "trajs").glob("*.json")):
        d = read_json(f)
        em = [float(v["em"] in (True, "True")) for v in d.values()]
        f1 = [float(v["f1"]) for v in d.values()]
        name = "FireAct " + ("GPT-3.5 FT" if "gpt-3.5" in f.name else "Llama-2-13B LoRA" if "13b" in f.name
                             else "Llama-2-7B LoRA")
        mean, lo, hi = bootstrap_ci(em)
        rows.append({"condition": f"{name} (released run)", "n": len(em), "em": mean, "em_lo": lo, "em_hi": hi,
                     "f1": float(np.mean(f1))})
    return pd.DataFrame(rows)


PAPER_HOTPOTQA_EM = {  # FireAct paper, HotpotQA EM (%), Llama-2-7B, ReAct
    "Llama-2-7B few-shot ReAct": 14.8,
    "Llama-2-7B FireAct (500 GPT-4 trajectories)": 26.2,
}
PAPER_MODEL = "Llama-2-7B"
SEARCH_NAMES = {"recorded": "the recorded-Google replay", "wiki": "Wikipedia paragraphs (BM25)",
                "serpapi": "live Google through SerpAPI"}  # search.kind, as paper_comparison names it


def paper_comparison(table: pd.DataFrame, gain: dict, base: str, ft: str, student: str,
                     search: str = "recorded") -> str:
    """Our fine-tuning gain beside the paper's, as Markdown: the two gains side by side with their
    CIs (the paper reports none), what differs between the two settings (model, questions, search,
    baseline), and a small table. It draws no inference from one gain to the other. `base`/`ft` are
    the table's condition labels of `gain`'s baseline and treatment; `student` names our model and
    `search` our `search.kind`."""
    rows = table.set_index("condition")
    search = SEARCH_NAMES.get(search, search)
    b, f = rows.loc[base], rows.loc[ft]
    paper_base, paper_ft = PAPER_HOTPOTQA_EM.values()  # few-shot, then fine-tuned
    paper_gain = paper_ft - paper_base
    ours = fmt_gain(gain["gain"], gain["lo"], gain["hi"])
    searched = b.get("searched")
    baseline = f"our `{base}`" + ("" if searched is None or pd.isna(searched)
                                  else f", which searched in {searched * 100:.0f}% of its episodes")
    text = (f"This run: fine-tuning took our {student} student from {fmt_pct_ci(b['em'], b['em_lo'], b['em_hi'])} "
            f"to {fmt_pct_ci(f['em'], f['em_lo'], f['em_hi'])} EM on {gain['n']} questions, a paired gain of {ours} "
            f"points (95% CI). The paper: {PAPER_MODEL} from {paper_base}% to {paper_ft}% on HotpotQA dev-500, a gain "
            f"of {paper_gain:+.1f} points, reported without a CI. The settings differ in the model ({student} against "
            f"{PAPER_MODEL}), the questions ({gain['n']} against the paper's 500), the search ({search} against live "
            f"Google) and the few-shot baseline ({baseline}; the paper's own prompt).")
    head = "| | few-shot ReAct EM % | fine-tuned EM % | gain (points) |\n|---|---|---|---|"
    ours_row = (f"| this run: {student}, {gain['n']} questions, {search} | {fmt_ci(b['em'], b['em_lo'], b['em_hi'])} | "
                f"{fmt_ci(f['em'], f['em_lo'], f['em_hi'])} | {ours} |")
    paper_row = (f"| FireAct paper: {PAPER_MODEL}, dev-500, live Google (`PAPER_HOTPOTQA_EM`) | {paper_base} | "
                 f"{paper_ft} | {paper_gain:+.1f} |")
    return "\n".join([text, "", head, ours_row, paper_row])


def grouped_results_table(groups: dict[str, dict[str, list[dict]]], n_boot: int = N_BOOT, group: str = "task",
                          extra: dict[str, dict[str, dict]] | None = None) -> pd.DataFrame:
    """`results_table` per group (e.g. task -> condition -> records), stacked with a `group` column;
    `extra[group][condition]` adds columns as in `results_table`."""
    parts = [results_table(conds, n_boot, extra=(extra or {}).get(g)).assign(**{group: g}) for g, conds in groups.items()]
    if not parts:
        return pd.DataFrame()
    df = pd.concat(parts, ignore_index=True)
    return df[[group, *[c for c in df.columns if c != group]]]


def paper_summary(table: pd.DataFrame, data_dir=None) -> pd.DataFrame:
    """Our conditions beside FireAct's released runs and the paper's HotpotQA EM (no CI there).

    Our rows and the released runs are on HotpotQA dev questions of the same seeded shuffle
    (ours: the first n; released: 500); the paper's numbers are quoted, with n unknown here.
    """
    cols = ["condition", "n", "em", "em_lo", "em_hi", "f1"]
    ours = table[[c for c in cols if c in table]].assign(source="this run")
    released = fireact_reference(data_dir).assign(source="FireAct released run")
    paper = pd.DataFrame({"condition": list(PAPER_HOTPOTQA_EM),
                          "em": [v / 100 for v in PAPER_HOTPOTQA_EM.values()]}).assign(source="FireAct paper")
    return pd.concat([ours, released, paper], ignore_index=True)[["source", *cols]]


# ---------------------------------------------------------------- two agents on one question


def differing_pair(base: list[dict], ft: list[dict]) -> tuple[dict, dict] | None:
    """(base record, fine-tuned record) of the first question, paired by question index, on which
    their EM differ: one the fine-tuned agent got right and the base wrong if any, else the
    reverse; None when every question is right for both or wrong for both."""
    by_idx = {r["idx"]: r for r in base}
    pairs = [(by_idx[r["idx"]], r) for r in ft if r["idx"] in by_idx]
    for ft_right in (True, False):
        for b, f in pairs:
            if bool(f["em"]) == ft_right and bool(b["em"]) != ft_right:
                return b, f
    return None


def _action(step: dict | None) -> str:
    if step is None:
        return "had already ended"
    return f"{step['action']}[{step.get('arg') or ''}]" if step.get("action") else "wrote no valid action"


def divergence(base: dict, ft: dict, base_label: str, ft_label: str) -> str:
    """Where two episodes of one question part: the first turn whose action (tool and argument) differs."""
    for turn, (a, b) in enumerate(zip_longest(base["steps"], ft["steps"]), 1):
        if a is None or b is None or (a.get("action"), a.get("arg")) != (b.get("action"), b.get("arg")):
            return f"**Where they diverged**: turn {turn}: {base_label} {_action(a)}; {ft_label} {_action(b)}."
    return "**Where they diverged**: nowhere in their actions; they differ only in their exit status."


def episode_markdown(rec: dict, label: str) -> str:
    """One saved episode, annotated: turns and exit status, what it searched, its answer against
    gold with EM, then the scratchpad as the agent wrote it and the tool answered."""
    queries = "; ".join(f"`{s['arg']}`" for s in rec["steps"] if s.get("action") == "search") or "nothing"
    if rec.get("answer") is None:
        answer = f"gave no answer (gold {rec['gold']!r})"
    else:
        answer = f"answered {rec['answer']!r} against gold {rec['gold']!r}"
    turns = f"{rec['turns']} turn" + ("s" if rec["turns"] != 1 else "")
    head = f"**{label}**: {turns} ({rec['status']}); searched {queries}; {answer}: EM {int(bool(rec['em']))}."
    return f"{head}\n\n```text\n{react_text(rec['steps'])}```"


def compare_episodes(base: list[dict], ft: list[dict], base_label: str = "few-shot ReAct",
                     ft_label: str = "fine-tuned ReAct") -> str:
    """Markdown for the `differing_pair` of two conditions: the question, each episode annotated
    (`episode_markdown`) and the turn where they diverged, or a line saying no question separates them."""
    pair = differing_pair(base, ft)
    if pair is None:
        return (f"No question separates the two agents: on each of the {len(ft)} questions both were right "
                "or both were wrong.")
    b, f = pair
    right = ft_label if f["em"] else base_label
    head = f"**Question** ({f['id']}): {f['question']}\n\nOnly {right} got it right (gold {f['gold']!r})."
    return "\n\n".join([head, episode_markdown(b, base_label), episode_markdown(f, ft_label),
                          divergence(b, f, base_label, ft_label)])
