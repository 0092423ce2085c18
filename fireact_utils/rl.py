"""Reinforcement learning on tool-using episodes: GRPO (TRL's `GRPOTrainer`) from the SFT student.

Each step draws rl.questions_per_step training questions; each gets rl.num_generations ReAct
episodes sampled from the current policy, searching the task's own environment. An episode's
reward is its exact match (plus rl.format_reward when it finished with an answer), and GRPO
compares rewards within each question's group. An episode is one token sequence: the model's
turns as sampled (up to where evaluation cuts them), each followed by the tool's observation (or
the "Action:" evaluation asks a Thought without an Action for); those tokens get `env_mask` 0, so
TRL leaves them out of the loss as the SFT loss does (tests check both at token level). The policy is a LoRA adapter (train.lora_* settings) on the SFT student, merged into
run_dir/rl/final when training ends.

    final = rl.train_grpo(p, "outputs/runs/cpu/finetune/final")   # resumes from rl/checkpoint-*
    table = rl.report(p, "outputs/runs/cpu/finetune/final")       # before/after EM, reward curve

Rollouts sample with transformers' `generate` on the training model itself
(`GenerateBackend.continue_ids`), or with rl.decoder=vllm on the vLLM server of the SFT student,
the policy's adapter saved and loaded into it afresh each step (`VLLMBackend.continue_ids`, which
returns the ids the engine sampled): on a 2-core CPU the first is about twice as fast (vLLM's
LoRA path decodes slowly there; docs/speed.md). Either way at rl.temperature, the temperature
GRPO's loss divides logits by, no top-k/top-p, turn by turn, all unfinished episodes together, in
evaluation's dtype, prompt format (`Agent.prompt`: Alpaca or chat, per train.format) and parsing,
so that GRPO trains on the tokens evaluation shows. TRL's own vLLM integration (`use_vllm`) is not
used: it needs vLLM and TRL in one environment, and vLLM pins an older transformers than the kit's.
"""

from __future__ import annotations

import random
import shutil
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from .agent import STOP, Agent, Episode, episode_id
from .llm import GenerateBackend, Generation, encode
from .stops import cut_at_stop
from .tokens import eos_ids, piece_ids
from .trajectories import to_chat

if TYPE_CHECKING:
    import pandas as pd

    from .config import AgentParams, ModelParams, Params, RLParams


