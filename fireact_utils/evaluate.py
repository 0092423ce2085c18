"""Scores over episodes: means with bootstrap confidence intervals, and results tables.

A "condition" is one set of episode records (e.g. few-shot ReAct, fine-tuned, fine-tuned +
noisy tool). Tables put conditions side by side on the same questions, with 95% CIs obtained
by resampling questions (percentile bootstrap, seeded).

    table = results_table({"ReAct few-shot": recs_a, "FireAct (ours)": recs_b})
    write_table(table, run_dir / "metrics")      # metrics.csv + metrics.md
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .config import EvalParams, default
from .io import atomic_write_text

N_BOOT = default(EvalParams, "bootstrap")
METRICS = ("em", "f1", "turns", "finish", "prompt_tokens", "completion_tokens")


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


def episode_values(records: list[dict], metric: str) -> list[float]:
    if metric == "finish":
        return [float(r["status"] == "finished") for r in records]
    return [float(r[metric]) for r in records]


def condition_row(name: str, records: list[dict], n_boot: int = N_BOOT, wall_s: float | None = None) -> dict:
    row: dict = {"condition": name, "n": len(records)}
    for m in METRICS:
        mean, lo, hi = bootstrap_ci(episode_values(records, m), n_boot)
        row[m], row[f"{m}_lo"], row[f"{m}_hi"] = mean, lo, hi
    statuses = pd.Series([r["status"] for r in records]).value_counts().to_dict()
    row["statuses"] = ", ".join(f"{k}:{v}" for k, v in sorted(statuses.items()))
    if wall_s is not None and records:
        row["seconds_per_episode"] = wall_s / len(records)
    return row


def results_table(conditions: dict[str, list[dict]], n_boot: int = N_BOOT, wall: dict[str, float] | None = None,
                  extra: dict[str, dict] | None = None) -> pd.DataFrame:
    """One row per condition; `extra[name]` adds columns (e.g. search hit rates, noise rate)."""
    rows = []
    for name, recs in conditions.items():
        row = condition_row(name, recs, n_boot, (wall or {}).get(name))
        row.update((extra or {}).get(name, {}))
        rows.append(row)
    return pd.DataFrame(rows)


def fmt_ci(mean: float, lo: float, hi: float, scale: float = 100.0, digits: int = 1) -> str:
    return f"{mean * scale:.{digits}f} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"


def _pct(x) -> str:
    return "" if pd.isna(x) else f"{x * 100:.0f}"


def markdown_table(df: pd.DataFrame) -> str:
    """Human table: EM/F1/finish in % with CIs, turns and tokens as means; the search fidelity
    columns where the table has them (replay: exact-hit %; wiki: gold-top % and saw-all-gold %),
    and the environment card of each condition as a numbered note below the table."""
    lead = [c for c in ("task",) if c in df]  # grouped tables (grouped_results_table) show their group first
    fid = [(c, h) for c, h in (("search_exact_hit_rate", "exact hit %"), ("gold_top_rate", "gold top %"),
                               ("saw_all_gold_rate", "saw all gold %")) if c in df]
    envs = list(dict.fromkeys(e for e in df.get("environment", pd.Series(dtype=str)).dropna()))
    cols = [*lead, "condition", "n", "EM % [95% CI]", "F1 %", "finish %", "turns", "prompt tok", "completion tok",
            *(h for _, h in fid), *(["env"] if envs else [])]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = [*(str(r[c]) for c in lead), str(r["condition"]), str(r["n"]), fmt_ci(r["em"], r["em_lo"], r["em_hi"]),
                 f"{r['f1'] * 100:.1f}", f"{r['finish'] * 100:.0f}", f"{r['turns']:.2f}",
                 f"{r['prompt_tokens']:.0f}", f"{r['completion_tokens']:.0f}", *(_pct(r[c]) for c, _ in fid)]
        if envs:
            env = r.get("environment")
            cells.append(f"[{envs.index(env) + 1}]" if isinstance(env, str) else "")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"\n[{i}] {e}" for i, e in enumerate(envs, 1)]
    return "\n".join(lines) + "\n" + "".join(notes) + ("\n" if notes else "")


def write_table(df: pd.DataFrame, stem: str | Path) -> tuple[Path, Path]:
    stem = Path(stem)
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    atomic_write_text(csv_path, df.to_csv(index=False))
    atomic_write_text(md_path, markdown_table(df))
    return csv_path, md_path


def fireact_reference(data_dir=None) -> pd.DataFrame:
    """FireAct's released evaluation runs (HotpotQA dev-500) as table rows, for the summary."""
    from .config import data_dir as resolve
    from .io import read_json

    rows = []
    for f in sorted((resolve(data_dir) / "trajs").glob("*.json")):
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
