"""One reuse rule (`keys`): each stage's output is reused only under the key of what made it.

Each test is a scenario a user hit before keys: an output found by its name and reused, or
resumed, after a setting changed. Now the reuse is refused in one line naming the settings that
differ, and --redo (FIREACT_REDO) recomputes. Real stages: the CLI's fine-tune of a tiny real
model, the papermill chain's markers, a condition of a scripted agent in the Wikipedia environment.
"""

import json
import shutil
from pathlib import Path

import pytest
from scripted import ScriptedLLM
from tiny import tiny_llama

from fireact_utils import keys
from fireact_utils.chain import NOTEBOOKS, run_chain
from fireact_utils.cli import main
from fireact_utils.config import AgentParams, SearchParams, load_params
from fireact_utils.io import atomic_write_json, read_json
from fireact_utils.pipeline import run_condition

SMOKE = Path(__file__).resolve().parent.parent / "params" / "smoke.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")


def test_differences_name_each_setting_and_skip_the_unknown():
    a = keys.make("x", {"train.epochs": 2.0, "model": "abc", "data": None})
    b = keys.make("x", {"train.epochs": 3.0, "model": None, "data": "d1", "new": 1})
    assert keys.differences(a["settings"], b["settings"]) == ["new (absent) -> 1", "train.epochs 2.0 -> 3.0"]
    with pytest.raises(keys.StaleOutputError, match=r"^out was made with other settings \(new \(absent\) -> 1; "
                                                    r"train.epochs 2.0 -> 3.0\): rerun with --redo"):
        keys.check(a, b, "out")
    keys.check(a, keys.make("x", {"train.epochs": 2.0, "model": None, "data": "d2"}), "out")  # unknowns pass
    assert a["key"] != keys.make("y", a["settings"])["key"]  # another stage, another key


def test_a_setting_added_to_the_schema_keeps_what_its_default_made():
    """An output (or a bundle) made before a setting existed was made under its default: a key
    without it still matches a key with the default, not with another value."""
    now = keys.schema_defaults()
    assert now["agent.max_turns"] == 8
    older = {k: v for k, v in now.items() if k != "agent.max_turns"}  # as if agent.max_turns were new
    assert keys.differences(older, now) == [] and keys.differences(now, older) == []
    assert keys.differences(older, {**now, "agent.max_turns": 99}) == [f"agent.max_turns {now['agent.max_turns']} -> 99"]
    assert keys.differences(now, {**now, "gone.setting": 1}) == ["gone.setting (absent) -> 1"]  # in no schema


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, model_path) -> str:
    return str(tiny_llama(tmp_path_factory.mktemp("tiny") / "m", model_path, 0))