class Rollouts:
    """`rollout_func` of GRPOTrainer: one ReAct episode per prompt, a training question (TRL repeats
    each num_generations times), token ids kept as the model saw and sampled them (each turn up to
    where evaluation cuts it). `agent`: the fine-tuned agent as evaluation runs it
    (`finetuned_agent`); it samples at rl.temperature."""

    def __init__(self, agent: AgentParams, rl: RLParams, task, search, tok, server: ModelParams | None = None,
                 adapters: Path | None = None):
        """`server`: the SFT student as a model dir to serve on vLLM (None: sample in-process);
        `adapters`: where each step's policy adapter is saved for the server."""
        self.rl, self.task, self.tok = rl, task, tok
        self.server, self.adapters, self._served = server, adapters, None
        self._calls = self._steps = 0  # sampling calls (seeds), policies saved (adapter dirs)
        self.agent = Agent(task, agent.model_copy(update={"temperature": rl.temperature}), search)
        self.chat = self.agent.p.format == "chat"
        self.index = {q: i for i, q in enumerate(task.questions)}
        self.log: list[dict] = []  # one row per rollout batch: reward, EM, searches, format errors

    def episodes(self, model, prompts: list[str]) -> tuple[list[dict], list[list[int]], list[list[int]], list[list[int]]]:
        """Roll out one episode per prompt: (records, prompt ids, completion ids, env mask). A turn is
        parsed as evaluation parses it (its text cut at the stops), keeps the sampled ids of that text
        (`turn_ids`), and is followed by the ids evaluation's next prompt adds (`_between_turns`)."""
        eps = [Episode(episode_id(self.task, i), i, self.task.questions[i], self.task.answers[i], "react")
               for i in map(self.index.__getitem__, prompts)]
        prompt_ids = [encode(self.tok, self.agent.prompt(ep)).tolist() for ep in eps]
        turn_end = eos_ids(self.tok, model.generation_config) if self.chat else set()  # the template's end of turn
        comp: list[list[int]] = [[] for _ in prompts]
        env: list[list[int]] = [[] for _ in prompts]
        cap = self.rl.max_episode_tokens
        policy = self._policy(model, len(prompts))
        active = list(range(len(prompts)))
        was_training = model.training
        model.eval()  # no dropout while sampling
        try:
            while active:
                self._calls += 1  # a sampling seed per request: a group's identical prompts draw apart
                seeds = [zlib.crc32(f"{self.rl.seed} {self._calls} {i}".encode()) for i in active]
                news = policy.continue_ids([prompt_ids[i] + comp[i] for i in active], STOP,
                                           self.agent.p.max_new_tokens, self.rl.temperature, seeds)
                for i, new in zip(active, news, strict=True):
                    ep, raw = eps[i], self.tok.decode(new, skip_special_tokens=True)
                    text = cut_at_stop(raw, STOP)  # what evaluation's backends hand the agent
                    turn = turn_ids(self.tok, new, raw, text, turn_end)
                    comp[i] += turn
                    env[i] += [1] * len(turn)
                    self.agent.step(ep, Generation(text, len(prompt_ids[i]) + len(comp[i]) - len(turn), len(turn)))
                    if not ep.done:
                        between = self._between_turns(ep, prompt_ids[i] + comp[i], turn_end)
                        comp[i] += between
                        env[i] += [0] * len(between)
                        if len(comp[i]) >= cap:
                            self.agent.finish(ep, None, "max_turns")
                active = [i for i in active if not eps[i].done]
        finally:
            model.train(was_training)
        return [self.agent.record(ep, "policy") for ep in eps], prompt_ids, [c[:cap] for c in comp], \
            [m[:cap] for m in env]

    def _policy(self, model, batch: int):
        """What samples this step: `model` in-process, or the student's vLLM server with `model`'s
        LoRA adapter (saved under a new name, the last step's unloaded), or without one where
        `model` is the student itself (`masked_episode`)."""
        if self.server is None:
            return GenerateBackend(model=model, tokenizer=self.tok, batch_size=batch)
        from .llm import VLLMBackend

        adapter = None
        if hasattr(model, "peft_config"):
            self._steps += 1  # a new dir, so the server loads the new weights under a new name
            adapter = self.adapters / f"policy-{self._steps}"
            model.save_pretrained(str(adapter))
        if self._served is not None:  # the server holds one policy: the last step's goes
            self._served.close()
            if self._served.model_params.adapter:
                shutil.rmtree(self._served.model_params.adapter, ignore_errors=True)
        self._served = VLLMBackend(self.server.model_copy(update={"adapter": adapter and str(adapter)}), batch)
        return self._served

    def _between_turns(self, ep: Episode, context: list[int], turn_end: set[int]) -> list[int]:
        """The ids evaluation's next prompt adds after the model's turn: the Observation line (or, after
        a Thought with no Action, "Action:", as `Agent.prompt` asks), or in chat the template's text
        from the end of the assistant's turn to the next one's start (less the end-of-turn token the
        model sampled); as they stand inside the whole text (`tokens.piece_ids`)."""
        if not self.chat:
            nxt = "Action:" if ep.pending_thought is not None else f"Observation: {ep.steps[-1]['observation']}\n"
            return piece_ids(self.tok, ("" if self.tok.decode(context[-1:]).endswith("\n") else "\n") + nxt)
        msgs = to_chat({"question": ep.question, "steps": ep.steps})["messages"]  # ends with the observation
        done = self.tok.apply_chat_template(msgs[:-1], tokenize=False)
        nxt = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        content = msgs[-2]["content"].strip()  # as templates that trim it render it
        at = done.rfind(content)
        if at < 0 or not nxt.startswith(done):
            raise ValueError("chat template is not prefix-stable; use format=alpaca")
        tail = done[at + len(content):] + nxt[len(done):]
        if context[-1] in turn_end:
            tail = tail.removeprefix(self.tok.decode(context[-1:]))
        return piece_ids(self.tok, tail)

    def __call__(self, prompts: list[str], trainer) -> dict:
        t0 = time.perf_counter()
        recs, prompt_ids, comp, env = self.episodes(trainer.model, prompts)
        rollout_s = time.perf_counter() - t0
        rewards = [reward(r, self.rl.format_reward) for r in recs]
        n = len(recs)
        self.log.append({"step": trainer.state.global_step, "episodes": n, "rollout_s": round(rollout_s, 2),
                         "reward": sum(rewards) / n,
                         "em": sum(r["em"] for r in recs) / n,
                         "searches": sum(sum(s["action"] == "search" for s in r["steps"]) for r in recs) / n,
                         "format_errors": sum(bool(r["errors"]) for r in recs) / n,
                         "finished": sum(r["status"] == "finished" for r in recs) / n,
                         "turns": sum(r["turns"] for r in recs) / n,
                         "episode_tokens": sum(map(len, comp)) / n,
                         "masked_tokens": sum(m.count(0) for m in env) / max(sum(map(len, env)), 1)})
        return {"prompt_ids": prompt_ids, "completion_ids": comp, "env_mask": env, "logprobs": None,
                "episode_reward": rewards}


