"""Where a fine-tuning step's time goes, against the matmul limit measured in the same run.

    python benchmarks/sft_profile.py                 # the demo's recipe (full FT, bf16 autocast), 32 trajectories
    python benchmarks/sft_profile.py --steps 6 --bf16 false

Prints (1) torch's matmul throughput with this process's threads: bf16 and fp32, square and the
shape of a SmolLM2 MLP projection; (2) the profiled steps' CPU time by kind of work (matmuls,
attention, casts, element-wise, the optimizer, the loss, the rest), from torch.profiler's
operator self times; (3) tokens/s and the TFLOP/s they are (6 x parameters a token, the LM head
counted at labelled positions only), as a share of the matmul limit in the dtype the matmuls ran
in (bf16 under autocast, else fp32).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch

KINDS = {  # aten operator -> kind of work; the rest are "other operators"
    "matmul": {"mm", "addmm", "addmm_", "bmm", "matmul", "linear"},
    "attention": {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
                  "scaled_dot_product_attention", "_softmax", "_softmax_backward_data"},
    "optimizer": {"_fused_adamw_", "_foreach_add_", "_foreach_mul_", "_foreach_addcmul_", "_foreach_addcdiv_",
                  "_foreach_sqrt", "_foreach_div_", "_foreach_lerp_", "_foreach_norm", "_foreach_mul"},
    "loss": {"nll_loss_forward", "nll_loss_backward", "_log_softmax", "_log_softmax_backward_data", "cross_entropy_loss"},
    "casts and copies": {"_to_copy", "copy_", "clone", "contiguous", "cat", "index", "index_select", "gather",
                         "scatter", "masked_select", "embedding_dense_backward", "index_add_", "nonzero"},
    "element-wise": {"mul", "add", "add_", "sub", "div", "silu", "silu_backward", "rsqrt", "pow", "mean", "sum", "neg",
                     "exp", "fill_", "zero_", "where", "sigmoid", "embedding", "mul_", "div_", "sqrt", "clamp_min"},
}


def kind_of(op: str) -> str:
    name = op.removeprefix("aten::")
    return next((kind for kind, names in KINDS.items() if name in names), "other operators")


def matmul_tflops(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Throughput of `a @ b` over at least `seconds` and 3 calls, after one warm-up call."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32, help="trajectories")
    ap.add_argument("--steps", type=int, default=4, help="profiled optimizer steps (after one warm-up step)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bf16", choices=["auto", "true", "false"], default="auto")
    ap.add_argument("--out", default="/tmp/fireact_sft_profile")
    a = ap.parse_args()

    limits = {f"{dt} {m}x{k}x{n}": matmul_tflops(m, k, n, getattr(torch, dt))
              for dt in ("bfloat16", "float32") for m, k, n in ((2048, 2048, 2048), (8192, 576, 1536))}
    print(f"threads {torch.get_num_threads()}; matmul TFLOP/s: " + ", ".join(f"{k} {v:.3f}" for k, v in limits.items()))

    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTTrainer

    from fireact_utils.config import TrainParams
    from fireact_utils.data import load_fireact
    from fireact_utils.models import resolve_model
    from fireact_utils.train import build_dataset, keep_freed_memory, labelled_positions_only, make_sft_config

    path = resolve_model(a.model)
    tok = AutoTokenizer.from_pretrained(path)
    bf16 = {"auto": "auto", "true": True, "false": False}[a.bf16]
    p = TrainParams(method="full", epochs=1, batch_size=8, max_length=1024, max_steps=1 + a.steps, logging_steps=1,
                    save_steps=10_000, bf16=bf16)
    ds = build_dataset(load_fireact("hotpotqa")[: a.n], tok, p)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    n_params = sum(x.numel() for x in model.parameters())
    head = model.get_output_embeddings().weight.numel()
    trainer = SFTTrainer(model=model, args=make_sft_config(p, Path(a.out), "cpu"), train_dataset=ds, processing_class=tok)

    tokens = {"all": 0, "labelled": 0}
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    timing: dict[str, float] = {}

    class Window(TrainerCallback):
        """Profile every step after the first (warm-up: allocator, lazy init)."""

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                prof.start()
                timing["t0"] = time.perf_counter()

    trainer.add_callback(Window())
    collate = trainer.data_collator

    def counting(rows):
        batch = collate(rows)
        if "t0" in timing:
            tokens["all"] += int((batch["labels"] != -100).numel() if "attention_mask" not in batch
                                 else batch["attention_mask"].sum())
            tokens["labelled"] += int((batch["labels"] != -100).sum())
        return batch

    trainer.data_collator = counting
    with labelled_positions_only(), keep_freed_memory():
        trainer.train()
    seconds = time.perf_counter() - timing["t0"]
    prof.stop()

    by_kind: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        by_kind[kind_of(e.key)] += e.self_cpu_time_total / 1e6
    ops = sum(by_kind.values())
    print(f"\n{a.steps} steps, {tokens['all']} tokens ({tokens['labelled']} labelled), {seconds:.1f} s wall, "
          f"bf16 autocast {trainer.args.bf16}")
    print(f"{'kind':18} {'seconds':>8} {'share':>6}")
    for kind, s in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"{kind:18} {s:8.2f} {s / ops:6.1%}")
    print(f"{'(python, idle)':18} {max(seconds - ops, 0):8.2f}   (wall minus operator self time)")
    print("\ntop operators by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    dtype = "bfloat16" if trainer.args.bf16 else "float32"  # the matmuls' dtype: autocast's, else the weights'
    limit = max(v for k, v in limits.items() if k.startswith(dtype))
    tps = tokens["all"] / seconds
    flops = 6 * (n_params - head) * tokens["all"] + 6 * head * tokens["labelled"]
    print(f"\ntokens/s {tps:.0f} (under the profiler, which slows every operator); {flops / seconds / 1e12:.3f} "
          f"TFLOP/s = {flops / seconds / 1e12 / limit:.1%} of the {dtype} matmul limit ({limit:.3f} TFLOP/s)")


if __name__ == "__main__":
    main()