def _finetune(tmp_path, tiny, *extra: str) -> tuple[int, str]:
    """`python -m fireact_utils finetune params/smoke.yaml` on the tiny model: (exit code, its answer:
    the path it printed last, or its one error line)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["finetune", str(SMOKE), f"output_root={tmp_path}", f"model.name={tiny}", "model.device=cpu",
                     "train.max_steps=2", "train.save_steps=1", "train.max_length=64", "dataset.n_trajectories=4",
                     "train.lora_r=2", "train.lora_alpha=4", *extra])
    errors = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
    return code, errors[0] if len(errors) == 1 else out.getvalue().strip().splitlines()[-1]


def test_a_fine_tune_is_reused_only_under_its_data_and_settings(tmp_path, tiny, data_dir, monkeypatch):
    """Scenarios 1 and 2: another dataset source (the saved dataset), another learning rate (the
    finished model, then its checkpoint) are refused naming the setting; --redo recomputes."""
    monkeypatch.setenv(keys.REDO_ENV, "0")  # restored after the test: the CLI's --redo sets it
    code, printed = _finetune(tmp_path, tiny)
    final = tmp_path / "smoke" / "finetune" / "final"
    assert (code, printed) == (0, str(final))
    assert read_json(final / "train_done.json")["key"] == read_json(final.parent / "key.json")["key"]
    assert (tmp_path / "smoke" / "figures" / "loss_curve.png").stat().st_size > 1000  # drawn as notebook 02 draws it
    assert _finetune(tmp_path, tiny) == (0, str(final))  # reused: same data, same settings

    code, printed = _finetune(tmp_path, tiny, "dataset.source=fireact:hotpotqa_multimethod")
    assert code == 2 and printed.startswith(f"error: {tmp_path / 'smoke' / 'dataset'} was made")
    assert "dataset was made with other settings (dataset.source fireact:hotpotqa -> fireact:hotpotqa_multimethod; " \
           "pool " in printed and "rerun with --redo" in printed

    code, printed = _finetune(tmp_path, tiny, "train.learning_rate=0.0002")
    assert (code, printed) == (2, f"error: {final.parent} was made with other settings (train.learning_rate 0.0001 -> "
                                  "0.0002): rerun with --redo to recompute it, or pick a new run name")
    shutil.rmtree(final)  # killed after its checkpoints: they do not resume under another learning rate either
    assert sorted(d.name for d in final.parent.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert _finetune(tmp_path, tiny, "train.learning_rate=0.0002")[0] == 2

    code, printed = _finetune(tmp_path, tiny, "train.learning_rate=0.0002", "--redo")
    monkeypatch.setenv(keys.REDO_ENV, "0")
    assert code == 0 and read_json(final / "train_done.json")["params"]["learning_rate"] == 0.0002
    assert read_json(final / "train_done.json")["resumed_from"] is None  # trained from the start
    assert _finetune(tmp_path, tiny, "train.learning_rate=0.0002", "train.logging_steps=1")[0] == 0  # no number changes


def test_grpo_resumes_only_from_its_student_and_settings(tmp_path, tiny, model_path):
    """Scenario 2 for GRPO: its output (policy, checkpoints, merged student) is reused only under
    its rl settings and from the SFT student whose weights began it; checked before any model loads."""
    from fireact_utils import rl

    p = load_params(SMOKE, [f"output_root={tmp_path}", f"model.name={tiny}", "model.device=cpu"])
    out = p.run_dir / "rl"
    keys.write(out / keys.KEY_FILE, rl.grpo_key(p, tiny))
    atomic_write_json(out / "final" / "rl_done.json", {"params": p.rl.model_dump(mode="json")})
    assert rl.train_grpo(p, tiny) == out / "final"
    with pytest.raises(keys.StaleOutputError, match=r"rl was made with other settings \(rl.learning_rate 2e-05 -> 0.0001\)"):
        rl.train_grpo(load_params(SMOKE, [f"output_root={tmp_path}", f"model.name={tiny}", "model.device=cpu",
                                          "rl.learning_rate=1e-4"]), tiny)
    other = tiny_llama(tmp_path / "other", model_path, 1)  # another SFT student
    with pytest.raises(keys.StaleOutputError, match=r"\(student [0-9a-f]{16} -> [0-9a-f]{16}\)"):
        rl.train_grpo(p, other)


def test_the_chain_skips_a_notebook_only_under_its_settings(tmp_path, capsys):
    """Scenario 3: markers of a finished chain; asked with another evaluate.n_questions, the chain
    stops before any kernel starts, naming it, and leaves params.json as the run made it."""
    p = load_params(SMOKE, [f"output_root={tmp_path}"])
    made = keys.make("notebook", keys.run_settings(p))
    for nb in NOTEBOOKS:
        atomic_write_json(p.run_dir / "notebooks" / f"{nb}.done", {"seconds": 1.0, "key": made})
    run_chain(SMOKE, [f"output_root={tmp_path}"], html=False)
    assert capsys.readouterr().out.count("[skip]") == len(NOTEBOOKS)
    atomic_write_json(p.run_dir / "params.json", {"made": "by the run"})
    with pytest.raises(keys.StaleOutputError, match=r"00_walkthrough.ipynb was made with other settings "
                                                    r"\(evaluate.n_questions 4 -> 200\): rerun with --redo"):
        run_chain(SMOKE, [f"output_root={tmp_path}", "evaluate.n_questions=200"], html=False)
    assert read_json(p.run_dir / "params.json") == {"made": "by the run"}
    old = {"seconds": 1.0}  # a marker older than keys
    atomic_write_json(p.run_dir / "notebooks" / "00_walkthrough.done", old)
    with pytest.raises(keys.StaleOutputError, match="made before outputs carried keys"):
        run_chain(SMOKE, [f"output_root={tmp_path}"], html=False, notebooks=NOTEBOOKS[:1])


def _wiki_reply(text: str) -> str:
    if "Observation:" in text.rsplit("Question:", 1)[1]:
        return "Thought: I give up.\nAction: finish[no idea]"
    return f"Thought: search it.\nAction: search[{text.rsplit('Question:', 1)[1].strip().splitlines()[0]}]"


@pytest.mark.parametrize("change", [{"top_k": 2}, {"max_obs_chars": 300}, {"noise_rate": 0.5, "noise_kind": "random"},
                                    {"seed": 3, "noise_rate": 0.5}])
def test_a_condition_resumes_only_in_its_environment(tmp_path, multihop_dir, change):
    """Scenario 4: a condition resumed with another search environment (k, observation length,
    noise, noise seed) is refused naming it; its saved episodes stay."""
    p = load_params(SMOKE, {"output_root": str(tmp_path)})
    run_condition(p, "wiki", ScriptedLLM(_wiki_reply), AgentParams(max_turns=3), task="hotpotqa-wiki", n=2)
    path = p.run_dir / "eval" / "wiki.jsonl"
    before = path.read_text()
    sp = SearchParams(**change)
    with pytest.raises(keys.StaleOutputError, match=rf"wiki.jsonl was made with other settings \(.*search\.{next(iter(change))} "):
        run_condition(p, "wiki", ScriptedLLM(_wiki_reply), AgentParams(max_turns=3), sp, task="hotpotqa-wiki", n=3)
    assert path.read_text() == before
    # another model answering (a script of another name) is another condition too
    with pytest.raises(keys.StaleOutputError, match=r"\(model name:scripted -> name:other\)"):
        run_condition(p, "wiki", ScriptedLLM(_wiki_reply, name="other"), AgentParams(max_turns=3),
                      task="hotpotqa-wiki", n=3)
    # the same condition extends to more questions, reusing its own
    assert len(run_condition(p, "wiki", ScriptedLLM(_wiki_reply), AgentParams(max_turns=3, batch_size=1),
                             task="hotpotqa-wiki", n=3)) == 3
    assert json.loads(before.splitlines()[0]) in [json.loads(x) for x in path.read_text().splitlines()]
