"""Why episodes fail, and what changed between two conditions or two runs.

Two agents with the same EM can fail for different reasons: a few-shot agent that never searches
and a fine-tuned one that searches but misses the second hop. Each episode record gets exactly one
failure class, read off the record alone (status, steps, em) plus, for Wikipedia tasks, the gold
paragraph titles the task provides, so a bundle of records is classified without its model, tool or
index:

    gold = gold_titles_by_id(task)                       # None for the recorded-Google replay
    failure_table({"few-shot": base, "fine-tuned": ft}, gold)   # counts and shares per condition
    what_changed(base, ft, gold)                         # class before -> class after, paired by episode id
    report(p, conds)                                     # both for notebook 03's conditions, written to tables/, figures/
    compare_runs(run_a, run_b)                           # each condition of both runs: EM, paired gain, flips

    python -m fireact_utils compare outputs/runs/cpu outputs/runs/gpu [--html flips.html]   # flipped episodes side by side

Precedence, first match wins:
1. `right`: EM.
2. `api_error`: the model's API or the search tool failed for good (status api_error or tool_error):
   an outage says nothing about the agent, so it outranks what the agent did.
3. `malformed action`: ended by unparseable actions (status parse_error), or answered wrong without a
   single search after an invalid action (not search/finish): it tried to act and could not.
4. `turn limit`: ran out of turns (status max_turns) without answering.
5. `never searched`: answered wrong without a search (IO and CoT always land here).
6. Answered wrong after searching, by what its observations showed. Wiki tasks: `saw the evidence,
   answered wrong` (every gold paragraph appeared; `wiki.outcome`'s rule), `saw some of the
   evidence, answered wrong` (some did: a missed hop), `searched, missed the evidence` (none did).
   The replay has no gold paragraphs (and a question with no gold titles has none to find), so
   there it is `searched, answered wrong`.

Whether an observation holds a gold paragraph is `wiki.shown_titles`, the rule `wiki.evidence` uses.
Unlike `evidence`, nothing is replayed: an observation counts for what the agent read, so a noisy
tool's "None" shows nothing and a random paragraph that happens to be gold was seen.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from .agent import episode_id, load_done
from .evaluate import N_BOOT, fmt_gain, paired_bootstrap_diff
from .io import atomic_write_text
from .tasks import Task
from .wiki import shown_titles

if TYPE_CHECKING:
    from .config import Params

CLASSES = ("right", "saw the evidence, answered wrong", "saw some of the evidence, answered wrong",
           "searched, missed the evidence", "searched, answered wrong", "never searched", "malformed action",
           "turn limit", "api_error")  # the fixed order of tables and figures
OUTAGES = ("api_error", "tool_error")


def gold_titles_by_id(task: Task) -> dict[str, list[str]] | None:
    """Each episode id's gold paragraph titles (wiki tasks); None where the task has none (replay)."""
    if task.gold_titles is None:
        return None
    return {episode_id(task, i): list(g) for i, g in enumerate(task.gold_titles)}


def failure_class(record: dict, gold_titles: list[str] | None = None) -> str:
    """The one class of CLASSES an episode record falls in (precedence: the module docstring)."""
    steps = record.get("steps") or []
    searches = [s for s in steps if s.get("action") == "search"]
    if record["em"]:
        return "right"
    if record["status"] in OUTAGES:
        return "api_error"
    invalid = any(s.get("action") not in ("search", "finish") for s in steps)
    if record["status"] == "parse_error" or (invalid and not searches):
        return "malformed action"
    if record["status"] == "max_turns":
        return "turn limit"
    if record["status"] != "finished":
        raise ValueError(f"episode {record.get('id')}: unknown status {record['status']!r}")
    if not searches:
        return "never searched"
    if not gold_titles:
        return "searched, answered wrong"
    seen = set().union(*(shown_titles(s.get("observation") or "", gold_titles) for s in searches))
    if not seen:
        return "searched, missed the evidence"
    return "saw the evidence, answered wrong" if seen == set(gold_titles) else "saw some of the evidence, answered wrong"


