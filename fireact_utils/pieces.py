"""A study in pieces: each runs on any machine, in any order, and leaves a portable bundle; `merge`
builds the study's tables and figures from the bundles as one process would.

    python -m fireact_utils pieces params/headline.yaml                    # the pieces, one a line
    python -m fireact_utils piece params/headline.yaml seed-1              # run one, write its bundle
                                              # (outputs/runs/pieces/seed-1/headline-seed-1.tar.gz)
    python -m fireact_utils merge params/headline.yaml results/headline/*.tar.gz
    python -m fireact_utils pieces params/headline.yaml --submit local     # all, through submitit
    python -m fireact_utils piece params/headline.yaml seed-1 --minutes 85  # stopped at 85 min, bundled partial:
                                              # the same command later goes on from there

A piece is self-contained: it trains every model it evaluates and runs every evaluation of that
model, since weights do not travel (a retrain on another CPU gives other weights). It runs under the
study's run name in its own output root (outputs/runs/pieces/<piece>/), so its conditions carry the
names one process would give them, and the pieces of a study write disjoint conditions. Its bundle
holds episodes, records, keys and provenance (machine, commit, library versions), never weights.
`merge` refuses bundles of other settings (the study key) or another pre-registration, a piece
given twice and a file two bundles hold with different content; then it runs the study's report
with no model and no data (`keys.saved_only`): every number comes from the bundles' episodes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import keys
from .config import REPO_ROOT, Params, override
from .io import atomic_write_json

BUNDLE = "bundle.json"
CUT = 3  # the exit code of `piece --minutes` when the deadline stopped it: a partial bundle, not a failure
# What a bundle leaves out: weights, optimizer states and checkpoints (they do not travel), the
# dataset's derived copies (rebuilt from trajectories.jsonl), executed notebooks.
EXCLUDE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".arrow", ".ipynb", ".html")
EXCLUDE_PARTS = ("checkpoint-", "hf", "notebooks", "student", "policy")
PER_PIECE = ("provenance", "params.json", BUNDLE)  # differ between pieces by nature: kept under pieces/<piece>/


@dataclass(frozen=True)
class Piece:
    name: str
    what: str  # one line: what it trains and evaluates
    run: Callable[[Params], None]


# ---------------------------------------------------------------- the studies' pieces

def headline_pieces(p: Params) -> list[Piece]:
    """The headline (`headline.report`): the base model's greedy evaluations, its sampled ones (a
    piece of their own: 90 min on the slowest VM holds one or the other), then one per training
    seed, each training its model and running all of its evaluations."""
    from . import headline

    seeds = p.study.seeds or [p.train.seed]
    votes = [Piece("fewshot-votes", "the few-shot agent's self-consistency samples", headline.run_fewshot_votes)]
    return [Piece("baselines", "few-shot baselines and their transfer rows", headline.run_baselines),
            *(votes if p.study.sc_ks and "fewshot" in p.study.sc_agents else []),
            *[Piece(f"seed-{s}", f"fine-tune seed {s}; its dev, transfer and self-consistency evaluations",
                    lambda q, s=s: headline.run_seed(q, s)) for s in seeds]]


def base_model_pieces(p: Params) -> list[Piece]:
    """The base-model axis: per model, its few-shot agent in one piece and each recipe in one (a
    fine-tune scored on the selection split and on the evaluation sets): a piece holds one fine-tune,
    and none waits for another's choice (`base_models.run_recipe`)."""
    from . import base_models

    out = []
    for m in p.study.base_models:
        slug = base_models.model_slug(m)
        out.append(Piece(f"model-{slug}-fewshot", f"{m}: few-shot ReAct on every evaluation set",
                         lambda q, m=m: base_models.run_fewshot(q, m)))
        out += [Piece(f"model-{slug}-{label}", f"{m}: recipe {label} fine-tuned; validation and evaluation sets",
                      lambda q, m=m, label=label: base_models.run_recipe(q, m, label)) for label in p.study.recipes]
    return out


def select_pieces(p: Params) -> list[Piece]:
    """The choices on validation (`select`): the few-shot prompts in one piece (one model, no
    training), each recipe of study.recipes in one (its fine-tune, scored on the selection split)."""
    from . import recipes

    prompts = [Piece("fewshot-variants", "every few-shot prompt of study.fewshot_variants on the selection split",
                     recipes.fewshot_search)] if p.study.fewshot_variants else []
    return [*prompts, *[Piece(f"recipe-{label}", f"recipe {label} fine-tuned, scored on the selection split",
                              lambda q, label=label: recipes.recipe_search(q, only=[label]))
                        for label in p.study.recipes]]


