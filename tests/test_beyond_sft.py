"""Notebook 05's stages: self-improvement data stays off validation/test, and GRPO's loss never
reaches the tool's observation tokens (real model, real Wikipedia search, real GRPOTrainer)."""

from pathlib import Path

import pytest

from fireact_utils import holdout, rl, self_improve
from fireact_utils.config import load_params
from fireact_utils.pipeline import finetuned_agent
from fireact_utils.tasks import eval_indices, load_task
from fireact_utils.trajectories import alpaca_prompt

PARAMS = Path(__file__).resolve().parent.parent / "params"


@pytest.mark.parametrize("params_file", ["smoke.yaml", "cpu_full.yaml", "cpu_beyond.yaml", "gpu_rl.yaml"])
def test_training_questions_share_none_with_validation_or_test(params_file, data_dir, multihop_dir):
    p = load_params(PARAMS / params_file, {"data_dir": str(data_dir), "multihop_dir": str(multihop_dir)})
    held = holdout.reserved_keys(p)
    val = load_task("hotpotqa-wiki", "val", data_dir, multihop_dir).questions
    dev = load_task("hotpotqa", "dev", data_dir)
    dev500 = [dev.questions[i] for i in eval_indices(dev, 500, 233)]
    assert {holdout.question_key(q) for q in [*val, *dev500]} <= held  # all of dev-500, whatever n is evaluated
    for section in (p.self_improve, p.rl):
        self_improve.training_questions(p, section)  # passes the guard
        task = load_task(section.task, section.split, data_dir, multihop_dir)
        assert len(task) >= 200 and not {holdout.question_key(q) for q in task.questions} & held
    with pytest.raises(ValueError, match="held-out questions of this run"):
        holdout.check_training(p, ["some new question?", val[3]], "test")
    with pytest.raises(ValueError, match="held-out questions of this run"):  # whitespace and case do not hide one
        holdout.check_training(p, ["  " + dev500[-1].upper()], "test")


def test_self_improvement_refuses_a_split_that_is_validated_on(data_dir, multihop_dir, tmp_path):
    p = load_params(PARAMS / "smoke.yaml", {"data_dir": str(data_dir), "multihop_dir": str(multihop_dir),
                                            "output_root": str(tmp_path), "self_improve.split": "val"})
    with pytest.raises(ValueError, match="held-out questions of this run"):
        self_improve.sample(p, 1, "unused: refused before any model loads")


def _episode(i: int, q: str, reward: bool, answer: str) -> dict:
    steps = [{"thought": "t", "action": "search", "arg": q, "observation": "o"},
             {"thought": "", "action": "finish", "arg": answer, "observation": f"Episode finished, reward = {reward}"}]
    return {"id": f"hotpotqa-wiki/train/{i}", "question": q, "steps": steps, "reward": reward, "task": "hotpotqa-wiki"}


def test_successes_keep_each_distinct_reward_one_trajectory_once():
    runs = [[_episode(0, "Q0", True, "a"), _episode(1, "Q1", False, "b")],
            [_episode(0, "Q0", True, "a"), _episode(1, "Q1", True, "c")],
            [_episode(0, "q0 ", True, "a2"), _episode(1, "Q1", False, "b")]]
    got = self_improve.successes(runs, 2)
    assert [(t["question"], t["steps"][-1]["arg"]) for t in got] == [("Q0", "a"), ("Q1", "c"), ("q0 ", "a2")]
    assert all(t["reward"] is True and t["source"] == "self:round2" and t["method"] == "react" for t in got)


@pytest.fixture
def rl_params(model_path, data_dir, multihop_dir, tmp_path):
    return load_params(PARAMS / "smoke.yaml", {
        "model.name": model_path, "model.device": "cpu", "data_dir": str(data_dir), "multihop_dir": str(multihop_dir),
        "output_root": str(tmp_path), "agent.max_turns": 3, "agent.max_new_tokens": 40, "rl.steps": 1,
        "rl.questions_per_step": 2, "rl.num_generations": 2, "rl.micro_batch": 4, "rl.max_episode_tokens": 400})


