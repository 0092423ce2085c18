"""The shipped `accelerate launch` configs parse with accelerate's own loader (which rejects
unknown keys) and ask for what docs/design.md says they do."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP")])
def test_accelerate_config_loads(name, kind):
    cfg = ClusterConfig.from_yaml_file(ROOT / "accelerate" / f"{name}.yaml")
    assert str(getattr(cfg.distributed_type, "value", cfg.distributed_type)) == kind
    assert str(getattr(cfg.mixed_precision, "value", cfg.mixed_precision)) == "bf16" and cfg.num_processes > 1 and not cfg.use_cpu
    if kind == "FSDP":
        assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    text = (ROOT / "accelerate" / f"{name}.yaml").read_text()
    assert "accelerate launch --config_file accelerate/" in text  # the file says how to use it


@pytest.mark.slow
def test_two_process_cpu_fine_tune_writes_once_and_loads(tmp_path, data_dir, model_path):
    """`accelerate launch --num_processes 2 --cpu` runs the CLI's fine-tune as two ranks (gloo):
    the adapter, log and done marker are written once, by rank 0, and the result loads."""
    import json
    import os
    import subprocess
    import sys

    from fireact_utils import pipeline
    from fireact_utils.config import load_params

    ov = [f"output_root={tmp_path}", "train.max_steps=2", "train.logging_steps=1", "dataset.n_trajectories=8"]
    p = load_params(ROOT / "params" / "smoke.yaml", ov)
    pipeline.build_dataset(p)  # the data stage runs once, before the ranks start
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fireact_utils", "finetune",
           str(ROOT / "params" / "smoke.yaml"), *ov]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    final = p.run_dir / "finetune" / "final"
    done = json.loads((final / "train_done.json").read_text())
    assert done["n_examples"] == 8 and done["params"]["max_steps"] == 2
    assert (final / "adapter_model.safetensors").is_file()
    log = (p.run_dir / "finetune" / "train_log.csv").read_text().splitlines()
    assert len(log) == 1 + 2  # header + one row per step: one writer
    llm = pipeline.local_llm(p, final)
    (gen,) = llm.generate(["Question: Who wrote Hamlet?\nThought:"], ["\n"], 8)
    assert gen.completion_tokens > 0
