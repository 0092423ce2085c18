"""The notebooks: committed clean, parameterised by literals only, and the whole chain runs.

The chain test executes every notebook in order with params/smoke.yaml through papermill
(`chain.run_chain`, once per module) into a temporary output root and checks the artifacts.
It takes a few minutes on a 2-core CPU.
"""

import ast
import json
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from servers import downloaded_data

from fireact_utils import rl
from fireact_utils.browser import anchor
from fireact_utils.chain import NOTEBOOK_DIR, NOTEBOOKS, chain_kernel, run_chain
from fireact_utils.config import load_params
from fireact_utils.failures import CLASSES
from fireact_utils.holdout import question_key, reserved_keys
from fireact_utils.pipeline import SEARCHING
from fireact_utils.tables import condition_label

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "params" / "smoke.yaml"
PARAM_NAMES = ["params_file", "overrides"]
FAKE_KEYS = {"OPENAI_API_KEY": "sk-fake-0penai-Zq81xT", "SERPAPI_API_KEY": "serp-fake-Kx93pL2w"}


def _nb(name: str):
    return nbformat.read(str(NOTEBOOK_DIR / f"{name}.ipynb"), as_version=4)


def _params_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell tagged 'parameters'"
    return cells[0]


def test_all_notebooks_present():
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
    nb = _nb(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, f"{name}: cell {c.id} has outputs"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_parameters_cell_is_literals(name):
    nb = _nb(name)
    cell = _params_cell(nb)
    body = ast.parse(cell.source).body
    assert [t.id for s in body for t in s.targets] == PARAM_NAMES
    for s in body:
        ast.literal_eval(s.value)  # literals only: papermill replaces them as text
    assert all("#" in line for line in cell.source.splitlines()), "each parameter has a trailing help comment"
    nxt = nb.cells[nb.cells.index(cell) + 1]
    assert "load_params(params_file, overrides)" in nxt.source, "the next cell resolves them through the schema"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_papermill_sees_parameters(name):
    import papermill as pm

    found = pm.inspect_notebook(str(NOTEBOOK_DIR / f"{name}.ipynb"))
    assert list(found) == PARAM_NAMES
    assert all(found[k]["help"] for k in PARAM_NAMES)


def test_walkthrough_tool_counters_hold_only_their_own_calls(monkeypatch, data_dir):
    """Notebook 00's code cells run in order, its model scripted (search once, then answer): the tool
    called by hand counts that one call, the agent's tool only the agent's own searches."""
    from scripted import ScriptedLLM

    from fireact_utils import pipeline

    def reply(text: str) -> str:
        if "Observation:" in text.rsplit("Question:", 1)[1]:
            return "Thought: I know it now.\nAction: finish[Paris]"
        return "Thought: I should look it up.\nAction: search[Irene Jacob]"

    monkeypatch.setattr(pipeline, "local_llm", lambda p, trained=None: ScriptedLLM(reply))
    ns: dict = {}
    for cell in _nb("00_walkthrough").cells:
        if cell.cell_type == "code":
            params = "parameters" in cell.metadata.get("tags", [])
            exec(f"params_file = {str(REPO / 'params' / 'cpu.yaml')!r}\noverrides = []" if params else cell.source, ns)
    assert ns["by_hand"].stats()["calls"] == 1
    agent_searches = 1 + sum(s["action"] == "search" for s in ns["record"]["steps"])  # agent.step's, the episode's
    assert agent_searches == 2 and ns["search"].stats()["calls"] == agent_searches


# ---------------------------------------------------------------- the chain


@pytest.fixture(scope="module")
def chain(tmp_path_factory, data_dir, multihop_dir):
    """The smoke chain on data as a fresh machine gets them: the kit's downloader fills empty dirs
    from a loopback server (`servers.downloaded_data`), and the chain's params name those dirs."""
    data, hop = downloaded_data(tmp_path_factory.mktemp("fresh"), data_dir, multihop_dir)
    overrides = [f"output_root={tmp_path_factory.mktemp('runs')}", f"data_dir={data}", f"multihop_dir={hop}"]
    t0 = time.time()
    with pytest.MonkeyPatch.context() as mp:
        # One torch thread per kernel: on a shared 2-core machine, two spinning OpenMP threads
        # made each generate() call 10-18x slower (measured: 72 s vs 8.6 s for the same batch).
        mp.setenv("OMP_NUM_THREADS", "1")
        # Fake keys in the environment must never reach any output file (see test_no_secrets_in_outputs).
        for var, key in FAKE_KEYS.items():
            mp.setenv(var, key)
        run_dir = run_chain(SMOKE, overrides, html=True)
    print(f"\nsmoke chain: {time.time() - t0:.0f}s")
    return load_params(SMOKE, overrides), run_dir


def _conditions(csv: Path, column: str = "condition") -> set:
    df = pd.read_csv(csv)
    assert len(df) > 0 and df["em"].between(0, 1).all()
    return set(df[column])


@pytest.mark.slow
def test_chain_executes_every_notebook(chain):
    _, run_dir = chain
    for nb in NOTEBOOKS:
        executed = run_dir / "notebooks" / f"{nb}.ipynb"
        assert executed.is_file() and (run_dir / "notebooks" / f"{nb}.html").stat().st_size > 0
        cells = nbformat.read(str(executed), as_version=4).cells
        done = json.loads((run_dir / "notebooks" / f"{nb}.done").read_text())
        assert done["kernel"] == chain_kernel()  # `fireact` once `make setup` registered it
        assert any("injected-parameters" in c.metadata.get("tags", []) for c in cells)
        assert not [o for c in cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]


@pytest.mark.slow
def test_chain_dataset_and_model(chain):
    p, run_dir = chain
    card = json.loads((run_dir / "dataset" / "card.json").read_text())
    assert card["n"] == p.dataset.n_trajectories
    done = json.loads((run_dir / "finetune" / "final" / "train_done.json").read_text())
    assert done["n_examples"] == p.dataset.n_trajectories
    assert len(pd.read_csv(run_dir / "finetune" / "train_log.csv")) == p.train.max_steps


@pytest.mark.slow
def test_chain_eval_records(chain):
    p, run_dir = chain
    files = sorted((run_dir / "eval").glob("*.jsonl"))
    base = {f"base_fewshot_{m}" for m in p.evaluate.methods} | {SEARCHING}
    assert p.evaluate.searching_baseline  # the smoke run has the baseline that must search
    grid = [(k, r) for k in p.study.noise_kinds for r in p.study.noise_rates]
    assert p.study.noisy_fewshot  # the prompted agents under noise too; the one that must search on the main task
    noisy = {f"{who}_react_noise_{k}_{r:g}" for who in ("finetuned", "base_fewshot", "base_fewshot_searching")
             for k, r in grid}  # the main task (replay)
    wiki_noisy = {f"{who}_react_{t}_noise_{k}_{r:g}" for who in ("finetuned", "base_fewshot")
                  for t in p.study.noise_tasks if t != p.evaluate.task
                  for k, r in grid}  # the Wikipedia environment
    gen = {f"gen_{t}_{s}" for t in p.study.generalization_tasks for s in ("base", "ft")}
    scaling = {f"scaling_n{n}" for n in p.study.data_sizes}
    select = {f"recipe_{r}" for r in p.study.recipes} | {f"fewshot_{v}" for v in p.study.fewshot_variants}
    seeds = {f"finetuned_react_seed{s}" for s in p.study.seeds if s != p.train.seed}
    sc_whos = ["fewshot", "finetuned"] + [f"finetuned_seed{s}" for s in p.study.seeds if s != p.train.seed]
    assert p.study.sc_seeds and len(sc_whos) == 3  # the smoke run votes with every training seed
    sc = {f"sc_{who}_s{j}" for who in sc_whos for j in range(max(p.study.sc_ks))}
    si = {f"si_r{r}_s{j}" for r in range(1, p.self_improve.rounds + 1) for j in range(p.self_improve.k)}
    students = [f"si_round{r}" for r in range(1, p.self_improve.rounds + 1)] + [
        f"si_control{r}" for r in p.self_improve.controls]
    beyond_val = {"sft_val", "rl_val"} | {f"{s}_val" for s in students}
    beyond_test = {"rl_test"} | {f"{s}_test" for s in students}
    assert wiki_noisy and select and seeds and sc and si
    assert {f.stem for f in files} == (base | {"finetuned_react"} | noisy | wiki_noisy | gen | scaling | select
                                       | seeds | sc | si | beyond_val | beyond_test)
    for f in files:
        ids = [json.loads(line)["id"] for line in f.read_text().splitlines()]
        wiki = f.stem in wiki_noisy | gen | select | si | beyond_val
        n = {**dict.fromkeys(wiki_noisy | gen, p.study.generalization_n),
             **dict.fromkeys(select | beyond_val, p.study.select_n), **dict.fromkeys(sc, p.study.sc_n),
             **dict.fromkeys(si, p.self_improve.n_questions)}.get(f.stem, p.evaluate.n_questions)
        assert len(ids) == len(set(ids)) == n, f.name
        if f.stem in select | beyond_val:
            assert all("/val/" in i for i in ids), f.name
        if f.stem in si:
            assert all(i.startswith("hotpotqa-wiki/train/") for i in ids), f.name
        meta = json.loads(f.with_suffix(".meta.json").read_text())
        assert meta["environment"]["search"] in (("wiki",) if wiki else ("recorded", "none")), f.name
        assert ("fidelity" in meta) == wiki, f.name


@pytest.mark.slow
def test_chain_tables(chain):
    p, run_dir = chain
    tables = run_dir / "tables"
    main = {condition_label(f"base_fewshot_{m}") for m in p.evaluate.methods} | {
        condition_label("finetuned_react"), condition_label(SEARCHING)}
    assert _conditions(tables / "main.csv") == main
    assert (tables / "main.md").read_text().startswith("| condition")
    table = pd.read_csv(tables / "main.csv")  # what each EM is made of: question types, tool use, the modal answer
    assert {"em_two_option", "em_open", "searched", "searches_per_episode", "top_answer_count"} <= set(table.columns)
    assert (table["n_two_option"].fillna(0) + table["n_open"].fillna(0) == table["n"]).all()
    answered = [r for r in map(json.loads, (run_dir / "eval" / f"{SEARCHING}.jsonl").read_text().splitlines())
                if r["answer"] is not None]
    assert all(any(s["action"] == "search" for s in r["steps"]) for r in answered)  # an answer only after a search
    assert "two-option: chance 50%" in (tables / "main.md").read_text()
    noisy = {condition_label(f"{who}_react_noise_{k}_{r:g}") for who in ("finetuned", "base_fewshot", "base_fewshot_searching")
             for k in p.study.noise_kinds for r in p.study.noise_rates}
    react = {condition_label("base_fewshot_react"), condition_label(SEARCHING), condition_label("finetuned_react")}
    assert _conditions(tables / "robustness.csv") == react | noisy
    robust = pd.read_csv(tables / "robustness.csv").set_index("condition")  # corrupted counts, paired vs clean
    assert (robust.loc[list(noisy), "noise_corrupted"] >= 0).all() and robust.loc[list(noisy), "vs_clean"].notna().all()
    assert (robust["too_few_corrupted"] == (robust["noise_corrupted"] < 20)).all()
    wiki_noisy = {condition_label(f"{who}_react_hotpotqa-wiki_noise_{k}_{r:g}") for who in ("finetuned", "base_fewshot")
                  for k in p.study.noise_kinds for r in p.study.noise_rates}
    wiki_clean = {condition_label(f"gen_hotpotqa-wiki_{s}") for s in ("base", "ft")}
    assert _conditions(tables / "robustness_hotpotqa-wiki.csv") == wiki_clean | wiki_noisy
    outcomes = pd.read_csv(tables / "wiki_outcomes.csv")
    select = {condition_label(f"recipe_{r}") for r in p.study.recipes} | {
        condition_label(f"fewshot_{v}") for v in p.study.fewshot_variants}  # notebook 02's choices, on wiki val
    assert set(outcomes["condition"]) == wiki_clean | wiki_noisy | select
    counts = outcomes[["correct", "saw evidence, wrong answer", "missed evidence", "never finished"]].sum(axis=1)
    assert (counts == outcomes["condition"].map(lambda c: p.study.select_n if c in select
                                                 else p.study.generalization_n)).all()
    fails = pd.read_csv(tables / "failures.csv")  # one failure class per episode (notebook 03)
    assert set(fails["condition"]) == main and (fails[list(CLASSES)].sum(axis=1) == fails["n"]).all()
    changed = pd.read_csv(tables / "what_changed.csv")
    assert changed["n"].sum() == p.evaluate.n_questions  # few-shot ReAct -> fine-tuned, paired by id
    gain = json.loads((tables / "paired_gain.json").read_text())
    assert gain["n"] == p.evaluate.n_questions and gain["lo"] <= gain["gain"] <= gain["hi"]
    assert _conditions(tables / "data_scaling.csv", "n_trajectories") == set(p.study.data_sizes)
    gen = pd.read_csv(tables / "generalization.csv")
    assert set(gen["task"]) == set(p.study.generalization_tasks) and len(gen) == 2 * len(p.study.generalization_tasks)
    assert gen["environment"].str.startswith("wiki: hotpotqa (10,708 paragraphs)").all()
    assert gen["gold_top_rate"].between(0, 1).all() and "[1] wiki: hotpotqa" in (tables / "generalization.md").read_text()
    summary = pd.read_csv(tables / "summary_vs_paper.csv")
    assert {"this run", "FireAct released run", "FireAct paper"} <= set(summary["source"])
    assert not (tables / "mixtures.csv").exists()  # study.mixtures is empty in smoke: skipped
    for which in ("recipes", "fewshot_variants"):
        sel = pd.read_csv(tables / f"{which}_selection.csv")
        assert list(sel["condition"]) == list(getattr(p.study, which)) and sel["chosen"].sum() == 1
        chosen = json.loads((tables / f"{which}_chosen.json").read_text())
        assert chosen["overrides"] == getattr(p.study, which)[chosen["label"]] and chosen["split"] == "val"
    seeds = pd.read_csv(tables / "headline_seeds.csv")
    assert list(seeds["condition"]) == [f"seed {s}" for s in p.study.seeds] + [f"mean over {len(p.study.seeds)} seeds"]
    mean = seeds.iloc[-1]  # its paired gain over few-shot ReAct, on the same questions
    assert mean["gain_lo"] <= mean["gain"] <= mean["gain_hi"] and pd.isna(seeds["gain"].iloc[0])
    sc = pd.read_csv(tables / "self_consistency.csv")
    agents = ["fewshot ReAct", *(f"finetuned ReAct, seed {s}" for s in p.study.seeds),
              f"finetuned ReAct, mean over {len(p.study.seeds)} seeds"]
    assert list(zip(sc["agent"], sc["k"], strict=True)) == [(a, k) for a in agents for k in p.study.sc_ks]
    mean = sc[sc["agent"] == agents[-1]]
    assert (mean["em_seed_min"] <= mean["em"]).all() and (mean["em"] <= mean["em_seed_max"]).all()
    assert ((mean["gain_lo"] <= mean["gain"]) & (mean["gain"] <= mean["gain_hi"])).all()  # over few-shot's vote
    assert (sc.groupby("agent")["tokens_per_question"].diff().dropna() > 0).all()  # more samples cost more
    si = pd.read_csv(tables / "self_improve.csv")  # notebook 05
    assert list(si["round"]) == [0, 1, 1] and list(si["control"]) == [False, False, True]  # round 1 and its control
    assert si.loc[2, "steps"] == si.loc[1, "steps"] == p.train.max_steps and si.loc[2, "train_s"] > 0
    n_examples = {d: json.loads((run_dir / d / "final" / "train_done.json").read_text())["n_examples"]
                  for d in ("finetune", "self_improve/round1", "self_improve/control1")}
    assert n_examples["self_improve/control1"] == n_examples["finetune"]  # the control: GPT-4 data only
    assert n_examples["self_improve/round1"] == n_examples["finetune"] + si.loc[1, "added"]
    assert (si["val_n"] == p.study.select_n).all() and (si["test_n"] == p.evaluate.n_questions).all()
    assert si.loc[0, "val_gain"] == 0 and (si["episodes"].dropna() == p.self_improve.n_questions * p.self_improve.k).all()
    own = [json.loads(line)["question"] for line in (run_dir / "self_improve" / "round1" / "trajectories.jsonl")
           .read_text().splitlines()]
    assert len(own) == si.loc[1, "added"] and not {question_key(q) for q in own} & reserved_keys(p)
    rl_table = pd.read_csv(tables / "rl.csv")
    assert list(rl_table["model"]) == ["SFT student", f"GRPO, {p.rl.steps} steps"]
    assert (rl_table["val_em"].iloc[0], rl_table["test_em"].iloc[0]) == (si["val_em"].iloc[0], si["test_em"].iloc[0])
    curve = pd.read_csv(tables / "rl_curve.csv")
    assert list(curve["step"]) == list(range(p.rl.steps))
    assert (curve["episodes"] == p.rl.questions_per_step * p.rl.num_generations).all()
    assert curve["masked_tokens"].between(0, 1).all()
    assert json.loads((run_dir / "rl" / "final" / "rl_done.json").read_text())["params"]["steps"] == p.rl.steps
    # A finished GRPO run is reused only for the same rl params and SFT student, never relabelled.
    student = run_dir / "finetune" / "final"
    assert rl.train_grpo(p, student) == run_dir / "rl" / "final"
    more = p.model_copy(update={"rl": p.rl.model_copy(update={"steps": p.rl.steps + 1})})
    for other, sft, named in ((more, student, rf"rl\.steps {p.rl.steps} -> {p.rl.steps + 1}"),
                              (p, run_dir / "self_improve" / "round1" / "final", "student")):
        with pytest.raises(ValueError, match=f"made with other settings .*{named}"):
            rl.train_grpo(other, sft)


@pytest.mark.slow
def test_chain_figures(chain):
    p, run_dir = chain
    for stem in ("loss_curve", "prompting_vs_finetuned", "efficiency", "failures", "robustness", "robustness_hotpotqa-wiki",
                 "data_scaling", "generalization", "outcomes", "recipes_selection", "fewshot_variants_selection",
                 "self_consistency", "self_improve", "rl_curve"):
        for ext in ("png", "svg"):
            f = run_dir / "figures" / f"{stem}.{ext}"
            assert f.is_file() and f.stat().st_size > 1000, f
    page = (run_dir / "browser.html").read_text()  # notebook 03's episode browser: the run's episodes so far
    main = [f"base_fewshot_{m}" for m in p.evaluate.methods] + [SEARCHING, "finetuned_react"]
    assert all(f'id="{anchor(c, json.loads(line)["id"])}"' in page
               for c in main for line in (run_dir / "eval" / f"{c}.jsonl").read_text().splitlines())


@pytest.mark.slow
def test_no_secrets_in_outputs(chain):
    """Keys set in the environment appear in no params dump, log, trajectory, notebook or HTML."""
    _, run_dir = chain
    files = [f for f in run_dir.rglob("*") if f.is_file()]
    assert len(files) > 20
    for f in files:
        data = f.read_bytes()
        for key in FAKE_KEYS.values():
            assert key.encode() not in data, f"{key} leaked into {f}"


@pytest.mark.slow
def test_chain_resumes_at_first_unfinished_notebook(chain, capsys):
    """A chain killed during notebook 04 re-runs 04 only; 00-03 are skipped by their markers."""
    p, run_dir = chain
    nb_dir = run_dir / "notebooks"
    (nb_dir / f"{NOTEBOOKS[-1]}.done").unlink()
    before = {nb: (nb_dir / f"{nb}.ipynb").stat().st_mtime for nb in NOTEBOOKS}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        run_chain(SMOKE, [f"output_root={p.output_root}", f"data_dir={p.data_dir}", f"multihop_dir={p.multihop_dir}"],
                  html=False)
    out = capsys.readouterr().out
    assert out.count("[skip]") == len(NOTEBOOKS) - 1 and f"[done] {NOTEBOOKS[-1]}" in out
    after = {nb: (nb_dir / f"{nb}.ipynb").stat().st_mtime for nb in NOTEBOOKS}
    assert all(after[nb] == before[nb] for nb in NOTEBOOKS[:-1]) and after[NOTEBOOKS[-1]] > before[NOTEBOOKS[-1]]
    assert (nb_dir / f"{NOTEBOOKS[-1]}.done").is_file()