def consistency_pieces(p: Params) -> list[Piece]:
    """The self-consistency curve (`consistency`): the few-shot agent's samples in one piece, and each
    fine-tuned agent voted (`self_consistency.finetuned_samplers`) trained and sampled in one."""
    from . import headline, self_consistency

    out = [Piece("fewshot-votes", "the few-shot agent's self-consistency samples", headline.run_fewshot_votes)
           ] if "fewshot" in p.study.sc_agents else []
    if "finetuned" in p.study.sc_agents:
        out += [Piece(f"votes-{who}", f"fine-tune {'the main recipe' if seed is None else f'seed {seed}'}; its samples",
                      lambda q, who=who, seed=seed: self_consistency.run_votes(q, who, seed))
                for who, seed in self_consistency.finetuned_samplers(p).items()]
    return out


def _report_consistency(p: Params) -> None:
    from . import pipeline, self_consistency

    self_consistency.report(p, pipeline.finetune(p) if "finetuned" in p.study.sc_agents else None, progress=False)


def _report_headline(p: Params) -> None:
    from . import headline

    headline.report(p, progress=False)


def _report_base_models(p: Params) -> None:
    from . import base_models

    base_models.report(p, progress=False)


def _report_select(p: Params) -> None:
    from . import recipes

    recipes.selections(p, progress=False)


# study -> (its pieces, its report: the tables and figures from what the run dir holds)
STUDIES: dict[str, tuple[Callable[[Params], list[Piece]], Callable[[Params], None]]] = {
    "headline": (headline_pieces, _report_headline),
    "base-models": (base_model_pieces, _report_base_models),
    "select": (select_pieces, _report_select),
    "consistency": (consistency_pieces, _report_consistency),
}


def study_of(p: Params, study: str | None = None) -> str:
    """Which study: `study` where given, else base-models where p names models, else the headline."""
    if study is not None and study not in STUDIES:
        raise ValueError(f"no study {study!r}: studies are {', '.join(STUDIES)}")
    return study or ("base-models" if p.study.base_models else "headline")


def pieces(p: Params, study: str | None = None) -> list[Piece]:
    return STUDIES[study_of(p, study)][0](p)


def piece_named(p: Params, name: str, study: str | None = None) -> Piece:
    found = {x.name: x for x in pieces(p, study)}
    if name not in found:
        raise ValueError(f"no piece {name!r} in {study_of(p, study)} of {p.name}: pieces are {', '.join(found)}")
    return found[name]


def study_key(p: Params) -> dict:
    """The key every piece and bundle of one study shares: all of the run's settings, autos
    resolved, except where its outputs go."""
    return keys.make("study", keys.run_settings(p))


# ---------------------------------------------------------------- one piece

def piece_params(p: Params, name: str, root: str | Path | None = None) -> Params:
    """`p` with its output root moved to <root>/<piece> (default root: <output_root>/pieces): the same
    run name, a folder of its own."""
    base = Path(root) if root else p.run_dir.parent / "pieces"
    return override(p, {"output_root": str(base / name)}, f"piece {name}")


def run_piece(p: Params, name: str, root: str | Path | None = None, bundle_dir: str | Path | None = None,
              study: str | None = None, partial: bool = False, spent: float = 0.0) -> Path:
    """Run piece `name` of `p`'s study (`study_of`) in its own output root (resuming), then write its
    bundle (default: beside the run dir). Returns the bundle's path.

    A piece cut short leaves what it saved; `partial` runs nothing and bundles that
    (<run>-<piece>.partial.tar.gz, counting `spent` seconds the cut run took), and a later run of the
    piece anywhere, given the same bundle dir, starts from it: each stage reuses what the partial
    bundle holds under its key. A fine-tune's weights never travel: the later run trains its model
    again, and the saved evaluations of that model count only where the retrain gives the same
    weights (the same kind of machine: `tests/test_pieces.py`), else their key names the weights."""
    piece = piece_named(p, name, study)
    q = piece_params(p, name, root)
    out_dir = Path(bundle_dir or q.run_dir.parent)
    earlier = resume_partial(q, out_dir / f"{q.name}-{name}.partial.tar.gz")
    t0 = time.time() - spent
    if not partial:
        piece.run(q)
    out = write_bundle(q, name, time.time() - t0, out_dir, study_of(p, study), partial=partial, earlier=earlier)
    if not partial:
        (out_dir / f"{q.name}-{name}.partial.tar.gz").unlink(missing_ok=True)
    return out