def _spans(mask: list[int], value: int) -> list[tuple[int, int]]:
    out, start = [], None
    for i, m in enumerate([*mask, None]):
        if m == value and start is None:
            start = i
        elif m != value and start is not None:
            out.append((start, i))
            start = None
    return out


def test_rollouts_mask_exactly_the_tool_observations(rl_params, model_path):
    """Each env_mask-0 span decodes to one observation the tool returned for that episode (in
    order) or to the "Action:" evaluation asks a Thought without an Action for; everything else is
    the model's own sampled text."""
    import torch

    from fireact_utils.models import load_model
    from fireact_utils.tools import make_search

    torch.manual_seed(0)
    task, ds = rl.training_prompts(rl_params)
    model, tok = load_model(model_path, device="cpu", dtype="float32")
    search = make_search(rl_params.search, rl_params.data_dir, task.corpus, rl_params.multihop_dir)
    roll = rl.Rollouts(finetuned_agent(rl_params), rl_params.rl, task, search, tok)
    _check_masks(roll.episodes(model, list(ds["prompt"][:3])), tok, rl_params)


def _check_masks(rolled, tok, rl_params) -> None:
    recs, prompt_ids, comp, env = rolled
    n_obs = 0
    for rec, p_ids, c, m in zip(recs, prompt_ids, comp, env, strict=True):
        assert tok.decode(p_ids) == alpaca_prompt(rec["question"]) and len(c) == len(m)
        # the tool's observations, less evaluation's "Action:" prompt after a Thought without an Action
        spans = [(a, b) for a, b in _spans(m, 0) if tok.decode(c[a:b]).strip() != "Action:"]
        # every step but the last is followed by its observation; the last only when the token cap ended the episode
        capped = len(c) == rl_params.rl.max_episode_tokens
        assert len(spans) == len(rec["steps"]) - (0 if capped else 1)
        assert [tok.decode(c[a:b]).strip("\n") for a, b in spans] == \
            [f"Observation: {s['observation']}" for s in rec["steps"]][:len(spans)]
        model_text = "".join(tok.decode(c[a:b]) for a, b in _spans(m, 1))
        assert "Observation: " not in model_text.replace("\nObservation", "")  # observations are never the model's
        n_obs += len(spans)
    assert n_obs > 0, "no episode called the tool: nothing was checked"


@pytest.mark.slow
def test_vllm_rollouts_sample_the_policy_on_the_students_server(rl_params, model_path, vllm_python):
    """Rollouts on vLLM (the default where it is installed): the policy's LoRA adapter is saved and
    loaded into the student's server each step (the last one unloaded and deleted), the ids kept
    are the engine's own (the masks hold as in-process), and a group's identical prompts draw apart."""
    import torch
    from peft import get_peft_model

    from fireact_utils import serving
    from fireact_utils.models import load_model
    from fireact_utils.tools import make_search
    from fireact_utils.train import lora_config

    torch.manual_seed(0)
    task, ds = rl.training_prompts(rl_params)
    model, tok = load_model(model_path, device="cpu", dtype="float32")
    policy = get_peft_model(model, lora_config(rl_params.train))
    search = make_search(rl_params.search, rl_params.data_dir, task.corpus, rl_params.multihop_dir)
    server = rl_params.model.model_copy(update={"decoder": "vllm"})
    adapters = rl_params.run_dir / "policy"
    roll = rl.Rollouts(finetuned_agent(rl_params), rl_params.rl, task, search, tok, server, adapters)
    try:
        question = ds["prompt"][0]
        first = roll.episodes(policy, [question] * 4 + list(ds["prompt"][1:3]))
        _check_masks(first, tok, rl_params)
        assert len({tuple(c) for c in first[2][:4]}) > 1, "a group's episodes sampled the same tokens"
        assert [d.name for d in adapters.iterdir()] == ["policy-1"]
        roll.episodes(policy, [question])
        assert [d.name for d in adapters.iterdir()] == ["policy-2"]  # the last step's policy is gone
        assert len(roll._served.server.adapters) == 1
    finally:
        serving.stop_all()