def _classes(records: list[dict], gold_titles_by_id: dict[str, list[str]] | None) -> dict[str, str]:
    gold = gold_titles_by_id or {}
    return {r["id"]: failure_class(r, gold.get(r["id"])) for r in records}


def failure_table(conditions: dict[str, list[dict]],
                  gold_titles_by_id: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """One row per condition: `n`, a count column per class, then `<class> (share)` columns summing
    to 1; every class always present, in CLASSES order, so tables of different runs line up."""
    rows = []
    for name, records in conditions.items():
        counts = Counter(_classes(records, gold_titles_by_id).values())
        n = len(records)
        rows.append({"condition": name, "n": n, **{c: counts[c] for c in CLASSES},
                     **{f"{c} (share)": counts[c] / n if n else 0.0 for c in CLASSES}})
    return pd.DataFrame(rows, columns=["condition", "n", *CLASSES, *(f"{c} (share)" for c in CLASSES)])


def what_changed(before: list[dict], after: list[dict],
                 gold_titles_by_id: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """Transitions of the episodes in both conditions, paired by id (never by position): one row per
    (class before, class after) that occurs, with its count and episode ids, in CLASSES order. What
    fine-tuning changed reads off it, e.g. `never searched` -> `saw some of the evidence, answered wrong`."""
    a, b = _classes(before, gold_titles_by_id), _classes(after, gold_titles_by_id)
    ids: dict[tuple[str, str], list[str]] = {}
    for i in (i for i in a if i in b):
        ids.setdefault((a[i], b[i]), []).append(i)
    order = sorted(ids, key=lambda k: (CLASSES.index(k[0]), CLASSES.index(k[1])))
    return pd.DataFrame([{"before": k[0], "after": k[1], "n": len(ids[k]), "ids": ids[k]} for k in order],
                        columns=["before", "after", "n", "ids"])


def failure_markdown(table: pd.DataFrame) -> str:
    """`failure_table` as Markdown: per condition, each class's count and share of its episodes
    (classes no condition has are left out)."""
    cols = [c for c in CLASSES if table[c].sum() > 0]
    lines = ["| condition | n | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for _, r in table.iterrows():
        lines.append(f"| {r['condition']} | {r['n']} | "
                     + " | ".join(f"{r[c]} ({r[f'{c} (share)'] * 100:.0f}%)" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def changed_markdown(changed: pd.DataFrame, before: str, after: str) -> str:
    """`what_changed` in words: how many episodes kept their class, then each change of class,
    the most frequent first, with its count (the ids are in the table)."""
    n = int(changed["n"].sum())
    same = int(changed.loc[changed["before"] == changed["after"], "n"].sum())
    moved = changed[changed["before"] != changed["after"]].sort_values("n", ascending=False, kind="stable")
    head = (f"**From {before} to {after}**, the same {n} questions paired by id: {same} kept their class, "
            f"{n - same} changed it" + (":" if len(moved) else "."))
    return "\n".join([head, *(f"- {r.before} -> {r.after}: {r.n}" for r in moved.itertuples())])


def report(p: Params, conds: dict[str, list[dict]], before: str = "base_fewshot_react",
           after: str = "finetuned_react") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Notebook 03's (and `headline`'s) failure classes: `failure_table` of `conds` (labelled as
    in the main table) to tables/failures.{csv,md} and figures/failures.{png,svg}, and
    `what_changed` from `before` to `after` to tables/what_changed.csv. The gold paragraphs are
    evaluate.task's (none in the replay). Returns (failure table, what changed)."""
    from .pipeline import check_task
    from .plots import plot_failures
    from .tables import condition_label

    task = check_task(p)
    if (gold := gold_titles_by_id(task)) is None and task.corpus:  # a merge of bundles older than `gold_titles`
        print(f"failures: no meta records {task.name}'s gold paragraphs, so wrong answers after a search are not "
              "split by the evidence seen")
    table = failure_table({condition_label(k): v for k, v in conds.items()}, gold)
    changed = what_changed(conds[before], conds[after], gold)
    out = p.run_dir / "tables"
    atomic_write_text(out / "failures.csv", table.to_csv(index=False))
    atomic_write_text(out / "failures.md", failure_markdown(table))
    atomic_write_text(out / "what_changed.csv", changed.assign(ids=changed["ids"].map(" ".join)).to_csv(index=False))
    plot_failures(table, p.run_dir / "figures" / "failures")
    return table, changed


# ---------------------------------------------------------------- two runs


def run_conditions(run: str | Path) -> dict[str, list[dict]]:
    """Every condition saved in a run's eval/ folder, by file name: its records (the newest per id)."""
    return {f.stem: list(load_done(f).values()) for f in sorted((Path(run) / "eval").glob("*.jsonl"))}


def compare_runs(run_a: str | Path, run_b: str | Path, n_boot: int = N_BOOT) -> pd.DataFrame:
    """Each condition saved in both runs, its episodes paired by id (in run_a's order): `n`, EM of
    each, the gain of b over a with its paired bootstrap 95% CI (`paired_bootstrap_diff`, as
    `tables.paired_gain`), and the ids that flipped (`right_to_wrong`, `wrong_to_right`). Conditions
    sharing no episode are left out."""
    conds_a, conds_b = run_conditions(run_a), run_conditions(run_b)
    rows = []
    for name in (n for n in conds_a if n in conds_b):
        by_id = {r["id"]: r for r in conds_b[name]}
        pairs = [(r, by_id[r["id"]]) for r in conds_a[name] if r["id"] in by_id]
        if not pairs:
            continue
        em_a, em_b = ([float(bool(r["em"])) for r in side] for side in zip(*pairs, strict=True))
        gain, lo, hi = paired_bootstrap_diff(em_a, em_b, n_boot)
        rows.append({"condition": name, "n": len(pairs), "em_a": sum(em_a) / len(pairs), "em_b": sum(em_b) / len(pairs),
                     "gain": gain, "lo": lo, "hi": hi,
                     "right_to_wrong": [ra["id"] for ra, rb in pairs if ra["em"] and not rb["em"]],
                     "wrong_to_right": [ra["id"] for ra, rb in pairs if not ra["em"] and rb["em"]]})
    return pd.DataFrame(rows, columns=["condition", "n", "em_a", "em_b", "gain", "lo", "hi", "right_to_wrong",
                                       "wrong_to_right"])


def compare_report(table: pd.DataFrame, run_a: str | Path = "a", run_b: str | Path = "b") -> str:
    """`compare_runs`' table as text: a line per condition, then the ids that flipped."""
    from .tables import condition_label

    if table.empty:
        return f"no condition has episodes in both {run_a} and {run_b}"
    lines = [f"EM of b minus a (95% paired bootstrap CI); a = {run_a}, b = {run_b}"]
    for _, r in table.iterrows():
        lines.append(f"{condition_label(r['condition'])}: n={r['n']}  EM a {r['em_a'] * 100:.1f}  "
                     f"b {r['em_b'] * 100:.1f}  gain {fmt_gain(r['gain'], r['lo'], r['hi'])}")
        for what in ("right_to_wrong", "wrong_to_right"):
            if r[what]:
                lines.append(f"  {what.replace('_', ' ')} ({len(r[what])}): {', '.join(r[what])}")
    return "\n".join(lines)


def compare_main(run_a: str, run_b: str, html: str | None = None) -> int:
    """`python -m fireact_utils compare RUN_A RUN_B [--html FILE]`: print the comparison (and write the
    flipped questions' episodes to FILE, `browser.write_comparison`); exit 1 if nothing pairs, 2 (one
    `error:` line, as the CLI's other user mistakes) if a run has no eval/ folder."""
    for run in (run_a, run_b):
        if not (Path(run) / "eval").is_dir():
            print(f"error: {run} has no eval/ folder (a run directory, e.g. outputs/runs/cpu)", file=sys.stderr)
            return 2
    table = compare_runs(run_a, run_b)
    print(compare_report(table, run_a, run_b))
    if html and len(table):
        from .browser import write_comparison

        print(f"flipped questions, side by side: {write_comparison(run_a, run_b, table, html)}")
    return 0 if len(table) else 1
