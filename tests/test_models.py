"""Model spec resolution and the built-in GGUF model (converted once into the cache)."""

import pytest

from fireact_utils.models import ModelSpecError, load_model, resolve_model


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
