"""The reference study at a glance: the bundles committed under results/<study>/ rebuilt into that
study's tables and figures with no model, and the docs' result tables written from them.

    python -m fireact_utils report results/                  # tables, figures: outputs/results/<study>/
    python -m fireact_utils report results/ --docs           # and rewrite the docs' marked tables
    python -m fireact_utils report results/ --docs --check   # exit 1 where a committed page differs

A study whose pieces are all in is merged and reported as one process would (`pieces.merge`); one
with pieces missing gets a table per task of the conditions its bundles hold, every row from their
episodes, and the list of what is missing. A page marks a generated table with
`<!-- results: BLOCK -->` ... `<!-- /results -->` (BLOCK: `<study>/pieces` or `<study>/<table>`,
a file under the rebuilt run's tables/); everything between the marks is rewritten, so a number
there is always one a bundle backs.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import keys, pieces
from .config import REPO_ROOT, Params, override

RESULTS = REPO_ROOT / "results"
PAGES = ("README.md", "docs/*.md")
MARK = re.compile(r"(<!-- results: (?P<name>[\w./-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


@dataclass
class Study:
    """One rebuilt study: where its run dir is, its bundles' records, the pieces still missing."""

    name: str
    run_dir: Path
    records: list[dict]
    missing: list[str]
    tables: dict[str, str] = field(default_factory=dict)  # table name -> markdown


def study_params(bundles: list[Path], out_root: Path) -> Params:
    """The study's params as its first bundle recorded them (`merge` checks the others share its
    key), writing under out_root."""
    record, _ = pieces.read_bundle(bundles[0])
    p = Params.model_validate(record["params"])
    return override(p, {"output_root": str(out_root)}, f"{bundles[0]}")


def rebuild(results: str | Path = RESULTS, out: str | Path = REPO_ROOT / "outputs" / "results") -> list[Study]:
    """Every study under `results` (a folder of bundles each) rebuilt under out/<study>/ from scratch."""
    studies = []
    for folder in sorted(d for d in Path(results).iterdir() if d.is_dir()):
        bundles = sorted(folder.glob("*.tar.gz"))
        if not bundles:
            continue
        root = Path(out) / folder.name
        shutil.rmtree(root, ignore_errors=True)  # derived: rebuilt whole, never mixed with an older rebuild
        p = study_params(bundles, root)
        records = [pieces.read_bundle(b)[0] for b in bundles]
        # the bundles' own key: this machine may resolve the autos (device, dtype) otherwise
        run_dir = pieces.merge(p, bundles, run=False, want=records[0]["study_key"])
        study = records[0].get("study")
        done = {r["piece"] for r in records if not r.get("partial")}
        missing = [x.name for x in pieces.pieces(p, study) if x.name not in done]
        with keys.saved_only():  # from the bundles alone: no model, and no data (a fresh clone has none)
            if missing:
                partial_report(p)
            else:
                pieces.report(p, study)
        tables = {f.stem: f.read_text() for f in sorted((run_dir / "tables").glob("*.md"))}
        studies.append(Study(folder.name, run_dir, records, missing, tables))
    return studies


def partial_report(p: Params) -> None:
    """Tables of the conditions a partly merged study holds, one a task and split (the study's own
    task first, as tables/main), each row from the bundles' episodes (under `keys.saved_only`)."""
    from . import self_consistency
    from .evaluate import write_table
    from .failures import run_conditions
    from .provenance import condition_meta
    from .tables import condition_table, task_slug

    groups: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for name, recs in run_conditions(p.run_dir).items():
        m = condition_meta(p, name)
        groups.setdefault((m.get("task", "?"), m.get("split", "?")), {})[name] = recs
    for (task, split), conds in groups.items():
        main = task == p.evaluate.task and split == p.evaluate.split
        write_table(condition_table(p, conds), p.run_dir / "tables" / ("main" if main else f"{task_slug(task)}_{split}"))
    fewshot = override(p, {"study.sc_agents": ["fewshot"]}, "the few-shot agent's vote alone")
    # its samples are one piece: where they are in, its curve is whole
    if "fewshot" in p.study.sc_agents and self_consistency.saved_samples(fewshot, "fewshot", p.model):
        self_consistency.report(fewshot, None, progress=False)


def pieces_table(study: Study) -> str:
    """Markdown: each piece of the study, the machine and commit that ran it, minutes; missing ones."""
    lines = ["| piece | machine | commit | minutes | bundled |", "|---|---|---|---|---|"]
    for r in sorted(study.records, key=lambda r: r["piece"]):
        runs = [*r.get("earlier", []), r]
        machines = " + ".join(dict.fromkeys(str(x.get("machine", "?")) for x in runs))
        lines.append(f"| {r['piece']}{' (partial: cut short, resumes)' if r.get('partial') else ''} | {machines} | "
                     f"{r.get('commit', '?')[:12]} | {r.get('seconds', 0) / 60:.0f} | {str(r.get('time', '?'))[:10]} |")
    bundled = {r["piece"] for r in study.records}
    lines += [f"| {m} | not run yet | | | |" for m in study.missing if m not in bundled]
    return "\n".join(lines) + "\n"


def blocks(studies: list[Study]) -> dict[str, str]:
    """Every block a page may mark: <study>/pieces and <study>/<table>."""
    out = {}
    for s in studies:
        out[f"{s.name}/pieces"] = pieces_table(s)
        out.update({f"{s.name}/{t}": md if md.endswith("\n") else md + "\n" for t, md in s.tables.items()})
    return out


def pages(root: Path = REPO_ROOT) -> list[Path]:
    return sorted(f for pattern in PAGES for f in root.glob(pattern))


def write_docs(found: dict[str, str], files: list[Path], check: bool = False) -> list[Path]:
    """Rewrite each marked block of `files` from `found`; returns the files that differed (with
    `check`, nothing is written). A mark naming no block is a one-line error."""
    changed = []
    for f in files:
        text = f.read_text()

        def fill(m: re.Match, f: Path = f) -> str:
            if m["name"] not in found:
                raise ValueError(f"{f}: results block {m['name']!r} is in no bundle under results/ "
                                 f"(blocks: {', '.join(sorted(found)) or 'none'})")
            return m.group(1) + found[m["name"]] + m.group(4)

        new = MARK.sub(fill, text)
        if new != text:
            changed.append(f)
            if not check:
                f.write_text(new)
    return changed
