"""The reference study (`results`): a study's bundles rebuilt with no model into its tables, a study
with pieces missing shown as far as its bundles go, and the pages' marked tables written from them;
the committed pages checked against the committed results/."""

import shutil
from pathlib import Path

import pytest
from eval_records import react_records

from fireact_utils import keys, llm, pieces, pipeline, results, train
from fireact_utils.cli import main
from fireact_utils.config import REPO_ROOT, load_params
from fireact_utils.io import atomic_write_json, write_jsonl

SMOKE = REPO_ROOT / "params" / "smoke.yaml"
# the smoke headline cut to three pieces (baselines, few-shot votes, seed 42), 2 questions everywhere
SMALL = ["study.seeds=[42]", "study.transfer_tasks=[2wikimultihopqa]", "study.generalization_n=2",
         "evaluate.n_questions=2", "study.sc_n=2"]


def _bundle(p, piece: str, conditions: dict[str, tuple[str, list[dict]]], dest: Path) -> Path:
    """A piece's bundle holding `conditions` (name -> (task, records)) as a piece writes them."""
    q = pieces.piece_params(p, piece)
    for name, (task, recs) in conditions.items():
        write_jsonl(q.run_dir / "eval" / f"{name}.jsonl", recs)
        atomic_write_json(q.run_dir / "eval" / f"{name}.meta.json", {"task": task, "split": "dev"})
    return pieces.write_bundle(q, piece, 120.0, dest)


@pytest.fixture
def study(tmp_path, data_dir):
    """results/headline/ holding the baselines piece of the smoke headline: few-shot ReAct on three
    dev questions and a transfer row."""
    base, ft, _ = react_records(data_dir)
    p = load_params(SMOKE, [f"output_root={tmp_path / 'made'}", "evaluate.n_questions=3"])
    _bundle(p, "baselines", {"base_fewshot_react": ("hotpotqa", base), "gen_2wikimultihopqa_base": ("2wikimultihopqa", ft)},
            tmp_path / "results" / "headline")
    return tmp_path / "results"


def test_a_partial_study_is_rebuilt_from_its_bundles(study, tmp_path):
    (got,) = results.rebuild(study, tmp_path / "out")
    assert got.name == "headline" and got.missing == ["fewshot-votes", "seed-42", "seed-7"]
    assert set(got.tables) == {"main", "2wikimultihopqa_dev"}  # one table a task: the study's own is main
    assert "base few-shot ReAct" in got.tables["main"] and "33.3 [" in got.tables["main"]  # 1 of 3 right
    assert "2wikimultihopqa: base few-shot ReAct" in got.tables["2wikimultihopqa_dev"]
    assert not list((tmp_path / "out").rglob("*.safetensors"))
    block = results.blocks([got])["headline/pieces"]
    assert "| baselines | " in block and "| 2 |" in block and "| seed-42 | not run yet |" in block
    (again,) = results.rebuild(study, tmp_path / "out")  # rebuilt from scratch: the same tables
    assert again.tables == got.tables


def test_the_pages_marked_tables_are_written_from_results(study, tmp_path):
    found = results.blocks(results.rebuild(study, tmp_path / "out"))
    page = tmp_path / "page.md"
    page.write_text("Intro.\n<!-- results: headline/main -->\n| an old | table |\n<!-- /results -->\nAfter.\n")
    assert results.write_docs(found, [page], check=True) == [page]
    assert "old" in page.read_text()  # check writes nothing
    assert results.write_docs(found, [page]) == [page]
    text = page.read_text()
    assert "old" not in text and found["headline/main"] in text and text.endswith("<!-- /results -->\nAfter.\n")
    assert results.write_docs(found, [page], check=True) == []
    page.write_text("<!-- results: headline/seeds -->\n<!-- /results -->\n")
    with pytest.raises(ValueError, match="results block 'headline/seeds' is in no bundle"):
        results.write_docs(found, [page])


def test_report_cli_rebuilds_and_checks(study, tmp_path, capsys):
    assert main(["report", str(study), "--out", str(tmp_path / "out")]) == 0
    assert "headline: 1 pieces (missing: fewshot-votes, seed-42, seed-7)" in capsys.readouterr().out
    assert (tmp_path / "out" / "headline" / "smoke" / "tables" / "main.md").is_file()
    shutil.rmtree(study / "headline")
    (study / "headline").mkdir()
    (study / "headline" / "broken.tar.gz").write_bytes(b"no bundle")
    assert main(["report", str(study), "--out", str(tmp_path / "out")]) == 2
    assert "broken.tar.gz: not a readable bundle" in capsys.readouterr().err


