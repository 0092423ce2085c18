"""An episode browser: every saved episode of a run in one static HTML page, to read why an agent
was right or wrong without a notebook or a server.

    python -m fireact_utils browse outputs/runs/cpu                  # -> outputs/runs/cpu/browser.html
    python -m fireact_utils browse outputs/runs/cpu --conditions finetuned_react --ids hotpotqa/dev/12
    python -m fireact_utils compare RUN_A RUN_B --html flips.html    # the flipped questions side by side
    browser.show("outputs/runs/cpu", condition="finetuned_react", correct=False)   # in a notebook

The page opens from the file system: the episode table is DataTables through itables' offline
bundle (sorting, a search box, a filter per column and panes for the categorical columns), and
everything else is plain HTML from a jinja2 template (autoescaped) with no script of its own. Each
row's id links to `#ep-<condition>-<id>`, an anchor inside the episode's closed <details>, which
the browser opens on arrival; `#q-<id>` shows one question across conditions. Records are read as
`failures.run_conditions` reads them and classified by `failures.failure_class`; in Wikipedia
tasks each step lists the paragraphs it retrieved (`wiki.retrieved_titles`) beside the gold ones.
The training data, where the run has it, is shown with the text that carries the loss marked
(`train.segments_alpaca`; a character view: truncation at train.max_length needs the tokenizer and
is not shown).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from .config import TrainParams, default
from .evaluate import question_type, searches
from .failures import failure_class, gold_titles_by_id, run_conditions
from .io import DataFileError, atomic_write_text, read_json
from .trajectories import format_action
from .wiki import retrieved_titles

PAGE = "browser.html"  # written into the run dir
COLUMNS = ["condition", "id", "question type", "correct", "F1", "searched", "turns", "failure class", "prediction",
           "gold", "question"]
PANES = ["condition", "question type", "correct", "searched", "failure class"]  # categorical: one pane each


def anchor(condition: str, episode_id: str) -> str:
    """The HTML id of an episode's detail (ids hold '/', which ids and fragments allow; never spaces)."""
    return "ep-" + f"{condition}-{episode_id}".replace(" ", "_")


def question_anchor(episode_id: str) -> str:
    """The HTML id of one question across conditions."""
    return "q-" + episode_id.replace(" ", "_")


def _wiki(task: str, split: str) -> tuple[dict[str, list[str]], frozenset[str]] | None:
    """(gold titles by episode id, corpus titles) of a Wikipedia task; None for any other task."""
    from .tasks import WIKI_TASKS, load_task
    from .wiki import corpus_path, read_corpus

    if task not in WIKI_TASKS:
        return None
    t = load_task(task, split)
    return gold_titles_by_id(t), frozenset(read_corpus(corpus_path(t.corpus))[0])


def wiki_context(conds: dict[str, list[dict]]) -> tuple[dict[tuple[str, str], tuple], list[str]]:
    """Each Wikipedia (task, split) of the records (read off the records, not the file names): its
    gold and corpus titles; and a note per task whose multihop data is missing here (shown, not raised)."""
    found, notes = {}, []
    for key in sorted({(r["task"], r["split"]) for recs in conds.values() for r in recs if "task" in r}):
        try:
            if (w := _wiki(*key)) is not None:
                found[key] = w
        except (DataFileError, FileNotFoundError) as e:
            notes.append(f"{key[0]} {key[1]}: gold and retrieved titles not shown ({e})")
    return found, notes


def _gold(rec: dict, wiki: dict) -> list[str] | None:
    w = wiki.get((rec.get("task"), rec.get("split")))
    return None if w is None else w[0].get(rec["id"])


def episode_table(conds: dict[str, list[dict]], wiki: dict | None = None) -> pd.DataFrame:
    """One row per episode of every condition, with COLUMNS (plain values: the page links the id)."""
    wiki = wiki or {}
    rows = [{"condition": name, "id": r["id"], "question type": question_type(r), "correct": bool(r["em"]),
             "F1": round(float(r["f1"]), 2), "searched": searches(r) > 0, "turns": r["turns"],
             "failure class": failure_class(r, _gold(r, wiki)),
             "prediction": "" if r.get("answer") is None else r["answer"], "gold": r["gold"], "question": r["question"]}
            for name, recs in conds.items() for r in recs]
    return pd.DataFrame(rows, columns=COLUMNS)


