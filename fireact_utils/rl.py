"""Reinforcement learning on tool-using episodes: GRPO (TRL's `GRPOTrainer`) from the SFT student.

Each step draws rl.questions_per_step training questions; each gets rl.num_generations ReAct
episodes sampled from the current policy, searching the task's own environment. An episode's
reward is its exact match (plus rl.format_reward when it finished with an answer), and GRPO
compares rewards within each question's group. An episode is one token sequence: the model's
turns exactly as sampled, each followed by the tool's observation; observation tokens get
`env_mask` 0, so TRL leaves them out of the loss as the SFT loss does (tests check both at token
level). The policy is a LoRA adapter (train.lora_* settings) on the SFT student, merged into
run_dir/rl/final when training ends.

    final = rl.train_grpo(p, "outputs/runs/cpu/finetune/final")   # resumes from rl/checkpoint-*
    table = rl.report(p, "outputs/runs/cpu/finetune/final")       # before/after EM, reward curve

Rollouts use transformers' `generate` on the training model (`llm.GenerateBackend.continue_ids`,
sampling at rl.temperature, the temperature GRPO's loss divides logits by, no top-k/top-p), turn
by turn, all unfinished episodes together.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

from .agent import STOP, Agent, Episode, episode_id
from .llm import GenerateBackend, Generation
from .trajectories import alpaca_prompt

if TYPE_CHECKING:
    import pandas as pd

    from .config import Params


class Rollouts:
    """`rollout_func` of GRPOTrainer: one ReAct episode per prompt (TRL repeats each question's
    prompt num_generations times), token ids kept exactly as the model saw and sampled them."""

    def __init__(self, p: Params, task, search, tok):
        from .pipeline import finetuned_agent

        self.p, self.task, self.tok = p, task, tok
        self.agent = Agent(task, finetuned_agent(p).model_copy(update={"temperature": p.rl.temperature}), search)
        self.index = {alpaca_prompt(q): i for i, q in enumerate(task.questions)}
        self.log: list[dict] = []  # one row per rollout batch: reward, EM, searches, format errors

    def episodes(self, model, prompts: list[str]) -> tuple[list[dict], list[list[int]], list[list[int]], list[list[int]]]:
        """Roll out one episode per prompt: (records, prompt ids, completion ids, env mask)."""
        eps = [Episode(episode_id(self.task, self.index[q]), self.index[q], self.task.questions[self.index[q]],
                       self.task.answers[self.index[q]], "react") for q in prompts]
        prompt_ids = [self.tok(q, add_special_tokens=False)["input_ids"] for q in prompts]
        comp: list[list[int]] = [[] for _ in prompts]
        env: list[list[int]] = [[] for _ in prompts]
        cap = self.p.rl.max_episode_tokens
        policy = GenerateBackend(model=model, tokenizer=self.tok, batch_size=len(prompts))
        active = list(range(len(prompts)))
        was_training = model.training
        model.eval()  # no dropout while sampling
        try:
            while active:
                news = policy.continue_ids([prompt_ids[i] + comp[i] for i in active], STOP,
                                           self.p.agent.max_new_tokens, self.p.rl.temperature)
                for i, new in zip(active, news, strict=True):
                    ep, text = eps[i], self.tok.decode(new, skip_special_tokens=True)
                    comp[i] += new
                    env[i] += [1] * len(new)
                    self.agent.step(ep, Generation(text, len(prompt_ids[i]) + len(comp[i]) - len(new), len(new)))
                    if ep.pending_thought is not None:  # a Thought with no Action: an invalid turn here
                        ep.steps.append({"thought": ep.pending_thought, "action": "", "arg": "",
                                         "observation": "Invalid action."})
                        ep.pending_thought = None
                        if len(ep.steps) >= self.p.agent.max_turns:
                            self.agent.finish(ep, None, "max_turns")
                    if not ep.done:
                        obs = ("" if text.endswith("\n") else "\n") + f"Observation: {ep.steps[-1]['observation']}\n"
                        obs_ids = self.tok(obs, add_special_tokens=False)["input_ids"]
                        comp[i] += obs_ids
                        env[i] += [0] * len(obs_ids)
                        if len(comp[i]) >= cap:
                            self.agent.finish(ep, None, "max_turns")
                active = [i for i in active if not eps[i].done]
        finally:
            model.train(was_training)
        return [self.agent.record(ep, "policy") for ep in eps], prompt_ids, [c[:cap] for c in comp], \
            [m[:cap] for m in env]

    def __call__(self, prompts: list[str], trainer) -> dict:
        recs, prompt_ids, comp, env = self.episodes(trainer.model, prompts)
        rewards = [reward(r, self.p.rl.format_reward) for r in recs]
        n = len(recs)
        self.log.append({"step": trainer.state.global_step, "episodes": n, "reward": sum(rewards) / n,
                         "em": sum(r["em"] for r in recs) / n,
                         "searches": sum(sum(s["action"] == "search" for s in r["steps"]) for r in recs) / n,
                         "format_errors": sum(bool(r["errors"]) for r in recs) / n,
                         "finished": sum(r["status"] == "finished" for r in recs) / n,
                         "turns": sum(r["turns"] for r in recs) / n,
                         "episode_tokens": sum(map(len, comp)) / n,
                         "masked_tokens": sum(m.count(0) for m in env) / max(sum(map(len, env)), 1)})
        return {"prompt_ids": prompt_ids, "completion_ids": comp, "env_mask": env, "logprobs": None,
                "episode_reward": rewards}


def reward(record: dict, format_weight: float = 0.0) -> float:
    """Exact match, plus `format_weight` when the episode finished with an answer."""
    return float(record["em"]) + format_weight * (record["status"] == "finished")


def episode_reward(prompts, completions, episode_reward, **kw) -> list[float]:
    """GRPOTrainer reward function: the reward each rollout computed (`Rollouts.__call__`)."""
    return list(episode_reward)


def training_prompts(p: Params):
    """(task, dataset): the training questions as GRPO prompts, seeded order, checked disjoint
    from every validation and test set."""
    from datasets import Dataset

    from .self_improve import training_questions

    task, idx = training_questions(p, p.rl)
    random.Random(p.rl.seed).shuffle(idx)
    return task, Dataset.from_dict({"prompt": [alpaca_prompt(task.questions[i]) for i in idx]})


def grpo_config(p: Params, out_dir: Path, device: str):
    """TRL's GRPOConfig from rl.*: a step = questions_per_step groups of num_generations episodes,
    generated together and accumulated in micro-batches of rl.micro_batch."""
    from trl import GRPOConfig

    r = p.rl
    episodes = r.questions_per_step * r.num_generations  # one generation batch = one optimizer step: on-policy
    return GRPOConfig(
        output_dir=str(out_dir), max_steps=r.steps, learning_rate=r.learning_rate, beta=r.beta,
        loss_type=r.loss_type, num_generations=r.num_generations, temperature=r.temperature,
        per_device_train_batch_size=r.micro_batch, gradient_accumulation_steps=episodes // r.micro_batch,
        max_completion_length=r.max_episode_tokens, logging_steps=1, save_steps=r.save_steps, save_total_limit=1,
        seed=r.seed, use_cpu=device == "cpu", bf16=False, gradient_checkpointing=False, report_to="none",
        disable_tqdm=True)


def _student(p: Params, trained: str | Path):
    """(model, tokenizer, prompt dataset, Rollouts): the SFT student `trained` (a full model or a
    LoRA adapter, merged) in fp32, and its rollouts on the training questions' environment."""
    from .models import load_model
    from .tools import make_search
    from .train import adapter_model_params

    mp = adapter_model_params(p.model, trained)
    model, tok = load_model(mp.name, mp.adapter, mp.cache_dir, p.model.device, "float32", merge=True)
    task, ds = training_prompts(p)
    return model, tok, ds, Rollouts(p, task, make_search(p.search, p.data_dir, task.corpus, p.multihop_dir), tok)


