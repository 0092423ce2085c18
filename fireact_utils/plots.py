"""Figures of the study, each saved as PNG (for reading) and SVG (for papers) by `save_fig`.

Every plot takes a DataFrame from `evaluate.results_table` (one row per condition, with
`em`, `em_lo`, `em_hi`, ... where `_lo`/`_hi` bound the 95% bootstrap CI over questions) and
returns the figure, already closed so that a notebook shows it once. EM is drawn in percent.

    plot_prompting_vs_finetuned(tables.condition_table(p, conds), stem=run_dir / "figures" / "pvf")

Shortcuts: seconds per episode is a run total divided by episodes (episodes run in batches, so
there is no per-episode time to resample) and is drawn without an interval.
"""

from __future__ import annotations

import os
import re
import sys
from html import escape
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules and not os.environ.get("DISPLAY") and not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")  # headless (tests, CLI): render to files only

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

MODE_COLORS = {"fewshot": sns.color_palette("deep")[0], "finetuned": sns.color_palette("deep")[3]}
MODE_NAMES = {"fewshot": "few-shot prompting (base model)", "finetuned": "fine-tuned (FireAct)"}
CI_NOTE = "error bars: 95% bootstrap CI over questions"


def save_fig(fig, stem: str | Path) -> list[Path]:
    """Write `<stem>.png` (150 dpi) and `<stem>.svg`; return both paths."""
    Path(stem).parent.mkdir(parents=True, exist_ok=True)
    paths = [Path(stem).with_suffix(".png"), Path(stem).with_suffix(".svg")]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return paths


def _done(fig, stem):
    if stem is not None:
        save_fig(fig, stem)
    plt.close(fig)  # notebooks display the returned figure; scripts keep no open figures
    return fig


def _empty(df: pd.DataFrame | None, what: str) -> bool:
    empty = df is None or len(df) == 0
    if empty:
        print(f"nothing to plot for {what}: the table is empty")
    return empty


def _mode(row) -> str:
    """'fewshot' or 'finetuned' from the table's `mode` column, else from the condition label."""
    mode = row.get("mode")
    return mode if isinstance(mode, str) else "finetuned" if "fine" in str(row["condition"]).lower() else "fewshot"


def _err(df: pd.DataFrame, metric: str, scale: float = 1.0) -> np.ndarray | None:
    """Asymmetric error bars (2 x n) from `<metric>_lo` / `<metric>_hi`, or None if absent."""
    if f"{metric}_lo" not in df or f"{metric}_hi" not in df:
        return None
    mid, lo, hi = (df[c].to_numpy(float) * scale for c in (metric, f"{metric}_lo", f"{metric}_hi"))
    return np.clip(np.vstack([mid - lo, hi - mid]), 0, None)


def _mode_legend(fig, modes) -> None:
    """One legend for the whole figure, below the panels, so it never hides a bar."""
    shown = [m for m in MODE_NAMES if m in set(modes)]
    handles = [plt.Rectangle((0, 0), 1, 1, color=MODE_COLORS[m]) for m in shown]
    fig.legend(handles, [MODE_NAMES[m] for m in shown], loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=len(shown), frameon=False)


def _hbars(ax, df: pd.DataFrame, metric: str, scale: float, xlabel: str, title: str, ci: bool = True) -> list[str]:
    """One horizontal bar per condition, coloured by prompting mode, CI whiskers when known."""
    modes = [_mode(r) for _, r in df.iterrows()]
    y = np.arange(len(df))
    ax.barh(y, df[metric].to_numpy(float) * scale, color=[MODE_COLORS[m] for m in modes],
            xerr=_err(df, metric, scale) if ci else None, capsize=4, error_kw={"elinewidth": 1.2})
    ax.set_yticks(y, df["condition"].astype(str))
    ax.invert_yaxis()  # first condition on top, as in the table
    ax.set(xlabel=xlabel, title=title, xlim=(0, max(ax.get_xlim()[1], 10 if scale == 100 else 1)))  # EM: >= 0-10%
    ax.grid(axis="x", alpha=0.3)
    return modes