def turn_ids(tok, new: list[int], raw: str, text: str, turn_end: set[int]) -> list[int]:
    """The sampled ids `new` (decoded: `raw`) that evaluation keeps of a turn cut to `text`: through
    the cut and the newline after it, then the token that ended the turn if it is in `turn_end` (a
    chat template's end of turn). A stop string's tail, an EOS and the pads after it are dropped:
    evaluation never shows them to the model, and they must get no loss."""
    want = text + "\n" if raw.startswith(text + "\n") else text
    n = next((n for n in range(len(new) + 1) if tok.decode(new[:n], skip_special_tokens=True).startswith(want)),
             len(new))
    return new[:n + 1] if n < len(new) and new[n] in turn_end else new[:n]


def reward(record: dict, format_weight: float = 0.0) -> float:
    """Exact match, plus `format_weight` when the episode finished with an answer."""
    return float(record["em"]) + format_weight * (record["status"] == "finished")


def episode_reward(prompts, completions, episode_reward, **kw) -> list[float]:
    """GRPOTrainer reward function: the reward each rollout computed (`Rollouts.__call__`)."""
    return list(episode_reward)


def training_prompts(p: Params):
    """(task, dataset): the training questions as GRPO prompts (`Rollouts` renders each in
    evaluation's format), seeded order, checked disjoint from every validation and test set."""
    from datasets import Dataset

    from .self_improve import training_questions

    task, idx = training_questions(p, p.rl)
    random.Random(p.rl.seed).shuffle(idx)
    return task, Dataset.from_dict({"prompt": [task.questions[i] for i in idx]})


def grpo_config(r: RLParams, dtype: str, out_dir: Path, device: str):
    """TRL's GRPOConfig from rl.*: a step = questions_per_step groups of num_generations episodes,
    generated together and accumulated in micro-batches of rl.micro_batch; bf16 autocast where
    the policy is bf16 (`dtype`: model.dtype, the policy's, `_student`)."""
    import torch
    from trl import GRPOConfig

    from .models import pick_dtype

    episodes = r.questions_per_step * r.num_generations  # one generation batch = one optimizer step: on-policy
    return GRPOConfig(
        output_dir=str(out_dir), max_steps=r.steps, learning_rate=r.learning_rate, beta=r.beta,
        loss_type=r.loss_type, num_generations=r.num_generations, temperature=r.temperature,
        per_device_train_batch_size=r.micro_batch, gradient_accumulation_steps=episodes // r.micro_batch,
        max_completion_length=r.max_episode_tokens, logging_steps=1, save_steps=r.save_steps, save_total_limit=1,
        seed=r.seed, use_cpu=device == "cpu", bf16=pick_dtype(dtype, device) == torch.bfloat16,
        activation_checkpointing=False, report_to="none", disable_tqdm=True)