def grpo_trainer(p: Params, trained: str | Path, reward_funcs=None, trainer_cls=None):
    """(GRPOTrainer, Rollouts) from the SFT student `trained` (a full model or a LoRA adapter,
    merged first), with a fresh LoRA adapter on top; `reward_funcs` defaults to the episodes' own."""
    from trl import GRPOTrainer

    from .models import pick_device
    from .train import lora_config

    model, tok, ds, rollouts = _student(p, trained)
    trainer = (trainer_cls or GRPOTrainer)(
        model=model, reward_funcs=reward_funcs or episode_reward,
        args=grpo_config(p, p.run_dir / "rl", pick_device(p.model.device)), train_dataset=ds, processing_class=tok,
        peft_config=lora_config(p.train), rollout_func=rollouts)
    return trainer, rollouts


def train_grpo(p: Params, trained: str | Path) -> Path:
    """GRPO from the SFT student `trained`; returns run_dir/rl/final (the merged model). Resumes
    from the newest checkpoint; each step's rollout statistics go to rl/rollouts.jsonl."""
    from .config import REPO_ROOT
    from .io import atomic_write_json, read_json
    from .train import _write_log, last_checkpoint, train_timed

    out = p.run_dir / "rl"
    final = out / "final"
    if (final / "rl_done.json").is_file():
        done = read_json(final / "rl_done.json")
        student = (REPO_ROOT / done["sft_student"]).resolve()  # older runs stored it relative to the repo
        if done["params"] != p.rl.model_dump(mode="json") or student != Path(trained).resolve():
            raise ValueError(f"{final} was trained with other rl params or from another SFT student; "
                             f"delete {out} or pick a new run name")
        return final
    trainer, rollouts = grpo_trainer(p, trained)
    trainer.add_callback(_rollout_log(rollouts, out / "rollouts.jsonl"))
    train_s = train_timed(trainer, last_checkpoint(out), p.train)
    trainer.model.merge_and_unload().save_pretrained(str(final))
    trainer.processing_class.save_pretrained(str(final))
    _write_log(out, [h for h in trainer.state.log_history if "reward" in h])
    atomic_write_json(final / "rl_done.json", {"params": p.rl.model_dump(mode="json"), "sft_student": str(Path(trained).resolve()),
                                               "train_runtime_s": train_s})
    return final


