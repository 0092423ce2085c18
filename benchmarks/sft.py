"""Fine-tuning throughput: our SFT setup vs stock TRL and naive padded batches, side by side in one run.

    python benchmarks/sft.py                  # 64 FireAct HotpotQA trajectories, built-in model, full FT, 1 epoch
    python benchmarks/sft.py --method lora --n 16
    python benchmarks/sft.py --model gemma3-270m --n 16   # another model (alias, path or HF id)

"ours": length-grouped batches padded only to the batch's longest row (padding-free rows where
flash-attention exists), loss on the agent's tokens, the LM head projecting only the labelled
positions on the CPU (`train.labelled_positions_only`), big freed blocks kept in glibc's heap
(`train.keep_freed_memory`). "ours-mmap": ours with glibc's default allocator settings (a fresh
mmap, page-faulted anew, for every tensor over 32 MB). "trl": the same batches through stock
TRL, which projects every position on a CPU. "naive": FireAct's alpaca-lora recipe, every row
cut/padded to 512 tokens, random order. Each runs in its own process so peak RSS is its own.
Reported: non-pad tokens per second (the work that matters), the ratios, final loss.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def run_one(kind: str, n: int, method: str, out: str, model: str = "smollm2-135m") -> dict:
    from contextlib import ExitStack

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from fireact_utils.config import TrainParams
    from fireact_utils.data import load_fireact
    from fireact_utils.models import resolve_model
    from fireact_utils.train import (
        IGNORE,
        build_dataset,
        keep_freed_memory,
        labelled_positions_only,
        lora_config,
        make_sft_config,
    )

    path = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(path)
    recs = load_fireact("hotpotqa")[:n]
    p = TrainParams(method=method, epochs=1, batch_size=8, logging_steps=1, save_steps=10_000,
                    max_length=512, group_by_length=(kind != "naive"))
    ds = build_dataset(recs, tok, p)
    real_tokens = sum(len(x) for x in ds["input_ids"])
    if kind == "naive":
        pad = tok.pad_token_id or tok.eos_token_id
        ds = Dataset.from_list([{"input_ids": r["input_ids"] + [pad] * (512 - len(r["input_ids"])),
                                 "labels": r["labels"] + [IGNORE] * (512 - len(r["labels"]))} for r in ds])
    model = AutoModelForCausalLM.from_pretrained(path)
    trainer = SFTTrainer(model=model, args=make_sft_config(p, Path(out), "cpu"),
                         train_dataset=ds, processing_class=tok, peft_config=lora_config(p) if method == "lora" else None)
    t0 = time.time()
    with ExitStack() as stack:
        if kind.startswith("ours"):
            stack.enter_context(labelled_positions_only())
        if kind == "ours":
            stack.enter_context(keep_freed_memory())
        trainer.train()
    dt = time.time() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"kind": kind, "seconds": dt, "real_tokens": real_tokens, "tokens_per_s": real_tokens / dt,
            "final_loss": losses[-1], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


KINDS = ("ours", "ours-mmap", "trl", "naive")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--method", choices=["full", "lora"], default="full")
    ap.add_argument("--one", choices=KINDS)
    ap.add_argument("--out", default="/tmp/fireact_bench_sft")
    ap.add_argument("--model", default="smollm2-135m", help="model spec (alias, path or HF id)")
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(run_one(a.one, a.n, a.method, f"{a.out}/{a.one}", a.model)))
        return
    res = {}
    for kind in KINDS:
        proc = subprocess.run([sys.executable, __file__, "--one", kind, "--n", str(a.n), "--method", a.method,
                               "--out", a.out, "--model", a.model],
                              capture_output=True, text=True, check=True)
        res[kind] = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    print(f"{a.model}, {a.method}, {a.n} trajectories")
    print(f"{'setup':9} {'seconds':>8} {'tok/s':>8} {'final loss':>10} {'peak RSS MB':>12}")
    for kind, r in res.items():
        print(f"{kind:9} {r['seconds']:8.1f} {r['tokens_per_s']:8.1f} {r['final_loss']:10.3f} {r['peak_rss_mb']:12.0f}")
    for other in KINDS[1:]:
        print(f"throughput ratio ours/{other} (non-pad tokens/s): "
              f"{res['ours']['tokens_per_s'] / res[other]['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