def plot_prompting_vs_finetuned(table: pd.DataFrame, stem: str | Path | None = None):
    """EM (%) and turns per episode for each condition: does fine-tuning beat few-shot prompting?
    With question types in the table (`evaluate.behaviour`), a third panel splits EM into
    two-option and open questions, with the two-option chance rate drawn: what a coin would score."""
    if _empty(table, "prompting vs fine-tuned"):
        return None
    by_type = [t for t in ("two_option", "open") if f"em_{t}" in table]
    fig, axes = plt.subplots(1, 2 + bool(by_type), figsize=(12 + 5 * bool(by_type), 0.6 * len(table) + 2.2),
                             sharey=True)
    _mode_legend(fig, _hbars(axes[0], table, "em", 100, "exact match, EM (% of questions)", "Answer accuracy"))
    _hbars(axes[1], table, "turns", 1, "Thought/Action turns per episode (mean)", "Episode length")
    if by_type:
        _type_bars(axes[2], table, by_type)
    fig.suptitle(f"Few-shot prompting vs FireAct fine-tuning ({int(table['n'].max())} questions; {CI_NOTE})")
    return _done(fig, stem)


TYPE_STYLE = {"two_option": ("two-option (A or B?, yes/no)", "///"), "open": ("open", "")}


def _type_bars(ax, table: pd.DataFrame, types: list[str]) -> None:
    """EM per question type, one bar per type and condition (hatched: two-option), the coin's
    50% on two-option questions as a dashed line."""
    from .evaluate import CHANCE

    y, h = np.arange(len(table)), 0.8 / len(types)
    colors, handles = [MODE_COLORS[_mode(r)] for _, r in table.iterrows()], []
    for j, t in enumerate(types):
        name, hatch = TYPE_STYLE[t]
        sub = table.fillna({f"em_{t}": 0, f"em_{t}_lo": 0, f"em_{t}_hi": 0})
        n = int(table[f"n_{t}"].max()) if table[f"n_{t}"].notna().any() else 0
        ax.barh(y + (j - (len(types) - 1) / 2) * h, sub[f"em_{t}"] * 100, h, color=colors, hatch=hatch,
                edgecolor="white", xerr=_err(sub, f"em_{t}", 100), capsize=3)
        handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="0.6", edgecolor="white", hatch=hatch,
                                     label=f"{name} ({n} questions)"))
    if "two_option" in types:
        handles.append(ax.axvline(CHANCE["two_option"] * 100, ls="--", color="0.3", lw=1,
                                  label="a coin on two-option questions (50%)"))
    ax.set(xlabel="EM (% of the type's questions)", title="EM by question type", xlim=(0, 100))
    ax.grid(axis="x", alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)


def plot_efficiency(table: pd.DataFrame, stem: str | Path | None = None):
    """Cost per episode: prompt tokens, completion tokens, and wall-clock seconds."""
    if _empty(table, "efficiency"):
        return None
    has_time = "seconds_per_episode" in table and table["seconds_per_episode"].notna().any()
    fig, axes = plt.subplots(1, 3 if has_time else 2, figsize=(15 if has_time else 11, 0.6 * len(table) + 2.2),
                             sharey=True)
    _mode_legend(fig, _hbars(axes[0], table, "prompt_tokens", 1, "prompt tokens per episode (sum over turns)",
                             "Input read by the LM"))
    _hbars(axes[1], table, "completion_tokens", 1, "generated tokens per episode", "Output generated by the LM")
    if has_time:
        _hbars(axes[2], table.fillna({"seconds_per_episode": 0}), "seconds_per_episode", 1,
               "seconds per episode (run wall time / episodes; no CI)", "Wall-clock time", ci=False)
    claim = efficiency_claim(table)
    fig.suptitle(f"Inference cost per episode ({CI_NOTE})" + (f"\n{claim}" if claim else ""), va="bottom",
                 y=fig.subplotpars.top + 0.3 / fig.get_figheight())  # 0.3 in above the axes: clear of panel titles
    return _done(fig, stem)