def masked_episode(p: Params, trained: str | Path, question: int = 0) -> tuple[object, dict]:
    """One GRPO rollout of the SFT student on training question `question`, as (tokenizer,
    {input_ids, labels}) with labels -100 where the loss never reaches: the prompt and the tool's
    observations (for `plots.loss_mask_html`)."""
    from .train import IGNORE

    model, tok, _, roll = _student(p, trained)
    _, prompt_ids, comp, env = roll.episodes(model, [alpaca_prompt(roll.task.questions[question])])
    labels = [IGNORE] * len(prompt_ids[0]) + [t if m else IGNORE for t, m in zip(comp[0], env[0], strict=True)]
    return tok, {"input_ids": prompt_ids[0] + comp[0], "labels": labels}


def _rollout_log(rollouts: Rollouts, path: Path):
    """A trainer callback appending each step's rollout statistics to `path` (JSONL)."""
    from transformers import TrainerCallback

    from .io import append_jsonl

    class RolloutLog(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            for row in rollouts.log:
                append_jsonl(path, row)
            rollouts.log.clear()

    return RolloutLog()


def report(p: Params, trained: str | Path, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """GRPO from `trained`, then the SFT student and the GRPO student on validation and test
    (paired CIs, as self-improvement's table), and the per-step rollout curve; both saved."""
    import pandas as pd

    from .io import atomic_write_text, read_jsonl
    from .plots import plot_rl_curve
    from .self_improve import round_table, scores

    final = train_grpo(p, trained)
    table = round_table(p, [{"round": 0, **scores(p, "sft", trained, progress)},
                            {"round": 1, **scores(p, "rl", final, progress)}])
    table.insert(0, "model", ["SFT student", f"GRPO, {p.rl.steps} steps"])
    curve = pd.DataFrame(read_jsonl(p.run_dir / "rl" / "rollouts.jsonl")).drop_duplicates("step", keep="last")
    atomic_write_text(p.run_dir / "tables" / "rl.csv", table.to_csv(index=False))
    atomic_write_text(p.run_dir / "tables" / "rl_curve.csv", curve.to_csv(index=False))
    plot_rl_curve(curve, p.run_dir / "figures" / "rl_curve")
    return table, curve
