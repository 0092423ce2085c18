"""How each artifact was made: a stage's provenance record, and what a condition's meta says
about its run (model, agent settings, machine, tool counts, edits by hand).

A condition resumes only with the model and agent settings its meta records, so one name never
mixes two runs; tables read the machine and hand-edit notes to mark numbers that need them.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .io import atomic_write_json, read_json
from .models import ModelId, model_id

if TYPE_CHECKING:
    from .config import AgentParams, Params, SearchParams


def provenance(p: Params) -> dict:
    import torch
    import transformers

    from . import __version__

    return {"params": p.dump(), "fireact_utils": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": machine_label(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def save_provenance(p: Params, stage: str) -> None:
    atomic_write_json(p.run_dir / "provenance" / f"{stage}.json", provenance(p))


def machine_label() -> str:
    """Where this process computes: the GPU's name, else the CPU's model and core count ('AMD EPYC
    x2': two 2-core VMs of different CPUs train to different weights and differ in speed)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "cpu"
    return f"{cpu} x{os.cpu_count()}"


def llm_model(llm) -> tuple[ModelId | None, str | None]:
    """(model, dtype) of `llm` for a condition's meta. A local backend (it carries its
    `model_params`) is fingerprinted; another (HTTP, a test's script) is its name alone. The
    dtype is recorded, not compared: like the batch size, it changes float roundings, not the model
    (`recipes.seed_model` decodes in bf16 what trained in fp32)."""
    from .models import pick_device, pick_dtype

    if getattr(llm, "saved_only", False):  # a merge's: the saved episodes' models are on other machines
        return None, None
    mp = getattr(llm, "model_params", None)
    if mp is None:
        return ModelId(llm.name), None
    dtype = str(pick_dtype(mp.dtype, pick_device(mp.device))).removeprefix("torch.")
    return model_id(mp.name, mp.adapter, mp.cache_dir), dtype


def condition_key(model: ModelId | None, dtype: str | None, decoder: str | None, agent: AgentParams,
                  search: SearchParams | None, task, fewshot: str | None, card: dict | None = None) -> dict:
    """A condition's key (`keys`): what its episodes are a function of. The model is its weights'
    fingerprint (a model with none, an endpoint or a test's script, its name; None: not known
    here, so not compared), the dtype it decodes in, and the decoder when it samples (greedy
    decoding gives the same episodes on vLLM and model.generate: tests/test_vllm.py); the agent's
    settings; the environment (search settings and the tool's card, or none); the task and split;
    the few-shot prompt. The questions are not in it: episodes are saved per question, so a
    condition extended to more questions reuses those it has."""
    from . import keys

    who = None if model is None else model.fingerprint or f"name:{model.spec}"
    env = {"search": "none"} if search is None else {**keys.search_settings(search), "search.card": card}
    return keys.make("condition", {
        "model": who, "model.dtype": dtype, "model.decoder": decoder if agent.temperature > 0 else "any",
        **keys.agent_settings(agent), **env, "task": task.name, "split": task.split,
        "fewshot": keys.text_hash(fewshot)})


def local_decoder(llm) -> str | None:
    """vllm or generate for a local backend; None for another (its name identifies it)."""
    from .llm import VLLMBackend

    return None if getattr(llm, "model_params", None) is None else "vllm" if isinstance(llm, VLLMBackend) else "generate"


def saved_model(meta: dict) -> ModelId | None:
    """The model a condition's meta records; None for a meta older than the record."""
    return ModelId(meta["model"], meta.get("model_fingerprint")) if meta.get("model") else None


def check_same_agent(saved: dict, agent: AgentParams, path: Path) -> None:
    """A condition continues only with the agent settings it began with (`saved`: its meta's), so
    one name never mixes two; the batch size, which only reorders float sums, may change."""
    now = agent.model_dump()
    differ = [k for k in now if k != "batch_size" and k in saved and saved[k] != now[k]]
    if differ:
        changes = ", ".join(f"agent.{k} {saved[k]!r} -> {now[k]!r}" for k in differ)
        raise ValueError(f"{path} was run with other agent settings ({changes}): "
                         "run it with its own, or pick a new run name")


def merge_tool_stats(old: dict | None, new: dict) -> dict:
    """Tool statistics of a resumed condition: counts summed; rates (fractions of calls) averaged
    with the calls as weights, so they cover every run, not only the last."""
    if not old:
        return dict(new)
    out = dict(new)
    calls_old, calls_new = old.get("calls", 0), new.get("calls", 0)
    for k, v in new.items():
        if k not in old or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if k.endswith("_rate") and k != "noise_rate":
            total = calls_old + calls_new
            out[k] = (old[k] * calls_old + v * calls_new) / total if total else 0.0
        elif isinstance(v, int) and k != "recorded_pairs":  # a size, not a count of calls
            out[k] = old[k] + v
    return out


def hand_edit(meta: dict) -> str | None:
    """A condition meta's note that a person edited it (`edited_by_hand`; older metas: `repaired`),
    so every table and figure showing its numbers can mark them."""
    note = meta.get("edited_by_hand") or meta.get("repaired")
    return None if not note else note if isinstance(note, str) else "meta repaired by hand"


def condition_meta(p: Params, name: str) -> dict:
    f = p.run_dir / "eval" / f"{name}.meta.json"
    return read_json(f) if f.is_file() else {}
