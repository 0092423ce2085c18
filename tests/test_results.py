"""The reference study (`results`): a study's bundles rebuilt with no model into its tables, a study
with pieces missing shown as far as its bundles go, and the pages' marked tables written from them;
the committed pages checked against the committed results/."""

import shutil
from pathlib import Path

import pytest
from eval_records import react_records

from fireact_utils import pieces, results
from fireact_utils.cli import main
from fireact_utils.config import REPO_ROOT, load_params
from fireact_utils.io import atomic_write_json, write_jsonl

SMOKE = REPO_ROOT / "params" / "smoke.yaml"


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