@pytest.mark.slow
def test_grpo_loss_never_reaches_observation_tokens(rl_params):
    """One real GRPOTrainer step on the built-in model: the mask the loss uses is our env_mask,
    and the gradient of the loss is zero on every observation token and not on the model's."""
    import torch
    from trl import GRPOTrainer

    from fireact_utils.train import labelled_positions_only

    seen: dict = {}

    class Probe(GRPOTrainer):
        def _get_per_token_logps_and_entropies(self, *a, **k):
            logps, ent, *rest = super()._get_per_token_logps_and_entropies(*a, **k)
            if torch.is_grad_enabled() and logps.requires_grad:
                logps.retain_grad()
                seen["logps"] = logps
            return (logps, ent, *rest)

        def _compute_loss(self, model, inputs):
            seen["inputs"] = inputs
            return super()._compute_loss(model, inputs)

    def spread(prompts, completions, **kw):  # rewards that differ within each group: non-zero advantages
        return [float(i % 2) for i in range(len(prompts))]

    torch.manual_seed(0)
    trainer, _ = rl.grpo_trainer(rl_params, rl_params.model.name, reward_funcs=spread, trainer_cls=Probe)
    inner, rolled = trainer.rollout_func, {}

    def spy(prompts, tr):
        out = inner(prompts, tr)
        rolled.update(out)
        return out

    trainer.rollout_func = spy
    with labelled_positions_only():  # as `rl.train_grpo` trains on a CPU: the head sees only completion tokens
        trainer.train()
    x, grad = seen["inputs"], seen["logps"].grad
    tool = (x["tool_mask"] == 0) & (x["completion_mask"] == 1)
    model_tokens = (x["tool_mask"] == 1) & (x["completion_mask"] == 1)
    assert tool.sum() > 0 and model_tokens.sum() > 0
    assert grad[tool].abs().max().item() == 0.0
    assert grad[model_tokens].abs().max().item() > 0.0
    rows = []  # the trainer's (completion, loss mask) pairs are exactly the rollouts' (ids, env_mask)
    for ids, cm, tm in zip(x["completion_ids"].tolist(), x["completion_mask"].tolist(), x["tool_mask"].tolist(),
                           strict=True):
        n = sum(cm)
        rows.append((tuple(ids[:n]), tuple(tm[:n])))
    assert sorted(rows) == sorted((tuple(c), tuple(m)) for c, m in zip(rolled["completion_ids"], rolled["env_mask"],
                                                                        strict=True))


def test_round_table_splits_a_round_gain_into_own_data_and_steps(tmp_path):
    """A control's row: its gain over the SFT student, and its round's paired gain over it."""
    from fireact_utils.plots import plot_rounds

    p = load_params(PARAMS / "smoke.yaml", {"evaluate.bootstrap": 500})

    def recs(ems):
        return [{"em": e} for e in ems]

    rows = [{"round": 0, "control": False, "val": recs([0, 0, 1, 0]), "test": recs([0, 1, 0, 0])},
            {"round": 1, "control": False, "val": recs([1, 1, 1, 0]), "test": recs([0, 1, 1, 0])},
            {"round": 1, "control": True, "val": recs([1, 0, 1, 0]), "test": recs([0, 1, 0, 0])},
            {"round": 2, "control": False, "val": recs([1, 0, 0, 0]), "test": recs([1, 1, 1, 0])}]
    t = self_improve.round_table(p, rows)
    assert (t.loc[3, "val_prev"], t.loc[3, "test_prev"]) == (-0.5, 0.25)  # round 2 minus round 1, not the control
    assert t[["val_prev", "test_prev"]].iloc[:3].isna().all().all()
    t = t.iloc[:3].copy()
    assert list(t["val_em"]) == [0.25, 0.75, 0.5] and list(t["val_gain"]) == [0.0, 0.5, 0.25]
    assert (t.loc[2, "val_own"], t.loc[2, "test_own"]) == (0.25, 0.25)  # round 1 minus its control
    assert t.loc[2, "val_own_lo"] <= 0.25 <= t.loc[2, "val_own_hi"] and t[["val_own", "test_own"]].iloc[:2].isna().all().all()
    t["added"] = [None, 3, None]
    plot_rounds(t, tmp_path / "si")
    assert (tmp_path / "si.png").stat().st_size > 10_000