def efficiency_claim(table: pd.DataFrame) -> str:
    """The fine-tuned ReAct row's cost per episode as multiples of the few-shot ReAct row's, e.g.
    'fine-tuned vs few-shot ReAct per episode: 0.91x prompt tokens, ...': no exemplars per turn
    need not make an episode cheaper when it takes more turns, so the title states what was
    measured. Empty when the table lacks either row."""
    def method(r) -> str:
        return r["method"] if isinstance(r.get("method"), str) else "react" if "react" in str(r["condition"]).lower() else ""

    rows = {mode: next((r for _, r in table.iterrows() if _mode(r) == mode and method(r) == "react"), None)
            for mode in ("finetuned", "fewshot")}
    if rows["finetuned"] is None or rows["fewshot"] is None:
        return ""
    parts = []
    for col, what in (("prompt_tokens", "prompt tokens"), ("completion_tokens", "generated tokens"),
                      ("seconds_per_episode", "seconds")):
        ft, fs = rows["finetuned"].get(col), rows["fewshot"].get(col)
        if pd.notna(ft) and pd.notna(fs) and fs > 0:
            parts.append(f"{ft / fs:.2g}x {what}")
    return "fine-tuned vs few-shot ReAct per episode: " + ", ".join(parts) if parts else ""


def plot_loss_curve(train_log_csv: str | Path, stem: str | Path | None = None):
    """Training loss per optimizer step, with the learning rate on a second axis; None (a line
    printed) where the trainer logged no step (fewer steps than train.logging_steps)."""
    try:
        log = pd.read_csv(train_log_csv)
    except pd.errors.EmptyDataError:
        log = None
    if _empty(log, "the loss curve") or "loss" not in log:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(log["step"], log["loss"], "o-", color=MODE_COLORS["finetuned"], label="training loss")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy loss (nats per loss token)")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if "learning_rate" in log:
        lr = ax.twinx()
        lr.plot(log["step"], log["learning_rate"], "--", color="grey", label="learning rate")
        lr.set_ylabel("learning rate")
        h2, l2 = lr.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right")
    ax.set_title(f"Fine-tuning loss ({len(log)} logged steps; final {log['loss'].iloc[-1]:.3f})")
    return _done(fig, stem)


def plot_run_loss_curve(run_dir: str | Path):
    """A run's fine-tuning loss, from the trainer's log (finetune/train_log.csv), as
    figures/loss_curve.{png,svg}: the CLI's `finetune` and notebook 02 both draw it here."""
    run_dir = Path(run_dir)
    return plot_loss_curve(run_dir / "finetune" / "train_log.csv", stem=run_dir / "figures" / "loss_curve")