def _student(p: Params, trained: str | Path):
    """(model, tokenizer, prompt dataset, Rollouts): the SFT student `trained` (a full model or a
    LoRA adapter, merged) in evaluation's dtype (model.dtype; auto: fp32 on CPU, bf16 on a GPU that has it), so
    rollouts sample as evaluation does, and its rollouts on the training questions' environment."""
    from .models import load_model, pick_device
    from .pipeline import finetuned_agent
    from .serving import make_room
    from .tools import make_search
    from .train import adapter_model_params

    mp = adapter_model_params(p.model, trained)
    make_room(pick_device(p.model.device))  # rl.decoder=vllm starts its own server, at its share, beside the policy
    model, tok = load_model(mp.name, mp.adapter, mp.cache_dir, p.model.device, p.model.dtype, merge=True)
    task, ds = training_prompts(p)
    search = make_search(p.search, p.data_dir, task.corpus, p.multihop_dir)
    server = None
    if p.rl.decoder == "vllm":  # the server needs the student as a model dir: a LoRA one merged once
        student = p.run_dir / "rl" / "student"
        if mp.adapter and not (student / "config.json").is_file():
            model.save_pretrained(str(student))
            tok.save_pretrained(str(student))
        server = mp.model_copy(update={"name": str(student) if mp.adapter else mp.name, "adapter": None,
                                       "decoder": "vllm"})
    return model, tok, ds, Rollouts(finetuned_agent(p), p.rl, task, search, tok, server, p.run_dir / "rl" / "policy")


def grpo_trainer(p: Params, trained: str | Path, reward_funcs=None, trainer_cls=None):
    """(GRPOTrainer, Rollouts) from the SFT student `trained` (a full model or a LoRA adapter,
    merged first), with a fresh LoRA adapter on top; `reward_funcs` defaults to the episodes' own."""
    from trl import GRPOTrainer

    from .models import pick_device
    from .train import lora_config

    model, tok, ds, rollouts = _student(p, trained)
    trainer = (trainer_cls or GRPOTrainer)(
        model=model, reward_funcs=reward_funcs or episode_reward,
        args=grpo_config(p.rl, p.model.dtype, p.run_dir / "rl", pick_device(p.model.device)), train_dataset=ds,
        processing_class=tok, peft_config=lora_config(p.train), rollout_func=rollouts)
    return trainer, rollouts


def grpo_key(p: Params, trained: str | Path) -> dict:
    """GRPO's key (`keys`), one for the policy, its checkpoints and the merged student (rl/student):
    rl.*, the LoRA on top, the decoding dtype, the search settings and the SFT student's weights."""
    from . import keys
    from .train import adapter_model_params

    lora = {k: v for k, v in keys.flat(p.train, "train.").items() if k.startswith("train.lora")}
    return keys.make("grpo", {**keys.flat(p.rl, "rl."), **lora, **keys.model_settings(p.model, decoder=False),
                              **keys.search_settings(p.search),
                              "student": keys.weights_fingerprint(adapter_model_params(p.model, trained))})


def train_grpo(p: Params, trained: str | Path) -> Path:
    """GRPO from the SFT student `trained`; returns run_dir/rl/final (the merged model). Resumes
    from the newest checkpoint; each step's rollout statistics go to rl/rollouts.jsonl."""
    from . import keys
    from .io import atomic_write_json
    from .models import pick_device
    from .train import _write_log, last_checkpoint, release_memory, train_timed

    out = p.run_dir / "rl"
    final = out / "final"
    now = grpo_key(p, trained)
    if keys.reuse(out / keys.KEY_FILE, now, [out], exists=(out / keys.KEY_FILE).is_file() or final.is_dir()
                  or last_checkpoint(out) is not None):
        if (final / "rl_done.json").is_file():
            return final
    else:
        keys.write(out / keys.KEY_FILE, now)
    trainer, rollouts = grpo_trainer(p, trained)
    trainer.add_callback(_rollout_log(rollouts, out / "rollouts.jsonl"))
    train_s = train_timed(trainer, last_checkpoint(out), p.train)
    trainer.model.merge_and_unload().save_pretrained(str(final))
    trainer.processing_class.save_pretrained(str(final))
    _write_log(out, [h for h in trainer.state.log_history if "reward" in h])
    del trainer, rollouts
    release_memory(pick_device(p.model.device))
    atomic_write_json(final / "rl_done.json", {"params": p.rl.model_dump(mode="json"), "sft_student": str(Path(trained).resolve()),
                                               "train_runtime_s": train_s})
    return final


def masked_episode(p: Params, trained: str | Path, question: int = 0) -> tuple[object, dict]:
    """One GRPO rollout of the SFT student on training question `question`, as (tokenizer,
    {input_ids, labels}) with labels -100 where the loss never reaches: the prompt and the tool's
    observations (for `plots.loss_mask_html`)."""
    from .train import IGNORE

    model, tok, _, roll = _student(p, trained)
    _, prompt_ids, comp, env = roll.episodes(model, [roll.task.questions[question]])
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