def test_the_committed_pages_match_the_committed_results(tmp_path):
    """Every table marked in README.md and docs/ is what `report --docs` writes from results/ now."""
    if not any(results.RESULTS.glob("*/*.tar.gz")):
        pytest.skip("no bundle under results/ yet")
    found = results.blocks(results.rebuild(results.RESULTS, tmp_path / "out"))
    assert results.write_docs(found, results.pages(), check=True) == []


def _finetune_untrained(records, out_dir, tp, mp=None, **_) -> Path:
    """`train.finetune` as a bundle carries one, trained on nothing: its key and done record, no weights."""
    keys.write(Path(out_dir) / keys.KEY_FILE, train.finetune_key(records, tp, mp))
    atomic_write_json(Path(out_dir) / "final" / "train_done.json", {
        "params": tp.model_dump(mode="json"), "model": mp.model_dump(mode="json"), "base_path": mp.name,
        "n_examples": len(records), "n_tokens": 0, "n_loss_tokens": 0, "train_runtime_s": 0.0, "final_loss": None})
    return Path(out_dir) / "final"


@pytest.fixture
def whole_study(tmp_path, data_dir, multihop_dir, monkeypatch):
    """results/headline/ holding every piece of a small smoke headline, made by the pieces themselves
    with a scripted model (one search, then the gold answer on each task's first question, a wrong
    one on the other) and a fine-tune that trains nothing; a base model with no weights anywhere."""
    from scripted import ScriptedLLM

    p = load_params(SMOKE, [f"output_root={tmp_path / 'made'}", f"model.name={tmp_path / 'no-weights'}", *SMALL])
    asked = [pipeline.condition_questions(p, task, None, 2) for task in (None, "2wikimultihopqa")]
    gold = {t.questions[i]: t.answers[i] if k == 0 else "nobody" for t, idx in asked for k, i in enumerate(idx)}

    def reply(text: str) -> str:
        turn = text.rsplit("### Response:\n" if "### Response:" in text else "\nQuestion: ", 1)[-1]
        if "Observation" not in turn:
            return "Thought: look it up.\nAction: search[it]"
        return f"Thought: found it.\nAction: finish[{next(a for q, a in gold.items() if q in text)}]"

    with monkeypatch.context() as m:  # while the pieces run; the report has no model either way
        m.setattr(llm, "local_backend", lambda *a, **k: ScriptedLLM(reply))
        m.setattr(train, "finetune", _finetune_untrained)
        for piece in pieces.pieces(p):
            pieces.run_piece(p, piece.name, bundle_dir=tmp_path / "results" / "headline")
    return tmp_path / "results"


def _tables(study: results.Study) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted((study.run_dir / "tables").iterdir())}


@pytest.mark.parametrize("made", ["study", "whole_study"])
def test_a_study_is_rebuilt_without_the_data(made, request, tmp_path, monkeypatch):
    """`report` on a fresh clone, whose data dirs hold nothing: a partial study and a whole one
    (merged, the headline's own report) give the tables they give with the data, byte for byte."""
    bundles = request.getfixturevalue(made)
    (want,) = results.rebuild(bundles, tmp_path / "with")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("FIREACT_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("FIREACT_MULTIHOP_DIR", str(tmp_path / "empty"))
    (got,) = results.rebuild(bundles, tmp_path / "without")
    assert got.missing == want.missing == ([] if made == "whole_study" else ["fewshot-votes", "seed-42", "seed-7"])
    assert _tables(got) == _tables(want) and "main.csv" in _tables(got)
    if made == "whole_study":
        assert {"headline_seeds.csv", "headline_transfer.md", "self_consistency.md", "summary_vs_paper.csv",
                "failures.md", "paired_gain.json"} <= set(_tables(got))


def test_what_a_report_without_data_takes_for_it_is_the_data(data_dir, multihop_dir):
    """The facts a merge takes where it reads no data: every split's size (`tasks.SPLIT_SIZES`, for
    the seeded shuffle of a condition's questions) and FireAct's released runs' rows."""
    from fireact_utils.evaluate import FIREACT_RELEASED, fireact_reference
    from fireact_utils.holdout import QUESTION_KEYS
    from fireact_utils.io import read_json
    from fireact_utils.tasks import SPLIT_SIZES, TASKS, load_task

    named = {**{t: list(spec.files) for t, spec in TASKS.items()}, **read_json(QUESTION_KEYS)}
    assert SPLIT_SIZES == {t: {s: len(load_task(t, s)) for s in splits} for t, splits in named.items()}
    assert fireact_reference().to_dict("records") == FIREACT_RELEASED