def plot_data_scaling(df: pd.DataFrame, reference: pd.DataFrame | None = None, stem: str | Path | None = None):
    """EM vs number of fine-tuning trajectories (`n_trajectories` column), CI band; dashed
    horizontal lines for the rows of `reference` (e.g. few-shot ReAct and full-data fine-tuning)."""
    if _empty(df, "data scaling"):
        return None
    df = df.sort_values("n_trajectories")
    x, em = df["n_trajectories"].to_numpy(float), df["em"].to_numpy(float) * 100
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(x, em, "o-", color=MODE_COLORS["finetuned"], label="fine-tuned on N trajectories")
    ax.fill_between(x, df["em_lo"] * 100, df["em_hi"] * 100, color=MODE_COLORS["finetuned"], alpha=0.2,
                    label="95% bootstrap CI")
    for i, (_, r) in enumerate((reference if reference is not None else pd.DataFrame()).iterrows()):
        ax.axhline(r["em"] * 100, ls="--", color=sns.color_palette("muted")[(i + 2) % 10], label=str(r["condition"]))
    ax.set_xticks(x, [f"{v:g}" for v in x])
    ax.set(xlabel="fine-tuning trajectories (count)", ylabel="exact match, EM (% of questions)",
           ylim=(-0.5, max(ax.get_ylim()[1], 10)),
           title=f"Data scaling: more teacher trajectories, better agent? ({int(df['n'].max())} questions)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _done(fig, stem)


def plot_robustness(table: pd.DataFrame, stem: str | Path | None = None):
    """EM vs noise rate of the search tool, one line per agent (prompted / fine-tuned) and noise kind.
    Clean conditions (no `noise_rate`) sit at rate 0 and start every line of their agent. Rows with
    `too_few_corrupted` (`tables.noise_effects`) are left out, named under the axes: an agent that
    barely searched stays flat under any noise rate, which would read as robustness."""
    if _empty(table, "robustness"):
        return None
    t = table.assign(mode=[_mode(r) for _, r in table.iterrows()],
                     **{c: table[c] if c in table else np.nan for c in ("noise_rate", "noise_kind")})
    clean = t[t["noise_rate"].isna() | (t["noise_rate"] == 0)]
    noisy = t[t["noise_rate"] > 0]
    left_out = noisy[noisy["too_few_corrupted"].eq(True)] if "too_few_corrupted" in noisy else noisy.iloc[:0]
    noisy = noisy.drop(left_out.index)
    if "method" in clean:  # the clean few-shot baseline to compare with is ReAct (same tool use)
        clean = clean[clean["method"].isna() | (clean["method"] == "react")]
    kinds = sorted(noisy["noise_kind"].dropna().unique()) or [None]  # None: no noisy condition yet
    kind_desc = {"none": 'observation replaced by "None"', "random": "observation replaced by a random other one",
                 None: "clean tool only"}
    agent = lambda c: re.sub(r", [0-9.e-]+% of obs -> .*$", "", str(c))  # noqa: E731 - the clean label of a row
    clean, noisy = clean.assign(agent=clean["condition"].map(agent)), noisy.assign(agent=noisy["condition"].map(agent))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    extra, modes_drawn = iter(sns.color_palette("deep")[2:]), set()  # a second prompted agent gets its own colour
    for name in dict.fromkeys([*clean["agent"], *noisy["agent"]]):
        mine = noisy[noisy["agent"] == name]
        mode = (clean[clean["agent"] == name]["mode"].tolist() or mine["mode"].tolist())[0]
        color = next(extra) if mode in modes_drawn else MODE_COLORS[mode]
        modes_drawn.add(mode)
        for kind in [k for k in kinds if (mine["noise_kind"] == k).any()] or [None]:  # no noisy rows: its clean point
            j = kinds.index(kind) if kind in kinds else 0
            pts = pd.concat([clean[clean["agent"] == name].assign(noise_rate=0.0),
                             mine[mine["noise_kind"] == kind]]).sort_values("noise_rate")
            ax.errorbar(pts["noise_rate"] * 100, pts["em"] * 100, yerr=_err(pts, "em", 100), capsize=4,
                        marker="os^"[j % 3], ls="-" if j == 0 else ":", color=color,
                        label=f"{name}: {kind_desc.get(kind, kind)}")
    ax.set(xlabel="noisy observations (% of search calls); 0 = clean tool", ylabel="exact match, EM (% of questions)",
           ylim=(-0.5, max(ax.get_ylim()[1], 10)), xlim=(-3, max(ax.get_xlim()[1], 55)),
           title=f"Robustness to a noisy search tool ({CI_NOTE})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if len(left_out):
        fig.text(0.01, -0.01, "Left out, too few corrupted observations to measure robustness:\n" + "\n".join(
            f"  {r['condition']}: {r['note']}" for _, r in left_out.iterrows()), va="top", fontsize=7)
    return _done(fig, stem)


OUTCOME_COLORS = {"correct": "#4c9a5b", "saw evidence, wrong answer": "#e3a33b", "missed evidence": "#c44e52",
                  "never finished": "#8c8c8c"}


def plot_outcomes(outcomes: pd.DataFrame, stem: str | Path | None = None):
    """Where episodes go wrong in the wiki environment: per condition, the share that was correct,
    saw every gold paragraph but answered wrong, finished without the evidence, or never finished.
    `outcomes` is `tables.outcome_table` (a count column per outcome)."""
    if _empty(outcomes, "outcome breakdown"):
        return None
    cols = list(OUTCOME_COLORS)
    shares = outcomes[cols].div(outcomes[cols].sum(axis=1), axis=0) * 100
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(outcomes) + 2))
    left = np.zeros(len(outcomes))
    for c in cols:
        ax.barh(outcomes["condition"], shares[c], left=left, color=OUTCOME_COLORS[c], label=c)
        left += shares[c].to_numpy()
    ax.invert_yaxis()
    ax.set(xlabel="episodes (%)", xlim=(0, 100), title="Outcomes in the wiki environment: found the evidence?")
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    return _done(fig, stem)


