"""Every notebook's exercises run as written. Their code is in fenced blocks of the `## Exercises`
cell: `bash` blocks hold `python -m fireact_utils` commands, `python` blocks code for a new cell of the
notebook. Each command parses with the CLI's own parser and resolves its params (an unknown key fails
here); each exercise writes to a run of its own, never the demo's; each says what to expect; each
Python block uses only names the notebook defines and the library has. The exercises that need no
model run here on a demo run made by the real stages with a scripted model: the forks, the
comparison of two runs (the sampled agent's episodes come from the exercise's own `evaluate`
command, its model scripted), notebook 02's summary and loss mask, and notebook 05's sampling.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import re
import shlex
import textwrap
from pathlib import Path

import nbformat
import pytest
from scripted import ScriptedLLM

from fireact_utils.chain import NOTEBOOK_DIR, NOTEBOOKS
from fireact_utils.cli import _parser, main
from fireact_utils.config import load_params

REPO = Path(__file__).resolve().parent.parent
DEMO = "params/cpu.yaml"  # the notebooks' params file: every exercise extends its run
DEMO_RUN = "outputs/runs/cpu"
WRITES_NOTHING = {"00_walkthrough"}  # one episode in memory: no file of the demo's run to protect
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)
LIBRARY = {"failures", "pipeline", "plots", "recipes", "rl", "self_improve", "studies", "summaries", "tables"}


def _exercises(nb: str) -> str:
    cells = [c.source for c in nbformat.read(str(NOTEBOOK_DIR / f"{nb}.ipynb"), as_version=4).cells
             if c.cell_type == "markdown" and c.source.startswith("## Exercises")]
    assert len(cells) == 1, f"{nb}: one '## Exercises' cell"
    return cells[0]


def _blocks(nb: str, lang: str) -> list[str]:
    return [textwrap.dedent(code) for kind, code in BLOCK.findall(_exercises(nb)) if kind == lang]


def _commands(nb: str) -> list[list[str]]:
    """Each bash line of the exercises as the CLI's argv (continuations joined)."""
    out = []
    for block in _blocks(nb, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                assert words[:3] == ["python", "-m", "fireact_utils"], f"{nb}: {line}"
                out.append(words[3:])
    return out


def _parse(argv: list[str]):
    """(args, overrides) as `cli.main` reads them: overrides may follow the flags."""
    args, extra = _parser().parse_known_args(argv)
    assert not [a for a in extra if a.startswith("-")], f"unknown flags in {argv}"
    return args, [*getattr(args, "overrides", []), *extra]


def _defined(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_each_exercise_says_what_to_expect(nb):
    text = _exercises(nb)
    n = len(re.findall(r"^\d+\. \*\*", text, re.M))
    assert n >= 1 and text.count("**Expected:**") == n, f"{nb}: {n} exercises, each with an **Expected:** outcome"
    assert _blocks(nb, "bash") or _blocks(nb, "python"), f"{nb}: exercise code in fenced blocks"


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_commands_parse_and_write_runs_of_their_own(nb):
    """A command with params resolves them and names a run other than the demo's; a fork copies the
    demo's run into a new one, and the commands after it run under that fork's name."""
    demo = load_params(REPO / DEMO)
    forked = None
    for argv in _commands(nb):
        args, overrides = _parse(argv)
        if args.cmd == "fork":
            src, dest = Path(args.src), Path(args.dest)
            assert str(src) == DEMO_RUN and dest.parent == src.parent and dest.name != src.name, argv
            forked = dest.name
        elif args.cmd == "compare":
            assert args.run_a == DEMO_RUN and Path(args.run_b).name != demo.name, argv
        else:
            p = load_params(REPO / args.params_file, overrides)  # unknown keys and wrong types fail here
            assert args.params_file == DEMO and p.name != demo.name, f"{argv} writes into the demo's run"
            if forked and args.cmd in ("run", "sweeps"):
                assert p.name == forked, f"{argv} does not run in the fork {forked}"
            if getattr(args, "trained", None):
                assert args.trained == f"{DEMO_RUN}/finetune/final", argv


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_python_blocks_use_what_the_notebook_defines(nb):
    """Each block compiles; every name it reads is defined in the notebook (or by the block, or a
    builtin); every `module.attribute` of the library exists; an `overrides` list resolves and, where
    the notebook writes files, names a run of its own."""
    cells = nbformat.read(str(NOTEBOOK_DIR / f"{nb}.ipynb"), as_version=4).cells
    known = set().union(*(_defined(ast.parse(c.source)) for c in cells if c.cell_type == "code"))
    known |= set(dir(builtins)) | {"display"}  # IPython's
    for block in _blocks(nb, "python"):
        tree = ast.parse(block)
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        assert used <= known | _defined(tree), f"{nb}: {used - known - _defined(tree)} not defined in the notebook"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in LIBRARY:
                module = importlib.import_module(f"fireact_utils.{node.value.id}")
                assert hasattr(module, node.attr), f"{nb}: fireact_utils.{node.value.id}.{node.attr}"
        if block.startswith("overrides = "):
            overrides = ast.literal_eval(block.split("=", 1)[1].strip())
            p = load_params(REPO / DEMO, overrides)
            assert nb in WRITES_NOTHING or p.name != load_params(REPO / DEMO).name, f"{nb}: {overrides}"


# ---------------------------------------------------------------- run on a scripted demo run


def _gold_reply(gold: dict[str, str], right: set[str]):
    """Answers the question of a prompt (found among `gold`'s) with its gold answer when it is in `right`."""
    def reply(text: str) -> str:
        q = next(q for q in gold if q in text)
        return f"Thought: I know it.\nAction: finish[{gold[q] if q in right else 'no idea'}]"

    return reply


def _relocated(argv: list[str], root: Path) -> list[str]:
    """The command with its run paths under `root` instead of the repository's outputs/runs, and
    `output_root` pointed there where it takes params."""
    out = [a.replace("outputs/runs", str(root)) if a.startswith("outputs/runs") else a for a in argv]
    args, _ = _parse(out)
    return [*out, f"output_root={root}"] if hasattr(args, "params_file") else out


@pytest.fixture
def demo_run(tmp_path, data_dir):
    """The demo's run at <tmp>/cpu: notebook 03's fine-tuned condition on its 100 questions (the
    agent loop on a scripted model, right on every third question), as `make demo` leaves it."""
    from fireact_utils.pipeline import condition_questions, finetuned_agent, run_condition

    p = load_params(REPO / DEMO, [f"output_root={tmp_path}"])
    task, idx = condition_questions(p)
    gold = {task.questions[i]: task.answers[i] for i in idx}
    run_condition(p, "finetuned_react", ScriptedLLM(_gold_reply(gold, set(list(gold)[::3]))), finetuned_agent(p),
                  progress=False)
    return p, gold


@pytest.mark.parametrize("nb", ["03_evaluate", "04_scaling_and_robustness"])
def test_commands_that_need_no_model_run(nb, demo_run, tmp_path, monkeypatch, capsys):
    """The forks, notebook 03's sampled evaluation (its model scripted: right on every fourth
    question) and the comparison of the two runs, paired by question id: the gain `compare` prints is
    `tables.paired_gain` of the two conditions read in the order their episodes finished."""
    import fireact_utils.llm
    from fireact_utils import tables
    from fireact_utils.evaluate import fmt_gain
    from fireact_utils.io import read_jsonl

    p, gold = demo_run
    monkeypatch.setattr(fireact_utils.llm, "make_llm", lambda *a, **k: ScriptedLLM(_gold_reply(gold, set(list(gold)[::4]))))
    ran = []
    for argv in _commands(nb):
        args, _ = _parse(argv)
        if args.cmd in ("fork", "evaluate", "compare"):  # `run`, `sweeps`: the notebook chain and models
            assert main(_relocated(argv, tmp_path)) == 0, argv
            ran.append(args.cmd)
            if args.cmd == "fork":
                assert (tmp_path / Path(args.dest).name / "eval" / "finetuned_react.jsonl").is_file()
    assert ran == (["fork", "evaluate", "compare"] if nb == "03_evaluate" else ["fork", "fork"])
    if nb == "03_evaluate":
        a, b = (read_jsonl(tmp_path / run / "eval" / "finetuned_react.jsonl") for run in ("cpu", "ex03_t04"))
        gain = tables.paired_gain(p, {"greedy": a, "sampled": b[::-1]}, "greedy", "sampled", save=False)
        assert gain["n"] == 100 and gain["gain"] == pytest.approx(25 / 100 - 34 / 100)  # 25 and 34 of 100 right
        assert f"gain {fmt_gain(gain['gain'], gain['lo'], gain['hi'])}" in capsys.readouterr().out
    assert not (tmp_path / "cpu" / "tables").exists()  # the demo's run is left as it was


def test_notebook_02_blocks_run(tmp_path, data_dir, model_path):
    """The LoRA run's summary (its fine-tune's records written by the trainer's own log writer) and
    the loss mask with loss on every token: more tokens carry loss than with the agent's alone."""
    from IPython.display import Markdown
    from transformers import AutoTokenizer

    from fireact_utils import plots, summaries
    from fireact_utils.config import TrainParams
    from fireact_utils.data import load_fireact
    from fireact_utils.io import atomic_write_json
    from fireact_utils.train import IGNORE, _write_log, build_dataset

    p = load_params(REPO / DEMO, [f"output_root={tmp_path}"])
    summary, mask = _blocks("02_finetune", "python")
    tp = TrainParams(method="lora", learning_rate=3e-4, logging_steps=5)
    out = tmp_path / "ex02_lora" / "finetune"
    _write_log(out, [{"step": s, "epoch": s / 63, "loss": 2.0 - s / 200} for s in range(5, 189, 5)])
    atomic_write_json(out / "final" / "train_done.json", {
        "params": tp.model_dump(mode="json"), "model": {"name": "smollm2-135m"}, "n_examples": 500,
        "n_tokens": 291_000, "n_loss_tokens": 120_500, "train_runtime_s": 1098.0, "peak_memory_gb": 6.2,
        "peak_memory_of": "process RSS", "tokens_per_s": 265.0})
    shown = eval(summary, {"Markdown": Markdown, "summaries": summaries, "p": p})  # noqa: S307 - the notebook's code
    assert "LoRA r=16" in shown.data and "peak memory 6.2 GB" in shown.data
    records, tok = load_fireact("hotpotqa", data_dir=data_dir)[:1], AutoTokenizer.from_pretrained(model_path)
    ns = {"build_dataset": build_dataset, "records": records, "tok": tok, "p": p, "plots": plots}
    exec(mask, ns)  # noqa: S102 - the notebook's code
    agent = build_dataset(records, tok, p.train)[0]
    loss = [sum(label != IGNORE for label in ex["labels"]) for ex in (agent, ns["everything"])]
    assert loss[0] < loss[1] == len(ns["everything"]["input_ids"])


def test_notebook_05_sampling_runs(tmp_path, multihop_dir, monkeypatch):
    """Exercise 1's three lines with the student scripted (right on every fifth training question):
    40 episodes in the exercise's own run, their yield, the questions solved and the successes kept."""
    from fireact_utils import self_improve
    from fireact_utils.config import load_params as load
    from fireact_utils.tasks import eval_indices, load_task

    task = load_task("hotpotqa-wiki", "train", multihop_dir=multihop_dir)
    gold = {task.questions[i]: task.answers[i] for i in eval_indices(task, 20)}  # the 20 a condition samples
    monkeypatch.setattr(self_improve, "local_llm", lambda *a, **k: ScriptedLLM(_gold_reply(gold, set(list(gold)[::5]))))
    block = _blocks("05_beyond_sft", "python")[0]
    *body, last = ast.parse(block).body
    ns = {"load_params": load, "params_file": str(REPO / DEMO), "overrides": [f"output_root={tmp_path}"],
          "self_improve": self_improve, "trained": tmp_path / "student"}
    exec(compile(ast.Module(body=body, type_ignores=[]), "exercise", "exec"), ns)  # noqa: S102
    found, kept = eval(compile(ast.Expression(last.value), "exercise", "eval"), ns)  # noqa: S307
    assert found == {"questions": 20, "episodes": 40, "yield": 0.2, "questions_solved": 0.2}
    assert kept == 4  # the two samples of a question are the same trajectory: kept once
    assert sorted(f.name for f in (tmp_path / "ex05_sample" / "eval").glob("*.jsonl")) == ["si_r1_s0.jsonl",
                                                                                         "si_r1_s1.jsonl"]
