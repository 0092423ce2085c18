"""The base-model axis on real components: two students (the built-in model and a tiny random
Llama with its tokenizer), a 2-point recipe grid chosen on 2 HotpotQA-wiki val questions, 1-step
fine-tunes, both agents on 2 questions of each evaluation set. Checks the table's rows and CIs,
the figure, a resume that trains and runs nothing, and the refusal to choose on a test split."""

from pathlib import Path

import pandas as pd
import pytest
from tiny import tiny_llama  # tests/ is on sys.path (no package)

from fireact_utils import base_models, pieces
from fireact_utils.cli import main
from fireact_utils.config import load_params
from fireact_utils.holdout import HoldoutError

SMOKE = Path(__file__).resolve().parent.parent / "params" / "smoke.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")


def _overrides(tmp_path, models: list[str], *more: str) -> list[str]:
    """The CLI's overrides: 2 questions per set, a 2-point grid, 1-step fine-tunes."""
    return [f"output_root={tmp_path}", "model.device=cpu", f"study.base_models=[{', '.join(models)}]",
            "study.base_model_evals=[hotpotqa-wiki:test:2, hotpotqa:dev:2]",
            "study.recipes={lr1e-4: {train.learning_rate: 0.0001}, lr3e-4: {train.learning_rate: 0.0003}}",
            "study.select_n=2", "train.max_steps=1", "train.max_length=256", "dataset.n_trajectories=4",
            "agent.max_turns=1", "agent.max_new_tokens=6", "agent.n_exemplars=1", "evaluate.bootstrap=50", *more]


def _params(tmp_path, models: list[str], *more: str):
    return load_params(SMOKE, _overrides(tmp_path, models, *more))


def test_each_model_is_chosen_finetuned_and_compared_then_resumed(tmp_path, model_path, data_dir, multihop_dir,
                                                                  monkeypatch, capsys):
    tiny = tiny_llama(tmp_path / "tiny", model_path, 0)
    p = _params(tmp_path / "runs", [model_path, str(tiny)])
    table = base_models.report(p, progress=False)

    assert len(table) == 2 * 2 * 2  # model x agent x evaluation set
    assert set(zip(table["model"], table["agent"], table["task"], strict=True)) == {
        (m, a, t) for m in p.study.base_models for a in ("fewshot", "finetuned") for t in ("hotpotqa-wiki test", "hotpotqa dev")}
    assert (table["n"] == 2).all() and table[["em_lo", "em_hi"]].notna().all().all()
    assert (table["em_lo"] <= table["em"]).all() and (table["em"] <= table["em_hi"]).all()
    ft = table[table["agent"] == "finetuned"]
    assert ft[["gain", "gain_lo", "gain_hi", "train_tokens_per_s", "train_peak_memory_gb"]].notna().all().all()
    assert (table["seconds_per_episode"] > 0).all() and (table["tokens_per_episode"] > 0).all()
    assert set(ft["recipe"]) <= {"lr1e-4", "lr3e-4"}
    for m in p.study.base_models:  # each model in its own folder, its recipe chosen there
        run = p.run_dir / "base_models" / base_models.model_slug(m)
        assert (run / "tables" / "recipes_chosen.json").is_file() and len(list(run.glob("recipes/*/final"))) == 2
    for f in ("tables/base_models.csv", "tables/base_models.md", "figures/base_models.png", "figures/base_models.svg"):
        assert (p.run_dir / f).is_file(), f
    assert "gain, EM points" in (p.run_dir / "tables" / "base_models.md").read_text()

    # A rerun (the CLI's) trains nothing and runs no episode: every fine-tune and condition is saved.
    import trl

    def refuse(*a, **k):
        raise AssertionError("a saved fine-tune was trained again")

    monkeypatch.setattr(trl, "SFTTrainer", refuse)
    monkeypatch.setattr("fireact_utils.pipeline.run_episodes", refuse)
    assert main(["base-models", str(SMOKE), *_overrides(tmp_path / "runs", p.study.base_models)]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m: fine-tuned ReAct" in out and "tiny: few-shot ReAct" in out
    again = pd.read_csv(p.run_dir / "tables" / "base_models.csv")
    assert again["em"].tolist() == table["em"].tolist() and again["condition"].tolist() == table["condition"].tolist()


def test_choosing_on_a_test_split_is_refused_before_any_work(tmp_path, data_dir, multihop_dir, capsys):
    p = _params(tmp_path, ["smollm2-135m"], "study.select_split=test")
    with pytest.raises(HoldoutError, match="test questions"):
        base_models.report(p, progress=False)
    assert not (p.run_dir / "base_models").exists()
    assert main(["base-models", str(SMOKE), *_overrides(tmp_path, [])]) == 2
    assert capsys.readouterr().err.startswith("error: study.base_models is empty")


def test_the_axis_in_pieces_merges_into_the_whole_runs_table(tmp_path, model_path, data_dir, multihop_dir):
    """One model's axis as pieces (few-shot; each recipe: its fine-tune on val and the evaluation
    sets), run in their own output roots as on other machines, merged: the table a whole run gives."""
    tiny = str(tiny_llama(tmp_path / "tiny", model_path, 0))
    p = _params(tmp_path / "pieces", [tiny])
    names = [x.name for x in pieces.pieces(p)]
    assert names == ["model-tiny-fewshot", "model-tiny-lr1e-4", "model-tiny-lr3e-4"]
    bundles = [pieces.run_piece(p, n, bundle_dir=tmp_path / "bundles") for n in names]
    merged = _params(tmp_path / "merged", [tiny])
    pieces.merge(merged, bundles)
    whole = _params(tmp_path / "whole", [tiny])
    want = base_models.report(whole, progress=False)
    got = pd.read_csv(merged.run_dir / "tables" / "base_models.csv")
    same = ["task", "condition", "recipe", "n", "em", "em_lo", "em_hi", "gain", "gain_lo", "gain_hi"]
    pd.testing.assert_frame_equal(got[same], want[same], check_dtype=False)
    chosen = got["recipe"].iloc[-1]  # every recipe's piece scored the test sets; only the chosen one is shown
    assert set(got["recipe"].dropna()) == {chosen}
    assert len(list((merged.run_dir / "base_models" / "tiny" / "eval").glob("finetuned_react_*_lr*.jsonl"))) == 4