FAILURE_COLORS = {"right": "#4c9a5b", "saw the evidence, answered wrong": "#e3a33b",
                  "saw some of the evidence, answered wrong": "#f0cf7a", "searched, missed the evidence": "#c44e52",
                  "searched, answered wrong": "#dd8452", "never searched": "#4c72b0", "malformed action": "#8172b3",
                  "turn limit": "#8c8c8c", "api_error": "#2f2f2f"}  # the keys are failures.CLASSES, in order


def plot_failures(table: pd.DataFrame, stem: str | Path | None = None):
    """Why episodes fail: per condition, the share of episodes in each failure class, stacked in
    the classes' fixed order (classes no condition has are left out of the legend).
    `table` is `failures.failure_table` (a `<class> (share)` column per class)."""
    if _empty(table, "failure classes"):
        return None
    cols = [c for c in FAILURE_COLORS if table[c].sum() > 0]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(table) + 2))
    left = np.zeros(len(table))
    for c in cols:
        share = table[f"{c} (share)"].to_numpy(float) * 100
        ax.barh(table["condition"], share, left=left, color=FAILURE_COLORS[c], label=c)
        left += share
    ax.invert_yaxis()
    ax.set(xlabel="episodes (%)", xlim=(0, 100), title="Why episodes fail: one class per episode")
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    return _done(fig, stem)


def _grouped_bars(ax, df: pd.DataFrame, group: str, hue: str) -> None:
    groups, hues = list(dict.fromkeys(df[group])), list(dict.fromkeys(df[hue]))
    width = 0.8 / len(hues)
    palette = sns.color_palette("deep", len(hues))
    for j, h in enumerate(hues):
        sub = df[df[hue] == h].set_index(group).reindex(groups)
        x = np.arange(len(groups)) + (j - (len(hues) - 1) / 2) * width
        ax.bar(x, sub["em"] * 100, width, yerr=_err(sub.fillna(0), "em", 100), capsize=4, color=palette[j], label=h)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("exact match, EM (% of questions)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def plot_generalization(table: pd.DataFrame, stem: str | Path | None = None):
    """EM per task (x) for each agent (bars): does HotpotQA fine-tuning transfer to other tasks?
    `table` has a `task` column (see `evaluate.grouped_results_table`)."""
    if _empty(table, "generalization"):
        return None
    fig, ax = plt.subplots(figsize=(3 + 2.2 * table["task"].nunique(), 4.5))
    _grouped_bars(ax, table, "task", "condition")
    ax.set(xlabel="task (not seen in fine-tuning unless it is the training task)", ylim=(0, max(ax.get_ylim()[1], 10)),
           title=f"Generalization to other tasks ({CI_NOTE})")
    return _done(fig, stem)


def plot_mixtures(table: pd.DataFrame, reference: pd.DataFrame | None = None, stem: str | Path | None = None):
    """EM of agents fine-tuned on different data mixtures (one bar each), with optional reference rows."""
    if _empty(table, "mixtures"):
        return None
    t = table.assign(mode="finetuned", condition="fine-tuned on " + table["condition"].astype(str))
    if reference is not None:
        t = pd.concat([reference, t], ignore_index=True)
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(t) + 2.2))
    _mode_legend(fig, _hbars(ax, t, "em", 100, "exact match, EM (% of questions)",
                             f"Fine-tuning data mixtures (tasks x methods) ({CI_NOTE})"))
    return _done(fig, stem)


def loss_mask_html(tok, example: dict, ignore: int = -100, max_tokens: int = 400):
    """IPython HTML of a tokenized example: tokens that carry loss are highlighted, masked ones grey."""
    from IPython.display import HTML

    spans = []
    for tid, lab in list(zip(example["input_ids"], example["labels"], strict=True))[:max_tokens]:
        text = escape(tok.decode([tid])).replace("\n", "&#8629;<br>")
        style = "background:#f6c9b8;color:#000" if lab != ignore else "color:#999"
        spans.append(f'<span style="{style}">{text}</span>')
    n, n_loss = len(example["labels"]), sum(lab != ignore for lab in example["labels"])
    legend = (f'<p><span style="background:#f6c9b8">highlighted</span>: loss ({n_loss} tokens); '
              f'<span style="color:#999">grey</span>: masked, context only ({n - n_loss} tokens). '
              f"First {min(max_tokens, n)} of {n} tokens.</p>")
    return HTML(legend + '<div style="font-family:monospace;white-space:pre-wrap;line-height:1.6">'
                + "".join(spans) + "</div>")


