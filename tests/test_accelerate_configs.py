"""The shipped `accelerate launch` configs parse with accelerate's own loader (which rejects
unknown keys) and ask for what the README says they do."""

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
