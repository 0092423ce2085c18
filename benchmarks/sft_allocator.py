"""The demo's whole fine-tune (params/cpu.yaml's recipe: full FT, 500 FireAct HotpotQA trajectories,
batch 8, 1,024 tokens, 3 epochs = 189 steps) with and without `train.keep_freed_memory`: seconds
per step, final loss and peak RSS, the numbers a user of `make demo` feels. Run it once each way,
one at a time on idle cores (~20 min each on 2 cores):

    python benchmarks/sft_allocator.py              # glibc keeps big freed blocks (the kit's default)
    python benchmarks/sft_allocator.py --no-keep    # glibc's defaults: a fresh mmap per tensor over 32 MB
    python benchmarks/sft_allocator.py --steps 8    # a quick look (the length-grouped sampler puts the longest batch first)

`benchmarks/sft.py` is the short side-by-side version (both in one run, 512 tokens).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil

import fireact_utils.train as train
from fireact_utils.config import load_params
from fireact_utils.data import load_fireact


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=189, help="optimizer steps (the demo's 3 epochs: 189)")
    ap.add_argument("--no-keep", action="store_true", help="train with glibc's default allocator settings")
    ap.add_argument("--out", default="/tmp/fireact_bench_allocator")
    a = ap.parse_args()
    p = load_params("params/cpu.yaml").train.model_copy(update={"max_steps": a.steps, "save_steps": 10_000, "logging_steps": 1,
                                                                "keep_freed_memory": not a.no_keep})
    shutil.rmtree(a.out, ignore_errors=True)
    meta = json.loads((train.finetune(load_fireact("hotpotqa"), a.out, p) / "train_done.json").read_text())
    print(json.dumps({"keep_freed_memory": not a.no_keep, "steps": a.steps, "train_s": round(meta["train_runtime_s"], 1),
                      "s_per_step": round(meta["train_runtime_s"] / a.steps, 2), "final_loss": meta["final_loss"],
                      "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)}))


if __name__ == "__main__":
    main()
