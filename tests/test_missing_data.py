"""A missing data file, wherever the kit opens one (`config.data_file`), is one line that names the
file and `make data`, the target that fetches it; a missing data dir names its variable too. No
data is needed: every case points the kit at empty dirs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fireact_utils import config
from fireact_utils.cli import main
from fireact_utils.data import load_fireact
from fireact_utils.evaluate import fireact_reference
from fireact_utils.io import DataFileError
from fireact_utils.tasks import load_task, mmlu_subjects
from fireact_utils.tools import RecordedSearch
from fireact_utils.wiki import WikiSearch

REPO = Path(__file__).resolve().parent.parent
FETCH = "`make data` fetches it"

# what the kit opens -> the file (relative to the empty dir) it must name
OPENERS = {
    "hotpotqa dev": (lambda d, m: load_task("hotpotqa", None, d), "hotpotqa/dev.json"),
    "bamboogle": (lambda d, m: load_task("bamboogle", None, d), "bamboogle/test.csv"),
    "strategyqa dev": (lambda d, m: load_task("strategyqa", "dev", d), "strategyqa/strategyqa_dev.json"),
    "mmlu": (lambda d, m: load_task("mmlu:anatomy", "test", d), "mmlu/test"),
    "mmlu subjects": (lambda d, m: mmlu_subjects("val", d), "mmlu/val"),
    "released alpaca": (lambda d, m: load_fireact("hotpotqa", "alpaca", d), "finetune/alpaca_format/hotpotqa.json"),
    "released chat": (lambda d, m: load_fireact("multitask", "chat", d), "finetune/gpt_format/multitask.jsonl"),
    "recorded search": (lambda d, m: RecordedSearch(d, cache=False), "finetune/alpaca_format"),
    "FireAct's released runs": (lambda d, m: fireact_reference(d), "trajs"),
    "wiki questions": (lambda d, m: load_task("2wikimultihopqa", None, None, m), "2wikimultihopqa/questions.jsonl"),
    "wiki corpus": (lambda d, m: WikiSearch("strategyqa", multihop_dir=m, cache=False), "strategyqa/corpus.jsonl"),
}


@pytest.mark.parametrize("what", OPENERS)
def test_a_missing_data_file_names_itself_and_make_data(tmp_path, what):
    data, multihop = tmp_path / "fireact", tmp_path / "multihop"
    data.mkdir()
    multihop.mkdir()
    opener, rel = OPENERS[what]
    root = multihop if what.startswith("wiki") else data
    with pytest.raises(DataFileError) as e:
        opener(data, multihop)
    assert str(e.value) == f"data file not found: {root / rel}: {FETCH}"


def test_the_strategyqa_labels_of_released_data_need_their_files(tmp_path, data_dir):
    """Released trajectories are told apart by StrategyQA's questions: without those files they
    were labelled HotpotQA without a word; now the missing file is named."""
    (tmp_path / "finetune" / "alpaca_format").mkdir(parents=True)
    src = data_dir / "finetune" / "alpaca_format" / "hotpotqa.json"
    (tmp_path / "finetune" / "alpaca_format" / "hotpotqa.json").write_bytes(src.read_bytes())
    with pytest.raises(DataFileError, match=re.escape(f"{tmp_path}/strategyqa/strategyqa_train_filtered.json: {FETCH}")):
        load_fireact("hotpotqa", data_dir=tmp_path)


@pytest.mark.parametrize(("locate", "env"), [(config.data_dir, "FIREACT_DATA_DIR"),
                                             (config.multihop_dir, "FIREACT_MULTIHOP_DIR")])
def test_a_missing_data_dir_names_make_data_and_its_variable(tmp_path, monkeypatch, locate, env):
    monkeypatch.setenv(env, str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError) as e:
        locate()
    msg = str(e.value)
    assert msg.startswith(f"{'FireAct' if env == 'FIREACT_DATA_DIR' else 'multihop'} data dir not found: "
                          f"{tmp_path / 'nope'} (from {env}): {FETCH}, or set {env} to a copy of ")
    assert "\n" not in msg


def test_the_cli_says_it_in_one_line_and_make_data_is_a_target(tmp_path, capsys):
    empty = tmp_path / "fireact"
    empty.mkdir()
    assert main(["evaluate", "params/smoke.yaml", f"data_dir={empty}", f"output_root={tmp_path}"]) == 2
    assert capsys.readouterr().err == f"error: data file not found: {empty / 'hotpotqa/dev.json'}: {FETCH}\n"
    assert re.search(r"^data: ", (REPO / "Makefile").read_text(), re.M)