def select(conds: dict[str, list[dict]], table: pd.DataFrame, ids=None, conditions=None,
           **where) -> tuple[dict[str, list[dict]], pd.DataFrame]:
    """The conditions and table rows kept by `ids`, `conditions` and `where` (a column, its spaces as
    underscores, equal to a value or in a list: `correct=False`, `failure_class=["never searched"]`)."""
    for col, want in (("id", ids), ("condition", conditions)):  # a misspelt name is an error, not an empty page
        if missing := [w for w in want or [] if w not in set(table[col])]:
            raise ValueError(f"no episode has {col} {', '.join(map(str, missing))}")
    keep = pd.Series(True, index=table.index)
    for col, want in {"id": ids, "condition": conditions, **where}.items():
        col = col.replace("_", " ") if col.replace("_", " ") in table else col
        if col not in table:
            raise ValueError(f"no column {col!r} to filter on; columns: {', '.join(COLUMNS)}")
        if want is not None:
            keep &= table[col].isin(want if isinstance(want, list | tuple | set) else [want])
    table = table[keep]
    pairs = set(zip(table["condition"], table["id"], strict=True))
    kept = {name: [r for r in recs if (name, r["id"]) in pairs] for name, recs in conds.items()}
    return {k: v for k, v in kept.items() if v}, table


def _linked(table: pd.DataFrame) -> pd.DataFrame:
    """The table as the page shows it: every text cell escaped, the id a link to its episode (itables
    is told to allow HTML, so nothing may reach it unescaped)."""
    from markupsafe import Markup, escape

    out = table.copy()
    for col in ("condition", "question type", "failure class", "prediction", "gold", "question"):
        out[col] = out[col].map(lambda x: str(escape(x)))
    link = Markup('<a href="#{}">{}</a>')
    out["id"] = [str(link.format(anchor(c, i), i)) for c, i in zip(table["condition"], table["id"], strict=True)]
    return out


def datatable_html(table: pd.DataFrame) -> str:
    """The episode table as a DataTable for itables' offline bundle (included once per page: `_bundle`)."""
    import itables

    panes = [COLUMNS.index(c) for c in PANES]
    return itables.to_html_datatable(
        _linked(table), table_id="episodes", connected=False, allow_html=True, showIndex=False,
        column_filters="header", classes="display compact", style="width:100%", maxBytes=0, pageLength=25,
        deferRender=True, display_logo_when_loading=False, layout={"top1": "searchPanes"},
        searchPanes={"columns": panes, "layout": f"columns-{len(panes)}", "cascadePanes": True},
        columnDefs=[{"targets": [COLUMNS.index(c) for c in ("prediction", "gold")], "className": "text"},
                    {"targets": [COLUMNS.index("question")], "className": "question"},
                    *({"targets": [i], "searchPanes": {"header": COLUMNS[i]}} for i in panes)])  # not the filter box


def _bundle() -> str:
    """DataTables' JavaScript and CSS, embedded (about 1 MB): the page needs no network."""
    import itables
    from itables.javascript import generate_init_offline_itables_html

    return generate_init_offline_itables_html(itables.options.dt_bundle)


def training_view(run_dir: Path) -> dict | None:
    """The run's training trajectories as (text, carries loss) pieces, with the loss setting that the
    fine-tune used (its train_done.json, else the run's params.json, else the default); None if none."""
    from .data import load_dataset_source
    from .train import segments_alpaca

    data = run_dir / "dataset" / "trajectories.jsonl"
    if not data.is_file():
        return None
    done, params = run_dir / "finetune" / "final" / "train_done.json", run_dir / "params.json"
    train = (read_json(done)["params"] if done.is_file()
             else read_json(params)["params"]["train"] if params.is_file() else {})
    loss_on, fmt = (train.get(k, default(TrainParams, k)) for k in ("loss_on", "format"))
    recs = load_dataset_source(str(data))
    return {"loss_on": loss_on, "format": fmt, "path": str(data), "trajectories": [
        {"question": r["question"], "pieces": [(t, agent or loss_on == "all") for t, agent in segments_alpaca(r)]}
        for r in recs]}