def plot_selection(table: pd.DataFrame, title: str, stem: str | Path | None = None):
    """The metric the choice maximized (`rule`: EM, or grounded EM for prompts) on the selection
    split per variant (recipe or prompt), the chosen one highlighted."""
    if _empty(table, title):
        return None
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(table) + 1.6))
    y = np.arange(len(table))
    colors = [MODE_COLORS["finetuned"] if c else "0.65" for c in table["chosen"]]
    rule = table["rule"].iloc[0] if "rule" in table else "em"  # the metric the choice maximized is drawn
    ax.barh(y, table[rule] * 100, color=colors, xerr=_err(table, rule, 100), capsize=4)
    ax.set_yticks(y, table["condition"].astype(str))
    ax.invert_yaxis()
    split = table["split"].iloc[0] if "split" in table else "validation"
    what = "grounded EM (%: right after searching at least once)" if rule == "grounded_em" else "EM (%)"
    ax.set(xlabel=f"{what} on {split}", title=f"{title} (chosen: coloured; {CI_NOTE})")
    ax.grid(axis="x", alpha=0.3)
    return _done(fig, stem)


def plot_self_consistency(df: pd.DataFrame, stem: str | Path | None = None):
    """Self-consistency: EM of the majority vote against k (dotted: pass@k, its ceiling), and
    against tokens per question (the cost that compares across machines; seconds, in the table,
    hold only within one)."""
    if _empty(df, "self-consistency"):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for agent, g in df.groupby("agent", sort=False):
        color = MODE_COLORS["finetuned" if agent.startswith("finetuned") else "fewshot"]
        one_seed = ", seed " in agent  # beside their mean: thin lines, no band
        for ax, x in zip(axes, ("k", "tokens_per_question"), strict=True):
            ax.plot(g[x], g["em"] * 100, ".-" if one_seed else "o-", color=color, label=agent,
                    alpha=0.45 if one_seed else 1.0, lw=0.8 if one_seed else 1.5)
            if not one_seed:
                ax.fill_between(g[x], g["em_lo"] * 100, g["em_hi"] * 100, color=color, alpha=0.15)
        if not one_seed and "pass_at_k" in g:  # tables saved before pass@k have none
            axes[0].plot(g["k"], g["pass_at_k"] * 100, ":", color=color, label=f"{agent}: pass@k (the vote's ceiling)")
    axes[0].set(xlabel="episodes voted per question (k)", ylabel="EM (%)", xticks=sorted(df["k"].unique()))
    axes[1].set(xlabel="tokens per question (k episodes, prompt + generated)")
    handles, labels = axes[0].get_legend_handles_labels()  # below the panels: pass@k climbs into any corner
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, frameon=False)
    for ax in axes:
        ax.grid(alpha=0.3)
    edited = "edited_by_hand" in df and df["edited_by_hand"].notna().any()
    fig.suptitle(f"Self-consistency: majority vote over k sampled episodes ({int(df['n'].max())} questions; "
                 f"band: 95% bootstrap CI)" + ("\n† a sample's seconds were edited by hand (table: edited_by_hand)"
                                               if edited else ""))
    return _done(fig, stem)


