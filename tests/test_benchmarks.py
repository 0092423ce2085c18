"""The speed benchmarks run and report what docs/speed.md quotes from them (real model, real data)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # a vLLM server start (~1-3 min) and four short rollout runs
def test_rollouts_compares_vllm_with_generate_and_prompting(data_dir, model_path, vllm_python, capsys):
    """vLLM vs `model.generate` on the same episodes (ratio, identical greedy predictions), and
    the fine-tuned agent's cost against few-shot prompting on both (here the "trained" model is
    the base checkpoint itself, which the benchmark loads as a full fine-tune: one server serves both)."""
    out = _script("rollouts").main(["--n", "2", "--max-turns", "1", "--batch-size", "2", "--threads", "1",
                                    "--model", model_path, "--trained", model_path, "--vs-fewshot",
                                    "--n-exemplars", "1", "--skip", "generate_batch"])
    assert set(out["seconds"]) == {"generate", "vllm"} and out["best_local"] == "generate"
    assert out["ratio"] == pytest.approx(out["seconds"]["generate"] / out["seconds"]["vllm"])
    assert out["same"] == 2 and out["vllm_start_s"] > 0  # greedy, fp32: both decoders give the same answers
    assert set(out["agents"]) == {"vllm", "generate"}  # both agents on each decoder the fine-tuned one ran on
    for agents in out["agents"].values():
        for name in ("finetuned", "fewshot"):
            assert agents[name]["s_episode"] > 0 and 0 < agents[name]["turns"] <= 1  # one turn allowed
            assert agents[name]["completion_tokens"] > 0
        # The few-shot prompt carries an exemplar the fine-tuned prompt has not.
        assert agents["fewshot"]["prompt_tokens"] > agents["finetuned"]["prompt_tokens"]
        assert agents["ratio_episode"] == pytest.approx(agents["finetuned"]["s_episode"] / agents["fewshot"]["s_episode"])
    assert capsys.readouterr().out.count("seconds per correct answer: ") == 2


def test_rollouts_vs_fewshot_needs_a_trained_model():
    with pytest.raises(SystemExit, match="--trained"):
        _script("rollouts").main(["--vs-fewshot"])
