"""Where a fine-tuning step's time goes, against the matmul limit measured in the same run.

    python benchmarks/sft_profile.py                 # the demo's recipe (full FT, bf16 autocast), 32 trajectories
    python benchmarks/sft_profile.py --steps 6 --bf16 false

Prints (1) torch's matmul throughput with this process's threads: bf16 and fp32, square and the
shape of a SmolLM2 MLP projection; (2) the profiled steps' CPU time by kind of work (matmuls,
attention, casts, element-wise, the optimizer, the loss, the rest), from torch.profiler's
operator self times; (3) tokens/s and the TFLOP/s they are (6 x parameters a token, the LM head
counted at labelled positions only), as a share of the bf16 limit.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch

KINDS = (  # operator name fragments -> kind (first match wins)
    ("optimizer", ("adam", "_foreach", "optimizer")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax")),
    ("matmul", ("mm", "addmm", "bmm", "matmul", "linear", "mkldnn_convolution")),
    ("loss", ("cross_entropy", "nll_loss", "log_softmax")),
    ("casts and copies", ("_to_copy", "copy_", "to", "clone", "contiguous", "cat", "index", "gather", "scatter")),
    ("element-wise", ("mul", "add", "silu", "rsqrt", "pow", "mean", "sum", "neg", "div", "sub", "embedding",
                      "native_layer_norm", "rms_norm", "sigmoid", "where", "fill", "zero", "ones", "empty")),
)


def kind_of(op: str) -> str:
    name = op.split("::")[-1].lower()
    for kind, parts in KINDS:
        if any(name == p or name.startswith(p + "_") or name.startswith("_" + p) or p in name.split("_") or p == name
               or (len(p) > 4 and p in name) for p in parts):
            return kind
    return "other operators"


def matmul_tflops(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 2.0) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
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
    print(f"threads {torch.get_num_threads()}; matmul TFLOP/s: " + ", ".join(f"{k} {v:.2f}" for k, v in limits.items()))
    limit = max(v for k, v in limits.items() if k.startswith("bfloat16"))

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
    tps = tokens["all"] / seconds
    flops = 6 * (n_params - head) * tokens["all"] + 6 * head * tokens["labelled"]
    print(f"\ntokens/s {tps:.0f}; {flops / seconds / 1e12:.3f} TFLOP/s = {flops / seconds / 1e12 / limit:.1%} of the "
          f"bf16 matmul limit ({limit:.2f} TFLOP/s)")


if __name__ == "__main__":
    main()