def run_piece_within(params_file: str | Path, overrides: list[str], name: str, minutes: float,
                     root: str | Path | None = None, bundle_dir: str | Path | None = None,
                     study: str | None = None) -> tuple[Path, bool]:
    """Run piece `name` as the CLI's `piece` in a child process, stopped at `minutes`, so that a slot
    of fixed length (a 3-hour session, a preemptible job) holds it whatever the machine. A child that
    finishes writes the piece's bundle; one the deadline stops is bundled here as partial, with the
    minutes it ran, and the same command later (any machine, the same bundle dir) goes on from it.
    Returns (bundle, finished)."""
    from .config import load_params

    p = load_params(params_file, overrides)
    q = piece_params(p, name, root)
    out_dir = Path(bundle_dir or q.run_dir.parent)
    argv = [sys.executable, "-m", "fireact_utils", "piece", str(params_file), name, *overrides,
            "--bundle-dir", str(out_dir), *(["--root", str(root)] if root else []),
            *(["--study", study] if study else [])]
    t0 = time.time()
    # its own process group, so the deadline stops the piece and whatever it started (its vLLM server
    # dies with it: serving's PDEATHSIG)
    child = subprocess.Popen(argv, start_new_session=True)
    try:
        rc = child.wait(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        if child.poll() is None:  # the deadline, or this process interrupted: never leave the piece running
            _stop_group(child)
    if rc == 0:
        return out_dir / f"{q.name}-{name}.tar.gz", True
    if rc is not None:
        raise ValueError(f"piece {name} failed (exit code {rc}, its error above); what it saved stays in "
                         f"{q.run_dir}, and `piece ... --partial` bundles it")
    return run_piece(p, name, root, out_dir, study, partial=True, spent=time.time() - t0), False


def _stop_group(child: subprocess.Popen) -> None:
    """SIGTERM to the child's process group, SIGKILL after a minute."""
    for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(child.pid, sig)
            child.wait(timeout=wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def resume_partial(q: Params, bundle: Path) -> list[dict]:
    """Unpack a piece's partial bundle into its run dir where that holds nothing of it yet; returns
    the runs that bundle records (machine, commit, seconds), to be carried into the next bundle."""
    if not bundle.is_file():
        return []
    record, files = read_bundle(bundle)
    if not (q.run_dir / BUNDLE).is_file() and not (q.run_dir / "eval").is_dir():
        for name, data in files.items():
            if name != BUNDLE:
                (q.run_dir / name).parent.mkdir(parents=True, exist_ok=True)
                (q.run_dir / name).write_bytes(data)
    return [*record.get("earlier", []), {k: record.get(k) for k in ("machine", "commit", "seconds", "time")}]


def bundled(rel: Path) -> bool:
    """Whether a run dir's file goes into a bundle (`EXCLUDE_*`: no weights, no derived copies)."""
    return not (rel.suffix in EXCLUDE_SUFFIXES or any(part.startswith(EXCLUDE_PARTS) for part in rel.parts[:-1])
                or rel.name.startswith(("optimizer", "scheduler", "rng_state", "training_args")))


def write_bundle(q: Params, name: str, seconds: float, out_dir: str | Path, study: str | None = None,
                 partial: bool = False, earlier: list[dict] | None = None) -> Path:
    """<out_dir>/<run>-<piece>.tar.gz (`partial`: .partial.tar.gz): the piece's run dir without
    weights, and bundle.json (study key, piece, machine, commit, library versions, seconds; the
    earlier partial runs it resumed, `earlier`, and their seconds added in)."""
    from .provenance import provenance

    run = q.run_dir
    earlier = earlier or []
    seconds += sum(e.get("seconds") or 0 for e in earlier)
    record = {"study": study_of(q, study), "piece": name, "run": q.name, "study_key": study_key(q), "seconds": seconds,
              "partial": partial, "earlier": earlier,
              "commit": git_commit(), **{k: v for k, v in provenance(q).items() if k != "params"},
              "params": q.dump()}
    atomic_write_json(run / BUNDLE, record)
    out = Path(out_dir) / f"{q.name}-{name}{'.partial' if partial else ''}.tar.gz"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.partial")
    with tarfile.open(tmp, "w:gz") as tar:
        for f in sorted(run.rglob("*")):
            if f.is_file() and bundled(rel := f.relative_to(run)):
                tar.add(f, arcname=str(rel))
    tmp.replace(out)
    return out


def git_commit() -> str:
    """The kit's commit (with '+changes' where the tree differs from it), or 'unknown' outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return git("rev-parse", "HEAD") + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------- merge

def read_bundle(path: str | Path) -> tuple[dict, dict[str, bytes]]:
    """(bundle.json, path -> bytes) of a bundle; a file that is no bundle is a one-line error."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    except (OSError, tarfile.TarError, EOFError) as e:
        raise ValueError(f"{path}: not a readable bundle ({e})") from None
    if BUNDLE not in files:
        raise ValueError(f"{path}: not a bundle (no {BUNDLE})")
    if any(Path(n).is_absolute() or ".." in Path(n).parts for n in files):
        raise ValueError(f"{path}: a member's path leaves the bundle")
    return json.loads(files[BUNDLE]), files


def merge(p: Params, bundles: list[str | Path], run: bool = True, want: dict | None = None) -> Path:
    """Unpack `bundles` into p's run dir (which must hold no other run's files), checking that they are
    pieces of p's study under its settings (`want`: the study key; default p's on this machine), each
    piece once, no file held twice with other content; then (with `run`) build the study's tables and
    figures from their episodes alone (the study the bundles name: one for all)."""
    want = want or study_key(p)
    seen: dict[str, str] = {}
    studies: set[str] = set()
    partial: list[str] = []
    merged: dict[str, tuple[bytes, str]] = {}
    registrations: dict[str, dict] = {}
    for b in bundles:
        record, files = read_bundle(b)
        where = f"{b} (piece {record.get('piece')})"
        made = record.get("study_key", {})
        diff = keys.differences(made.get("settings", {}), want["settings"])  # not the hash: see keys.differences
        if made.get("stage") != want["stage"] or diff:
            raise ValueError(f"{where} was made with other settings ({'; '.join(diff[:4]) or 'another study'}): "
                             "merge pieces of one study only")
        if record["piece"] in seen:
            raise ValueError(f"piece {record['piece']} given twice: {seen[record['piece']]} and {b}")
        seen[record["piece"]] = str(b)
        if record.get("partial"):
            partial.append(record["piece"])
        studies.add(record.get("study", "headline"))
        for name, data in files.items():
            if name.split("/")[0] in PER_PIECE:
                merged[f"pieces/{record['piece']}/{name}"] = (data, str(b))
            elif name == "preregistration.json":
                registrations[str(b)] = json.loads(data)["settings"]
                merged.setdefault(name, (data, str(b)))
            elif name in merged and merged[name][0] != data:
                raise ValueError(f"{name} differs between {merged[name][1]} and {b}: two pieces made one output")
            else:
                merged[name] = (data, str(b))
    first = next(iter(registrations.values()), {})
    if any(keys.differences(first, r) for r in registrations.values()):
        raise ValueError(f"the bundles were run under different pre-registrations: {', '.join(registrations)}")
    if len(studies) > 1:
        raise ValueError(f"the bundles are pieces of different studies ({', '.join(sorted(studies))}): merge one at a time")
    study = studies.pop() if studies else None
    missing = [x.name for x in pieces(p, study) if x.name not in seen or x.name in partial]
    out = p.run_dir
    if out.exists() and any(out.iterdir()) and not (out / "pieces").is_dir():
        raise ValueError(f"{out} holds a run of its own: merge into another output_root or run name")
    for name, (data, _) in merged.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    atomic_write_json(out / "merged.json", {"bundles": {k: v for k, v in seen.items()}, "missing": missing})
    if run and missing:
        cut = f"; {', '.join(partial)} only partly run (a run of the piece resumes from its partial bundle)" if partial else ""
        raise ValueError(f"merged {len(seen)} pieces into {out}; missing: {', '.join(missing)}{cut} (run them with "
                         f"`python -m fireact_utils piece ... NAME`, then merge all)")
    if run:
        with keys.saved_only():
            report(p, study)
    return out


def report(p: Params, study: str | None = None) -> None:
    """The study's tables and figures from what the run dir holds (after a merge: the bundles)."""
    STUDIES[study_of(p, study)][1](p)


def bundle_summary(path: str | Path) -> str:
    """One line about a bundle: piece, machine, commit, minutes."""
    record, _ = read_bundle(path)
    return (f"{record['piece']}: {record.get('machine')} at {record.get('commit', '?')[:12]}, "
            f"{record.get('seconds', 0) / 60:.1f} min, {record.get('time')}")


# ---------------------------------------------------------------- many machines

def submit(params_file: str, overrides: list[str], names: list[str], folder: str | Path, cluster: str | None = None,
           slurm: dict | None = None, study: str | None = None) -> list:
    """Dispatch pieces with submitit: a SLURM job array where a cluster is there (`cluster`: None
    auto-detects), or local processes (`cluster="local"`, the cores shared out among them: two
    processes of two torch threads each on 2 cores run several times slower than one at a time).
    Each job runs `piece` and returns its bundle's path; returns the jobs (`job.result()` waits)."""
    import submitit

    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    executor.update_parameters(timeout_min=120, **(slurm or {}))
    threads = max(1, (os.cpu_count() or 1) // len(names)) if executor.cluster == "local" else 0
    n = len(names)
    return executor.map_array(_piece_job, [params_file] * n, [list(overrides)] * n, names, [threads] * n, [study] * n)


def _piece_job(params_file: str, overrides: list[str], name: str, threads: int = 0, study: str | None = None) -> str:
    """One piece in a job: its bundle's path. `threads` > 0 caps torch's threads."""
    from .config import load_params

    if threads:
        import torch

        torch.set_num_threads(threads)
    return str(run_piece(load_params(params_file, overrides), name, study=study))
