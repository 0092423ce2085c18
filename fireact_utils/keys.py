"""One reuse rule for every stage: an output is reused only under the key of what made it.

A stage's key is the hash of everything that changes its numbers: the settings it reads (every
`auto` resolved: dtype, bf16, decoder, device kind), the content of its input data and the
fingerprint of its model's weights. Paths, ports, batch sizes, logging cadence and library
versions stay out (`NOT_IN_KEY`; provenance records them). The rule, as DVC and Snakemake apply it:

    now = keys.make("finetune", {**keys.train_settings(p), "data": keys.data_hash(records)})
    if keys.reuse(out / keys.KEY_FILE, now, clear=[out]):   # same key: reuse
        ...
    # nothing saved, or cleared under --redo: compute, then keys.write(out / keys.KEY_FILE, now)

A saved output under another key is refused with one line naming the settings that differ
(`StaleOutputError`); `--redo` (`FIREACT_REDO=1`, inherited by the notebook kernels) deletes it
and recomputes. A setting whose value cannot be known here (a model whose weights are elsewhere)
is None and is not compared: a merged bundle's episodes are reused without their weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .io import atomic_write_json, read_json

if TYPE_CHECKING:
    from .config import AgentParams, ModelParams, Params, SearchParams, TrainParams

KEY_FILE = "key.json"
REDO_ENV = "FIREACT_REDO"

# Settings that change no number of any stage (provenance records them): where the run lives, how
# fast it goes, how often it logs. agent.batch_size and llm.concurrency only reorder float sums
# (tests/test_resume.py); train.labelled_positions_only gives the same loss and gradients
# (tests/test_train.py); keep_freed_memory is the allocator's.
NOT_IN_KEY = frozenset({
    "name", "output_root", "data_dir", "multihop_dir",
    "model.cache_dir", "model.vllm_port", "model.vllm_args", "model.vllm_gpu_memory_utilization",
    "agent.batch_size",
    "llm.concurrency", "llm.max_retries", "llm.retry_budget_s", "llm.timeout_s",
    "llm.price_per_1k_prompt", "llm.price_per_1k_completion", "llm.api_key_env",
    "generate.teacher.concurrency", "generate.teacher.max_retries", "generate.teacher.retry_budget_s",
    "generate.teacher.timeout_s", "generate.teacher.price_per_1k_prompt",
    "generate.teacher.price_per_1k_completion", "generate.teacher.api_key_env",
    "search.cache_path",
    "train.logging_steps", "train.save_steps", "train.report_to", "train.keep_freed_memory",
    "train.labelled_positions_only",
    "rl.save_steps",
})


class StaleOutputError(ValueError):
    """A saved output was made under another key; the message names the settings that differ."""


# ---------------------------------------------------------------- the rule

def make(stage: str, settings: Mapping[str, Any]) -> dict:
    """A key record: the stage, its settings (dotted name -> JSON value) and their hash."""
    settings = {k: settings[k] for k in sorted(settings)}
    blob = json.dumps([stage, settings], sort_keys=True, default=str)
    return {"stage": stage, "key": hashlib.sha256(blob.encode()).hexdigest()[:16], "settings": settings}


def differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """'name old -> new' for each setting that differs; a None on either side (unknown there) is
    not compared. A setting one side lacks was added to the schema after that side was made: it was
    made under that setting's default (`schema_defaults`), so new settings at their defaults keep
    old outputs (and bundles) valid; any other setting only one side has counts as a difference."""
    out = []
    defaults = schema_defaults()
    for k in sorted(set(saved) | set(now)):
        a = saved[k] if k in saved else defaults.get(k, "(absent)")
        b = now[k] if k in now else defaults.get(k, "(absent)")
        if a is None or b is None or a == b:
            continue
        out.append(f"{k} {_short(a)} -> {_short(b)}")
    return out


@functools.cache
def schema_defaults() -> dict[str, Any]:
    """Every setting's default in today's schema (dotted name -> JSON value)."""
    from .config import Params

    return flat(Params())


def _short(v: Any) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."


def check(saved: dict | None, now: dict, where: str | Path) -> None:
    """Raise StaleOutputError unless `saved` (a key record, or None for an output older than keys)
    holds the settings of `now`."""
    if saved is None:
        raise StaleOutputError(f"{where} was made before outputs carried keys: rerun with --redo, or pick a new "
                               "run name")
    if saved.get("stage") != now["stage"]:
        raise StaleOutputError(f"{where} is a {saved.get('stage')!r} output, not {now['stage']!r}")
    if diff := differences(saved.get("settings", {}), now["settings"]):
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise StaleOutputError(f"{where} was made with other settings ({shown}): rerun with --redo to "
                               "recompute it, or pick a new run name")


_SAVED_ONLY: ContextVar[bool] = ContextVar("saved_only", default=False)


@contextmanager
def saved_only() -> Iterator[None]:
    """Inside, no model is loaded, trained or fingerprinted and no data is read: every stage must find
    its output saved (a merge of bundles, whose weights stayed on the machines that made them, on a
    clone that may hold no data: tasks are what the saved episodes show, `pipeline.run_task`)."""
    token = _SAVED_ONLY.set(True)
    try:
        yield
    finally:
        _SAVED_ONLY.reset(token)


def is_saved_only() -> bool:
    return _SAVED_ONLY.get()


def redo_requested() -> bool:
    return os.environ.get(REDO_ENV, "") not in ("", "0")


def clear(paths: Iterable[Path]) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


_READ = object()


def reuse(key_file: Path, now: dict, clear_paths: Iterable[Path] = (), exists: bool | None = None,
          saved: Any = _READ, where: str | Path | None = None) -> bool:
    """Whether the output that `key_file` describes can be reused under `now`.

    True: its key holds `now`'s settings. False: nothing is saved (`exists` false; default: the
    key file exists), or it was stale and `--redo` deleted `clear_paths`. A stale output without
    --redo raises StaleOutputError naming the differences. `saved` is the saved key record where it
    is kept inside another file (a condition's meta; None: that file predates keys); `where` names
    the output in the error (default: the key file's folder)."""
    exists = key_file.is_file() if exists is None else exists
    if not exists:
        return False
    try:
        check(read_key(key_file) if saved is _READ else saved, now, where or key_file.parent)
    except StaleOutputError:
        if not redo_requested():
            raise
        clear([*clear_paths, key_file])
        return False
    return True


def read_key(key_file: Path) -> dict | None:
    return read_json(key_file) if key_file.is_file() else None


def write(key_file: Path, now: dict) -> None:
    atomic_write_json(key_file, now)


# ---------------------------------------------------------------- what stages read

def flat(p: Any, prefix: str = "") -> dict[str, Any]:
    """section.key -> JSON value of a params model (sections opened), without `NOT_IN_KEY`."""
    from .config import _flat

    dumped = {f"{prefix}{k}": v for k, v in _flat(p).items()}
    return {k: json.loads(json.dumps(v, default=str)) for k, v in dumped.items() if k not in NOT_IN_KEY}


def device_kind(mp: ModelParams) -> str:
    """cpu or cuda: the card's index changes no number."""
    from .models import pick_device

    return pick_device(mp.device).split(":")[0]


def model_settings(mp: ModelParams, decoder: bool = True) -> dict[str, Any]:
    """How a model decodes, `auto`s resolved: device kind, dtype and (for evaluation) decoder."""
    from .models import pick_device, pick_dtype

    out = {"model.device": device_kind(mp),
           "model.dtype": str(pick_dtype(mp.dtype, pick_device(mp.device))).removeprefix("torch.")}
    if decoder:
        from .llm import pick_decoder

        out["model.decoder"] = pick_decoder(mp)
    return out


def train_settings(tp: TrainParams, mp: ModelParams) -> dict[str, Any]:
    """A fine-tune's settings: train.* with bf16, gradient checkpointing and padding-free resolved
    on this device, and the base model's weights (`weights_fingerprint`)."""
    from .models import pick_device
    from .train import use_bf16, use_padding_free

    device = pick_device(mp.device)
    out = flat(tp, "train.")
    out["train.bf16"] = use_bf16(tp, device)
    out["train.padding_free"] = use_padding_free(tp, device)
    if tp.gradient_checkpointing == "auto":
        out["train.gradient_checkpointing"] = device.startswith("cuda")
    out["model.device"] = device_kind(mp)
    out["model.weights"] = weights_fingerprint(mp)
    return out


def weights_fingerprint(mp: ModelParams) -> str | None:
    """The fingerprint of `mp`'s weights (base + adapter), None where they are not on this machine
    (or not asked for: `saved_only`)."""
    from .models import ModelSpecError, model_id

    if is_saved_only():
        return None
    try:
        return model_id(mp.name, mp.adapter, mp.cache_dir).fingerprint
    except ModelSpecError:
        return None


def agent_settings(agent: AgentParams) -> dict[str, Any]:
    return flat(agent, "agent.")


def search_settings(sp: SearchParams) -> dict[str, Any]:
    return flat(sp, "search.")


def data_hash(records: Iterable[Mapping[str, Any]]) -> str:
    """Content hash of records, independent of their order."""
    lines = sorted(json.dumps(r, sort_keys=True, default=str) for r in records)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def text_hash(text: str | None) -> str:
    """A text's hash; "none" for no text (None in a key means unknown, not absent)."""
    return "none" if text is None else hashlib.sha256(text.encode()).hexdigest()[:16]


def file_hash(path: str | Path) -> str:
    """sha256 (16 hex) of a file, computed once per process while its size and mtime stay."""
    st = Path(path).stat()
    return _file_hash(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=512)
def _file_hash(path: str, _size: int, _mtime: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def run_settings(p: Params) -> dict[str, Any]:
    """A whole run's settings (a notebook of the chain reads them all): every params value but
    `NOT_IN_KEY`, with the model's autos resolved."""
    return {**flat(p), **model_settings(p.model, decoder=False)}