def plot_rounds(table: pd.DataFrame, stem: str | Path | None = None):
    """Self-improvement: validation and test EM per round (95% CI bars), trajectories added above;
    equal-steps controls (GPT-4 data alone, the round's steps) as hollow markers beside their round."""
    if _empty(table, "self-improvement"):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    is_control = table["control"].astype(bool) if "control" in table else pd.Series(False, index=table.index)
    controls, table = table[is_control], table[~is_control]
    for split, color in (("val", "#4C72B0"), ("test", "#DD8452")):
        for part, fmt, shift, label in ((table, "o-", 0.0, ""), (controls, "o", 0.12, ", control: GPT-4 data only")):
            if part.empty:
                continue
            em = part[f"{split}_em"] * 100
            err = np.array([em - part[f"{split}_lo"] * 100, part[f"{split}_hi"] * 100 - em])
            ax.errorbar(part["round"] + shift, em, yerr=err, fmt=fmt, color=color, capsize=4,
                        mfc=color if not label else "white",
                        label=f"{split} ({int(part[f'{split}_n'].iloc[0])} questions){label}")
    for _, r in table.iterrows():
        if r["round"] > 0:
            ax.annotate(f"+{int(r['added'])} own", (r["round"], r["val_em"] * 100), textcoords="offset points",
                        xytext=(0, 8), ha="center", fontsize=8)
    ax.set(xlabel="round (0 = SFT student)", ylabel="EM (%)", xticks=sorted(table["round"]),
           title="Self-improvement: fine-tuned again on its own successful episodes")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    return _done(fig, stem)


def plot_rl_curve(curve: pd.DataFrame, stem: str | Path | None = None):
    """GRPO: each step's mean reward and EM of its rollouts, and their search and format-error rates."""
    if _empty(curve, "GRPO rollouts"):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for col, label in (("reward", "reward"), ("em", "EM")):
        axes[0].plot(curve["step"], curve[col], "o-", ms=3, label=label)
    axes[0].set(xlabel="GRPO step", ylabel="mean over the step's episodes", title="Reward and exact match")
    axes[1].plot(curve["step"], curve["searches"], "o-", ms=3, label="searches per episode")
    axes[1].plot(curve["step"], curve["format_errors"], "o-", ms=3, label="episodes with a format error")
    axes[1].set(xlabel="GRPO step", title="Tool use and format")
    for ax in axes:
        ax.legend(frameon=False)
        ax.grid(alpha=0.3)
    return _done(fig, stem)


def plot_base_models(table: pd.DataFrame, stem: str | Path | None = None):
    """FireAct's base-model comparison: per evaluation set (a panel), few-shot vs fine-tuned EM
    (bars, 95% CI whiskers) for each base model, the paired gain written above its pair.
    `table`: `base_models.report`'s (columns task, model, agent, em, em_lo, em_hi, gain)."""
    if _empty(table, "base models"):
        return None
    sets, models = list(dict.fromkeys(table["task"])), list(dict.fromkeys(table["model"]))
    fig, axes = plt.subplots(1, len(sets), figsize=(1.5 + 2.2 * len(models) * len(sets), 4.2), sharey=True,
                             squeeze=False)
    width = 0.38
    for ax, where in zip(axes[0], sets, strict=True):
        for j, agent in enumerate(MODE_NAMES):
            sub = table[(table["task"] == where) & (table["agent"] == agent)].set_index("model").reindex(models)
            x = np.arange(len(models)) + (j - 0.5) * width
            ax.bar(x, sub["em"] * 100, width, yerr=_err(sub.fillna(0), "em", 100), capsize=4, color=MODE_COLORS[agent])
        here = table[table["task"] == where]
        for i, m in enumerate(models):  # the pair's paired gain, above its higher whisker
            rows = here[here["model"] == m]
            gain = rows["gain"].dropna() if "gain" in rows else []
            if len(gain):
                ax.annotate(f"{gain.iloc[0] * 100:+.1f}", (i, rows["em_hi"].max() * 100), ha="center",
                            textcoords="offset points", xytext=(0, 4), fontsize=8)
        n = int(table.loc[table["task"] == where, "n"].max())
        ax.set_xticks(np.arange(len(models)), [Path(m).name for m in models])
        ax.set(title=f"{where} ({n} questions)", xlabel="base model")
        ax.grid(axis="y", alpha=0.3)
    top = max(axes[0][0].get_ylim()[1], 10, table["em_hi"].max() * 100 * 1.12)  # room for the gains
    axes[0][0].set(ylabel="exact match, EM (% of questions)", ylim=(0, top))
    _mode_legend(fig, list(MODE_NAMES))
    fig.suptitle(f"Base models: few-shot prompting vs FireAct fine-tuning\n(fine-tuned minus few-shot EM, points, "
                 f"above each pair; {CI_NOTE})", y=1.04)
    return _done(fig, stem)
