"""Model spec resolution and the built-in GGUF model (converted once into the cache)."""

import json
import os
import subprocess
import sys

import pytest

from fireact_utils.models import ModelSpecError, load_model, partial_dir, resolve_model


def test_builtin_model_loads_generates_trains_and_saves(tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    path = resolve_model("smollm2-135m")
    assert "quantization_config" not in open(f"{path}/config.json").read()
    model, tok = load_model("smollm2-135m")
    ids = tok("The capital of France is", return_tensors="pt")
    a = model.generate(**ids, max_new_tokens=6, do_sample=False)
    b = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b) and a.shape[1] == ids["input_ids"].shape[1] + 6  # greedy is deterministic
    assert "Paris" in tok.decode(a[0])

    # One LoRA step changes the adapter weights; save and reload give the same outputs.
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft.train()
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    batch = tok("Thought: I need to search Paris.\nAction: search[Paris]", return_tensors="pt")
    loss = peft(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    opt.step()
    peft.eval()
    peft.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        before = peft(**batch).logits
    base, _ = load_model("smollm2-135m")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        after = reloaded(**batch).logits
    assert torch.allclose(before, after, atol=1e-4)


def test_spec_errors(tmp_path):
    with pytest.raises(ModelSpecError, match="unknown model 'smollm3-tiny'"):
        resolve_model("smollm3-tiny")
    with pytest.raises(ModelSpecError, match="not found"):
        resolve_model("./no/such/model")
    with pytest.raises(ModelSpecError, match="not found"):
        resolve_model(str(tmp_path / "nowhere" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSpecError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # hub ids pass through


PUBLISH = """
import json, sys, time
from pathlib import Path
from fireact_utils.models import partial_dir, publish_dir
out, me = Path(sys.argv[1]), sys.argv[2]
tmp = partial_dir(out)
for name in ("config.json", "model.safetensors"):
    (tmp / name).write_text(json.dumps({"by": me}))
(out.parent / f"ready-{me}").touch()
while len(list(out.parent.glob("ready-*"))) < 2:  # both half-built before either publishes
    time.sleep(0.01)
publish_dir(tmp, out)
"""


def test_two_first_runs_convert_into_one_cache_without_sharing_a_partial_dir(tmp_path):
    """Two processes build the converted model at once: each in a directory of its own (a shared
    `.partial` let one delete the other's files), and the cache ends with one whole checkpoint,
    no half-built one left; a dead process's half-built dir is swept by the next conversion."""
    out = tmp_path / "smollm2-135m"
    mine = [partial_dir(out), partial_dir(out)]
    assert mine[0] != mine[1] and all(d.is_dir() and d.parent == tmp_path for d in mine)
    assert all(d.name.startswith(f"smollm2-135m.partial-{os.getpid()}-") for d in mine)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f"smollm2-135m.partial-{int(dead.stdout)}-x").mkdir()
    partial_dir(out).rmdir()
    assert sorted(tmp_path.iterdir()) == sorted(mine)  # the dead one's swept, this process's kept
    for d in mine:
        d.rmdir()

    runs = [subprocess.Popen([sys.executable, "-c", PUBLISH, str(out), who]) for who in ("a", "b")]
    assert [r.wait(60) for r in runs] == [0, 0]
    written = {json.loads((out / f).read_text())["by"] for f in ("config.json", "model.safetensors")}
    assert len(written) == 1 and written <= {"a", "b"}  # one process's whole checkpoint, not a mix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready-a", "ready-b", "smollm2-135m"]
