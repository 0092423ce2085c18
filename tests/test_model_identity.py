"""A saved condition, sample or fine-tune is resumed or reused only by the model that made it.

Two tiny real Llama models (1 layer, 32 wide, the built-in model's tokenizer, different seeds)
run real conditions on 2 questions; asking for the same run name with the other model is a
one-line error naming both fingerprints (`keys`), while the same weights (even copied elsewhere,
or saved by another transformers release) resume; another decoding dtype is another condition.
"""

import json
import shutil
from pathlib import Path

import pytest
from tiny import tiny_llama  # tests/ is on sys.path (no package)

from fireact_utils import pipeline, provenance, self_consistency, self_improve
from fireact_utils.config import load_params
from fireact_utils.data import load_fireact
from fireact_utils.models import model_fingerprint

SMOKE = Path(__file__).resolve().parent.parent / "params" / "smoke.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory, model_path) -> tuple[Path, Path]:
    """Two tiny models of one architecture and tokenizer: only their weights differ."""
    root = tmp_path_factory.mktemp("tiny")
    return tiny_llama(root / "a", model_path, 0), tiny_llama(root / "b", model_path, 1)


def _params(tmp_path, model: Path, **kw):
    return load_params(SMOKE, {"output_root": str(tmp_path), "model.name": str(model), "model.device": "cpu",
                               "evaluate.n_questions": 2, "agent.max_turns": 1, "agent.max_new_tokens": 6,
                               "agent.n_exemplars": 1, **kw})


def _run(p, trained=None, name: str = "base_fewshot_react") -> list[dict]:
    agent = pipeline.finetuned_agent(p) if trained else pipeline.fewshot_react(p)
    return pipeline.run_condition(p, name, pipeline.local_llm(p, trained), agent, progress=False)


def _refusal(err: pytest.ExceptionInfo, path: Path, saved: str, now: str, setting: str = "model") -> None:
    """The error is one line naming the path and both models' fingerprints."""
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(path))
    assert f"({setting} {model_fingerprint(saved)} -> {model_fingerprint(now)})" in msg


def test_fingerprint_names_the_weights_not_the_place(models, tmp_path):
    a, b = models
    copy = shutil.copytree(a, tmp_path / "copy")  # new mtimes, same bytes
    assert model_fingerprint(str(a)) == model_fingerprint(str(copy)) != model_fingerprint(str(b))
    assert len(model_fingerprint(str(a))) == 16
    config = json.loads((copy / "config.json").read_text())  # saved by another transformers release
    (copy / "config.json").write_text(json.dumps({**config, "transformers_version": "4.0.0"}))
    assert model_fingerprint(str(copy)) == model_fingerprint(str(a))
    (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))  # another model
    assert model_fingerprint(str(copy)) != model_fingerprint(str(a))


def test_a_condition_resumes_only_with_its_model(models, tmp_path, data_dir):
    a, b = models
    recs = _run(_params(tmp_path, a))
    meta = provenance.condition_meta(_params(tmp_path, a), "base_fewshot_react")
    assert (meta["model"], meta["model_fingerprint"], meta["model_dtype"]) == (str(a), model_fingerprint(str(a)), "float32")
    with pytest.raises(ValueError) as err:
        _run(_params(tmp_path, b))
    _refusal(err, tmp_path / "smoke" / "eval" / "base_fewshot_react.jsonl", str(a), str(b))
    # the same weights resume copied elsewhere; another decoding dtype is another condition
    copy = shutil.copytree(a, tmp_path / "copy")
    assert _run(_params(tmp_path, copy)) == recs
    with pytest.raises(ValueError, match=r"\(model.dtype float32 -> bfloat16\): rerun with --redo"):
        _run(_params(tmp_path, copy, **{"model.dtype": "bfloat16"}))


def test_a_meta_older_than_keys_is_refused_and_recomputed_under_redo(models, tmp_path, data_dir, monkeypatch):
    a, _ = models
    p = _params(tmp_path, a)
    recs = _run(p)
    meta_path = p.run_dir / "eval" / "base_fewshot_react.meta.json"
    meta_path.write_text(json.dumps({k: v for k, v in json.loads(meta_path.read_text()).items() if k != "key"}))
    with pytest.raises(ValueError, match="was made before outputs carried keys: rerun with --redo"):
        _run(p)
    monkeypatch.setenv("FIREACT_REDO", "1")
    assert [r["id"] for r in _run(p)] == [r["id"] for r in recs]
    assert provenance.condition_meta(p, "base_fewshot_react")["episodes_run"] == 2  # recomputed, not resumed


def test_self_improvement_refuses_another_students_finetuned_react(models, tmp_path, data_dir):
    """Round 0 scores the SFT student as notebook 03's finetuned_react: another student's is refused."""
    a, b = models
    p = _params(tmp_path, a)
    _run(p, trained=a, name="finetuned_react")
    with pytest.raises(ValueError) as err:
        self_improve.scores(p, "sft", b, progress=False)
    _refusal(err, p.run_dir / "eval" / "finetuned_react.jsonl", str(a), str(b))
    assert not list((p.run_dir / "eval").glob("sft_val*"))  # refused before any validation episode


def test_saved_samples_are_reused_only_by_their_model(models, tmp_path, data_dir):
    a, b = models
    kw = {"study.sc_ks": [1], "study.sc_n": 1, "study.sc_agents": ["fewshot"], "study.sc_seeds": False}
    curve = self_consistency.curve(_params(tmp_path, a, **kw), None, progress=False)
    assert self_consistency.curve(_params(tmp_path, a, **kw), None, progress=False).equals(curve)  # reused
    with pytest.raises(ValueError) as err:  # complete: reused without a model, but not under model b
        self_consistency.curve(_params(tmp_path, b, **kw), None, progress=False)
    _refusal(err, tmp_path / "smoke" / "eval" / "sc_fewshot_s0.jsonl", str(a), str(b))
    # a model not on this machine cannot be compared; the saved samples need none
    assert self_consistency.curve(_params(tmp_path, Path("/no/such/model"), **kw), None, progress=False).equals(curve)


def test_a_fine_tune_is_reused_and_resumed_only_on_its_base_model(models, tmp_path, data_dir):
    a, b = models
    train = {"train.max_steps": 1, "train.save_steps": 1, "train.batch_size": 2, "train.max_length": 64,
             "train.lora_r": 2, "train.lora_alpha": 4}
    records = load_fireact("hotpotqa", data_dir=data_dir)[:2]
    out = tmp_path / "ft"
    final = pipeline.finetune(_params(tmp_path, a, **train), records, out)
    assert json.loads((final / "train_done.json").read_text())["model_fingerprint"] == model_fingerprint(str(a))
    assert pipeline.finetune(_params(tmp_path, a, **train), records, out) == final  # reused
    with pytest.raises(ValueError) as err:
        pipeline.finetune(_params(tmp_path, b, **train), records, out)
    _refusal(err, out, str(a), str(b), "model.weights")
    # killed after its checkpoint: resumed on model a only
    shutil.rmtree(final)
    with pytest.raises(ValueError) as err:
        pipeline.finetune(_params(tmp_path, b, **train), records, out)
    _refusal(err, out, str(a), str(b), "model.weights")
    assert (pipeline.finetune(_params(tmp_path, a, **train), records, out) / "train_done.json").is_file()
