"""The params schema: precedence, validation messages naming the key, secrets."""

from pathlib import Path

import pytest

from fireact_utils.config import ParamsError, data_dir, load_params


def test_precedence_schema_yaml_overrides(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("train:\n  epochs: 3\n  learning_rate: 2.0e-4\nagent:\n  max_turns: 5\n")
    p = load_params(f, ["train.epochs=1", "evaluate.methods=[react]"])
    assert p.name == "x"  # defaults to the file stem
    assert p.train.epochs == 1 and p.train.learning_rate == 2e-4  # override beats YAML beats schema
    assert p.agent.max_turns == 5 and p.agent.max_new_tokens == 128
    assert p.evaluate.methods == ["react"]
    assert load_params(None, {"train.method": "full"}).train.method == "full"


def test_a_mapping_override_replaces_the_files_mapping(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("study:\n  recipes:\n    a: {train.lora_r: 4}\n    b: {train.lora_r: 8}\n")
    assert list(load_params(f).study.recipes) == ["a", "b"]
    p = load_params(f, ["study.recipes={c: {train.lora_r: 2}}"])
    assert p.study.recipes == {"c": {"train.lora_r": 2}}
    assert load_params(f, ["study.recipes={}"]).study.recipes == {}


@pytest.mark.parametrize("text, key", [
    ("trian:\n  epochs: 1\n", "trian"),
    ("train:\n  epocs: 1\n", "train.epocs"),
    ("train:\n  epochs: many\n", "train.epochs"),
    ("agent:\n  method: tot\n", "agent.method"),
    ("search:\n  noise_rate: 1.5\n", "search.noise_rate"),
    ("dataset:\n  mixture: {hotpotqa: 3}\n", "dataset.mixture"),
])
def test_bad_params_name_the_key(tmp_path, text, key):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        load_params(f)


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    (tmp_path / "b.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ParamsError, match="malformed YAML"):
        load_params(tmp_path / "b.yaml")
    with pytest.raises(ParamsError, match="key.sub=value"):
        load_params(None, ["train.epochs"])
    with pytest.raises(ParamsError, match="environment variable"):
        load_params(None, {"llm.api_key_env": "sk-abc123"})


def test_every_params_file_loads():
    from fireact_utils.config import REPO_ROOT

    files = sorted((REPO_ROOT / "params").glob("*.yaml"))
    assert {"cpu.yaml"} <= {f.name for f in files}
    for f in files:
        assert load_params(f).name == f.stem


def test_base_file_holds_the_shared_part(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  epochs: 3\n  method: full\nagent:\n  max_turns: 5\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain:\n  epochs: 1\n")
    p = load_params(tmp_path / "b.yaml", ["agent.max_turns=4"])
    assert p.name == "b"  # a variant is its own run
    assert (p.train.epochs, p.train.method, p.agent.max_turns) == (1, "full", 4)
    (tmp_path / "c.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ParamsError, match="circular"):
        load_params(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ParamsError, match="missing.yaml"):
        load_params(tmp_path / "d.yaml")
    full, demo = load_params("params/cpu_full.yaml"), load_params("params/cpu.yaml")
    assert full.train == demo.train and full.agent == demo.agent and full.study.data_sizes
    assert full.evaluate == demo.evaluate.model_copy(update={"n_questions": 500})  # the long study: all of dev-500


def test_data_dir_errors_name_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("FIREACT_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="FIREACT_DATA_DIR"):
        data_dir()
    assert data_dir(tmp_path) == tmp_path.resolve()


def test_generate_defaults_name_a_split_their_tasks_have(data_dir):
    """The teacher's default questions load: FireAct's HotpotQA has no train split."""
    from fireact_utils.config import GenerateParams
    from fireact_utils.tasks import load_task

    g = GenerateParams()
    for task in g.tasks:
        assert len(load_task(task, g.split, data_dir).questions) > 500


def test_a_notebook_shows_params_as_what_the_run_sets():
    """`p` in a notebook cell (IPython's pretty printer) lists the run's differences from the schema
    (nested sections and dict fields included), not the ~2,800-character model repr."""
    from IPython.lib.pretty import pretty

    p = load_params(Path(__file__).resolve().parent.parent / "params" / "cpu.yaml", {"generate.teacher.model": "gpt-4o"})
    shown = pretty(p)
    assert shown.splitlines()[0].startswith("Params of run 'cpu'") and len(shown) < 600 < len(repr(p))
    assert "  train.method = 'full'" in shown and "  generate.teacher.model = 'gpt-4o'" in shown
    assert "  evaluate.searching_baseline = {'agent.n_exemplars': 3}" in shown
    assert "train.learning_rate" not in shown  # cpu.yaml sets the schema's own value


@pytest.mark.parametrize("name, decoding, training", [
    ("cpu.yaml", "auto", "float32"),            # auto decoding (fp32 on CPU, bf16 on GPU), fp32 master weights
    ("paper.yaml", "bfloat16", "bfloat16"),     # Llama-2-7B: bf16 both ways, as when model.dtype set both
    ("cpu_vote.yaml", "bfloat16", "float32"),   # bf16 sampling; seeds train in fp32 masters as cpu_full's
    ("gpu_headline.yaml", "float32", "float32"),
    ("headline_gpu.yaml", "float32", "float32"),
])
def test_decoding_and_training_dtypes_are_separate_fields(name, decoding, training):
    """model.dtype is the decoding dtype, train.dtype the fine-tune's weights; each params file keeps
    the meaning it had when model.dtype set both (training "auto" was fp32 masters)."""
    from fireact_utils.config import REPO_ROOT

    p = load_params(REPO_ROOT / "params" / name)
    assert (p.model.dtype, p.train.dtype) == (decoding, training)
    with pytest.raises(ParamsError, match=r"train\.dtype"):  # training has no device-dependent auto
        load_params(None, {"train.dtype": "auto"})


def test_the_gpu_headline_differs_from_the_preregistered_one_only_where_no_number_changes():
    """headline_gpu.yaml runs headline.yaml's pre-registered settings on a GPU: a setting that moves a
    number (recipe, seeds, vote, decoding dtype, questions) must not differ."""
    from fireact_utils.config import REPO_ROOT

    runs = [load_params(REPO_ROOT / "params" / f) for f in ("headline.yaml", "headline_gpu.yaml")]
    cpu, gpu = (p.changed() for p in runs)
    differs = {k for k in cpu.keys() | gpu.keys() if cpu.get(k) != gpu.get(k)}
    # model.dtype: headline.yaml's auto decodes in fp32 on the CPU it was fixed on; on a GPU auto is bf16
    assert differs == {"name", "model.dtype", "agent.batch_size", "train.gradient_checkpointing"}
    assert [p.model.dtype for p in runs] == ["auto", "float32"] and gpu["study.preregistered"]