def _episode(name: str, rec: dict, cls: str, wiki: dict) -> dict:
    """What an episode's detail shows: its steps (action as written), answer, scores, and in a wiki
    task the titles each search retrieved, gold first marked."""
    w = wiki.get((rec.get("task"), rec.get("split")))
    gold = set(_gold(rec, wiki) or [])
    steps = []
    for s in rec.get("steps") or []:
        shown = []
        if w is not None and s.get("action") == "search":
            shown = [(t, t in gold) for t in retrieved_titles(s.get("observation") or "", w[1])]
        steps.append({"thought": s.get("thought") or "", "observation": s.get("observation"), "retrieved": shown,
                      "action": format_action(s.get("action") or "", s.get("arg") or "")})
    seen = dict.fromkeys(hit for s in steps for hit in s["retrieved"])  # (title, is gold), first retrieval first
    return {"anchor": anchor(name, rec["id"]), "q_anchor": question_anchor(rec["id"]), "condition": name, "rec": rec,
            "failure": cls, "steps": steps, "wiki": w is not None, "retrieved": list(seen),
            "gold_titles": [(t, (t, True) in seen) for t in _gold(rec, wiki) or []]}


def render(conds: dict[str, list[dict]], title: str, subtitle: str = "", training: dict | None = None,
           fragment: bool = False, labels: dict[str, str] | None = None, **filters) -> str:
    """The page (or, `fragment`, its body for a notebook) of `conds` kept by `filters` (`select`);
    `labels` name the conditions in headings (default `tables.condition_label`)."""
    import jinja2

    from .tables import condition_label

    wiki, notes = wiki_context(conds)
    conds, table = select(conds, episode_table(conds, wiki), **filters)
    classes = dict(zip(zip(table["condition"], table["id"], strict=True), table["failure class"], strict=True))
    episodes = {name: [_episode(name, r, classes[name, r["id"]], wiki) for r in recs] for name, recs in conds.items()}
    by_question: dict[str, dict] = {}
    for ep in (ep for eps in episodes.values() for ep in eps):
        r = ep["rec"]
        by_question.setdefault(r["id"], {"id": r["id"], "anchor": ep["q_anchor"], "question": r["question"],
                                         "gold": r["gold"], "eps": []})["eps"].append(ep)
    env = jinja2.Environment(loader=jinja2.PackageLoader("fireact_utils", "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)
    return env.get_template(PAGE).render(
        title=title, subtitle=subtitle, notes=notes, fragment=fragment, bundle=_bundle(), table=datatable_html(table),
        n=len(table), episodes=episodes, labels={n: (labels or {}).get(n) or condition_label(n) for n in episodes},
        questions=list(by_question.values()), training=training, made=time.strftime("%Y-%m-%d %H:%M"))


def write(run_dir: str | Path, out: str | Path | None = None, ids=None, conditions=None) -> Path:
    """`<run_dir>/browser.html` (or `out`): every episode of the run, or those of `ids`/`conditions`."""
    run_dir = Path(run_dir)
    if not (run_dir / "eval").is_dir():
        raise FileNotFoundError(f"{run_dir} has no eval/ folder (a run directory, e.g. outputs/runs/cpu)")
    page = render(run_conditions(run_dir), f"Episodes of {run_dir.name}", str(run_dir), training_view(run_dir),
                  ids=ids, conditions=conditions)
    return atomic_write_text(out or run_dir / PAGE, page)


def write_comparison(run_a: str | Path, run_b: str | Path, table: pd.DataFrame, out: str | Path) -> Path:
    """The questions that flipped between two runs (`failures.compare_runs`' `table`), each condition
    of both runs side by side: conditions named `a:<name>` and `b:<name>`, by id in the question view."""
    from .tables import condition_label

    runs = {"a": run_conditions(run_a), "b": run_conditions(run_b)}
    conds, labels = {}, {}
    for _, row in table.iterrows():
        flipped = set(row["right_to_wrong"]) | set(row["wrong_to_right"])
        for side, saved in runs.items():
            name = f"{side}:{row['condition']}"
            conds[name] = [r for r in saved[row["condition"]] if r["id"] in flipped]
            labels[name] = f"{side}: {condition_label(row['condition'])}"
    return atomic_write_text(out, render({k: v for k, v in conds.items() if v}, "Questions that flipped",
                                         f"a = {run_a}, b = {run_b}", labels=labels))


def show(run_dir: str | Path, ids=None, conditions=None, **where):
    """The browser of a run inside a notebook (an IPython HTML object; episodes, not the training data),
    kept by the filters of `select`: `show(run, condition="finetuned_react", correct=False)`."""
    from IPython.display import HTML

    run_dir = Path(run_dir)
    return HTML(render(run_conditions(run_dir), f"Episodes of {run_dir.name}", str(run_dir), fragment=True,
                       ids=ids, conditions=conditions, **where))
