"""One typed parameter schema for notebooks, CLI and tests.

Every default lives here, once, with a one-line help. `params/*.yaml` hold only overrides.
Precedence: schema default < YAML file < explicit overrides (dict or "a.b=value" strings).
Unknown keys and wrong types fail before any work starts, naming the key.

    from fireact_utils.config import load_params
    p = load_params("params/smoke.yaml", {"evaluate.n_questions": 5})
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .io import DataFileError

REPO_ROOT = Path(__file__).resolve().parent.parent


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelParams(Section):
    """The student (or the local teacher): what to load and how."""

    name: str = Field("smollm2-135m", description="HF id, local path, or a built-in alias: 'smollm2-135m', "
                      "'gemma3-270m' (installed on demand; Gemma Terms of Use, docs/models.md)")
    adapter: str | None = Field(None, description="PEFT adapter dir applied on top (fine-tuned LoRA)")
    cache_dir: str | None = Field(None, description="where converted models live; default $FIREACT_CACHE or ~/.cache/fireact")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="decoding dtype: the weights' when the model generates (evaluation, sampling, GRPO's "
        "policy and rollouts); auto: fp32 on CPU; on a GPU bf16 where the card has it (compute capability 8.0+), "
        "else fp16. Training's is train.dtype")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    decoder: Literal["auto", "vllm", "generate"] = Field(
        "auto", description="local decoding: a vLLM server the kit starts (.venv-vllm), transformers' "
        "model.generate in-process (no server), or auto (vllm where installed, else generate)")
    vllm_port: int = Field(0, ge=0, le=65535, description="decoder=vllm: the server's port on 127.0.0.1 (0: a free one)")
    vllm_args: list[str] = Field(default_factory=list, description="decoder=vllm: extra server arguments, "
                                 "e.g. ['--max-num-seqs', '64']")
    vllm_gpu_memory_utilization: float = Field(
        0.45, gt=0, le=1, description="decoder=vllm on a GPU: the share of the card's memory the server takes "
        "(weights + KV cache; its --gpu-memory-utilization). vLLM's 0.9 would leave nothing to the training in "
        "the same process: GRPO beside its rollout server, or the memory PyTorch keeps after a fine-tune (the "
        "kit stops the server before each fine-tune). A 7B model in bf16 needs ~14 GB of it; raise it for "
        "evaluation-only runs of larger models")


class LLMParams(Section):
    """An LM backend: the local model (transformers) or any OpenAI-compatible endpoint."""

    backend: Literal["local", "vllm", "openai"] = Field(
        "local", description="the local model (model.decoder), the local model on a vLLM server the kit starts "
        "(= local with model.decoder=vllm), or an OpenAI-compatible endpoint")
    model: str = Field("gpt-4", description="model name sent to the endpoint (openai backend)")
    base_url: str | None = Field(None, description="endpoint, e.g. http://127.0.0.1:8000/v1; None = OpenAI")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the key (never the key)")
    chat: bool = Field(True, description="chat completions (True) or text completions (False)")
    concurrency: int = Field(8, ge=1, description="parallel requests (openai backend)")
    max_retries: int = Field(6, ge=0, description="retries on 429/5xx/timeouts, exponential backoff + jitter")
    retry_budget_s: float = Field(120.0, gt=0, description="total seconds of backoff allowed per request")
    timeout_s: float = Field(60.0, gt=0, description="per-request timeout")
    price_per_1k_prompt: float = Field(0.0, ge=0, description="USD per 1k prompt tokens, for cost reports")
    price_per_1k_completion: float = Field(0.0, ge=0, description="USD per 1k completion tokens")


class SearchParams(Section):
    """The search tool the agent calls."""

    kind: Literal["recorded", "serpapi", "wiki"] = Field(
        "recorded", description="recorded Google replay, live SerpAPI, or BM25 over Wikipedia paragraphs")
    corpus: str | None = Field(None, description="kind=wiki: a multihop corpus name (hotpotqa, 2wikimultihopqa, "
                               "strategyqa) or a JSONL of {title, text}; a wiki task brings its own")
    top_k: int = Field(1, ge=1, description="kind=wiki: paragraphs per observation")
    cache_path: str | None = Field(None, description="SerpAPI cache file; default <cache>/serpapi.json")
    noise_rate: float = Field(0.0, ge=0, le=1, description="probability an observation is corrupted")
    noise_kind: Literal["none", "random"] = Field("none", description="replace with 'None' or a random other observation")
    seed: int = Field(0, description="seed of the noise")
    max_obs_chars: int = Field(600, gt=0, description="observations are cut to this many characters (wiki: on a word boundary)")


class AgentParams(Section):
    """How an episode is prompted and run."""

    method: Literal["react", "cot", "io", "reflexion"] = Field(
        "react", description="prompting / agent method; reflexion retries after a wrong answer as judged by the "
        "gold answer (oracle feedback, as in the Reflexion paper's HotpotQA runs: an upper bound, not a deployable agent)")
    mode: Literal["fewshot", "finetuned"] = Field("fewshot", description="few-shot exemplars, or zero-shot fine-tuned format")
    format: Literal["alpaca", "chat"] = Field("alpaca", description="fine-tuned prompt format (mode=finetuned)")
    max_turns: int = Field(8, ge=1, description="Thought/Action steps before an episode is cut (max_turns)")
    max_new_tokens: int = Field(128, ge=1, description="tokens per generation step")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    batch_size: int = Field(32, ge=1, description="episodes generating together (local backend)")
    reflexion_trials: int = Field(2, ge=1, description="attempts per question for reflexion")
    exemplars: Literal["kit", "fireact"] = Field(
        "kit", description="few-shot exemplars: the kit's own (prompts/) or FireAct's GPT-4 HotpotQA ReAct "
        "trajectories (for ReAct on qa tasks; IO, CoT and other kinds keep the kit's)")
    n_exemplars: int = Field(3, ge=1, description="few-shot exemplars in the prompt (at most what the source holds)")
    chat_template: bool = Field(False, description="few-shot: send the prompt as one user message in the model's chat template")
    min_searches: int = Field(0, ge=0, description="react: a finish before this many searches is refused with an "
                              "observation asking to search (the ReAct game enforced; 0: free)")


class EvalParams(Section):
    task: str = Field("hotpotqa", description="hotpotqa | bamboogle | strategyqa | mmlu | mmlu:<subject> | path.jsonl")
    split: str = Field("dev", description="dataset split")
    n_questions: int = Field(100, ge=1, description="first n of the seeded shuffle (FireAct: 500 of dev)")
    seed: int = Field(233, description="shuffle seed; 233 reproduces FireAct's dev-500")
    methods: list[Literal["io", "cot", "react"]] = Field(["io", "cot", "react"], description="few-shot baselines to run")
    searching_baseline: dict[str, Any] = Field(
        default_factory=dict, description="agent.* overrides of a second few-shot ReAct baseline that must search "
        "(base_fewshot_searching_react), chosen on validation by study.fewshot_rule (empty: none)")
    bootstrap: int = Field(1000, ge=10, description="bootstrap resamples for confidence intervals")

    @field_validator("searching_baseline")
    @classmethod
    def _agent_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        if bad := [k for k in v if not k.startswith("agent.")]:
            raise ValueError(f"{bad[0]!r} is not an agent.* key")
        return v


class GenerateParams(Section):
    """Teacher trajectory generation."""

    teacher: LLMParams = Field(default_factory=LLMParams, description="the teacher LM")
    tasks: list[str] = Field(["hotpotqa"], description="tasks to draw training questions from")
    split: str = Field("dev", description="split of the training questions (FireAct's HotpotQA has dev and test; "
                       "questions are drawn outside every held-out set, dev-500 included)")
    methods: list[Literal["react", "cot", "reflexion"]] = Field(["react"], description="methods to run")
    n_questions: int = Field(0, ge=0, description="questions per task (0: skip generation, use FireAct's released data)")
    seed: int = Field(0, description="question sampling seed")


class DatasetParams(Section):
    """Which fine-tuning data, mixed how."""

    source: str = Field("fireact:hotpotqa", description="fireact:<name> (released GPT-4 data) or a trajectories JSONL path")
    teacher_episodes: bool = Field(True, description="join the run's generated successes (generate/*.jsonl) to "
                                   "`source`; false keeps the data exactly `source` while notebook 01 still shows the teacher")
    mixture: dict[str, float] = Field(default_factory=dict, description="task:method -> count (>=1) or ratio (<1); empty = all")
    tasks: list[str] = Field(default_factory=list, description="keep only these tasks' trajectories (empty: all)")
    n_trajectories: int | None = Field(None, ge=1, description="keep the first N (data-scaling study)")
    drop_held_out: bool = Field(False, description="drop training records whose question the run holds out "
                                "(FireAct's multitask data holds 37 StrategyQA dev questions) instead of refusing them")
    seed: int = Field(0, description="mixing seed")

    @field_validator("mixture")
    @classmethod
    def _mixture_keys(cls, v: dict[str, float]) -> dict[str, float]:
        for k, w in v.items():
            if k.count(":") != 1 or w <= 0:
                raise ValueError(f"mixture key {k!r} must be 'task:method' with a positive weight")
        return v


class TrainParams(Section):
    """Supervised fine-tuning with TRL's SFTTrainer."""

    method: Literal["lora", "full"] = Field("lora", description="PEFT LoRA adapter or all weights")
    format: Literal["alpaca", "chat"] = Field("alpaca", description="training text format")
    loss_on: Literal["agent", "all"] = Field("agent", description="agent = loss on Thought/Action tokens only; all = FireAct's whole text")
    epochs: float = Field(2.0, gt=0, description="passes over the data")
    max_steps: int = Field(-1, description=">0 overrides epochs")
    learning_rate: float = Field(1e-4, gt=0, description="peak LR (FireAct LoRA: 3e-4)")
    batch_size: int = Field(8, ge=1, description="sequences per optimizer step (per device)")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    max_length: int = Field(1024, ge=32, description="tokens; longer examples are truncated")
    padding_free: Literal["auto", True, False] = Field(
        "auto", description="one unpadded row per batch; needs flash-attention (auto: on iff GPU + flash_attn)")
    group_by_length: bool = Field(True, description="batch similar lengths together")
    lora_r: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: int = Field(32, ge=1, description="LoRA scale numerator")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    lora_target_modules: list[str] | str = Field("all-linear", description="modules that get adapters")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the fine-tune loads and holds the weights in: float32 master weights (bf16 "
        "autocast per train.bf16), or pure half precision (half the memory); model.dtype set it before this field")
    bf16: Literal["auto", True, False] = Field("auto", description="bf16 autocast (mixed precision); auto: on where "
                                               "the device has bf16 (GPUs of compute capability 8.0+, AMX/AVX512-BF16 CPUs)")
    gradient_checkpointing: Literal["auto", True, False] = Field("auto", description="auto: on for GPU")
    logging_steps: int = Field(5, ge=1, description="log loss every N steps")
    save_steps: int = Field(50, ge=1, description="checkpoint every N steps (resume point)")
    seed: int = Field(42, description="training seed")
    labelled_positions_only: bool = Field(True, description="CPU: TRL's fused LM head scores only positions with a "
                                          "label (same loss and gradients, 1.40x; `benchmarks/sft.py`)")
    keep_freed_memory: bool = Field(True, description="glibc keeps big freed blocks in its heap while training "
                                    "(1.09-1.17x on a 2-core CPU; its sliding mmap threshold stays fixed afterwards)")
    report_to: list[str] = Field(default_factory=list, description="TRL/transformers loggers, e.g. [trackio], "
                                 "[tensorboard], [wandb] (installed separately); empty: none")


class StudyParams(Section):
    """Scaling / robustness sweeps (notebook 04)."""

    data_sizes: list[int] = Field(default_factory=list, description="numbers of trajectories to fine-tune on")
    noise_rates: list[float] = Field([0.5], description="noisy-tool rates to evaluate")
    noise_kinds: list[Literal["none", "random"]] = Field(["none", "random"], description="noise kinds")
    noisy_fewshot: bool = Field(False, description="also run the (slow) few-shot base under noise")
    mixtures: dict[str, str] = Field(default_factory=dict, description="label -> FireAct dataset for mix comparisons")
    generalization_tasks: list[str] = Field(default_factory=list, description="extra tasks for the fine-tuned agent")
    generalization_n: int = Field(0, ge=0, description="questions per generalization task (0: the whole split)")
    noise_tasks: list[str] = Field(default_factory=list, description="tasks of the noisy-tool study (empty: evaluate.task)")
    recipes: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="label -> train.*/dataset.* overrides: fine-tuning recipes compared on validation")
    fewshot_variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="label -> agent.* overrides: few-shot prompts compared on validation")
    select_task: str = Field("hotpotqa-wiki", description="where recipes and prompts are chosen (never dev-500)")
    select_split: str = Field("val", description="split of select_task")
    select_n: int = Field(0, ge=0, description="questions of the selection split (0: all)")
    fewshot_rule: Literal["em", "grounded_em"] = Field(
        "grounded_em", description="how a few-shot prompt is chosen: EM, or grounded EM (an answer counts only if "
        "its episode searched), which does not reward skipping the tool")
    preregistered: bool = Field(False, description="`headline` or the first evaluation records every resolved setting; "
                                "every evaluation refuses other settings: the final evaluation is run once, as registered")
    transfer_tasks: list[str] = Field(
        ["2wikimultihopqa", "strategyqa-wiki"], description="held-out Wikipedia environments where `headline` also "
        "scores every fine-tuned agent it reports (whole default splits), so a gain that holds only on dev-500 shows")
    seeds: list[int] = Field(default_factory=list, description="training seeds of the main recipe (headline spread)")
    sc_ks: list[int] = Field(default_factory=list, description="self-consistency: episodes voted per question (empty: skip)")
    sc_temperature: float = Field(0.4, gt=0, description="self-consistency sampling temperature (chosen on "
                                  "HotpotQA-wiki val: 0.4 beat 0.7 by 7 points at k = 3)")
    sc_n: int = Field(0, ge=0, description="self-consistency questions (0: evaluate.n_questions)")
    sc_agents: list[Literal["fewshot", "finetuned"]] = Field(
        ["fewshot", "finetuned"], min_length=1, description="self-consistency: the agents sampled")
    sc_seeds: bool = Field(False, description="self-consistency of the fine-tuned agent of every one of study.seeds "
                                              "(missing ones are trained) and their mean: a seed spread per k")
    base_models: list[str] = Field(default_factory=list, description="base-model axis (`base-models`): model specs, "
                                   "each with study.recipes re-chosen on the selection split (empty: skip)")
    base_model_evals: list[str] = Field(
        ["hotpotqa-wiki:test:300", "hotpotqa:dev:500"], description="base-model axis: evaluation sets as "
        "'task:split:n' (first n of the evaluate.seed shuffle; defaults: all of HotpotQA-wiki test, FireAct's dev-500)")

    @field_validator("base_model_evals")
    @classmethod
    def _task_split_n(cls, v: list[str]) -> list[str]:
        for s in v:
            parts = s.rsplit(":", 2)  # a task name may hold a colon (mmlu:<subject>)
            if len(parts) != 3 or not all(parts) or not parts[2].isdigit() or int(parts[2]) == 0:
                raise ValueError(f"{s!r} must be 'task:split:n' with n > 0, e.g. 'hotpotqa:dev:500'")
        return v

    @field_validator("recipes", "fewshot_variants")
    @classmethod
    def _override_sections(cls, v: dict[str, dict[str, Any]], info) -> dict[str, dict[str, Any]]:
        allowed = ("train.", "dataset.") if info.field_name == "recipes" else ("agent.",)
        for label, ov in v.items():
            bad = [k for k in ov if not k.startswith(allowed)]
            if bad:
                raise ValueError(f"{label}: {bad[0]!r} is not a {' or '.join(allowed)} key")
        return v

    @model_validator(mode="after")
    def _sc_seeds_need_seeds(self) -> StudyParams:
        if self.sc_seeds and not self.seeds:
            raise ValueError("study.sc_seeds needs the training seeds in study.seeds")
        return self


class TrainingQuestions(Section):
    """Where notebook 05's students practise: questions disjoint from every validation and test set."""

    task: str = Field("hotpotqa-wiki", description="task of the training questions, searched in its own environment")
    split: str = Field("train", description="split of `task`; must share no question with any validation or test set")
    n_questions: int = Field(0, ge=0, description="training questions (0: the whole split)")


class SelfImproveParams(TrainingQuestions):
    """Rejection-sampling self-improvement (notebook 05): the student keeps its own successes."""

    rounds: int = Field(0, ge=0, description="rounds of sample -> keep reward-1 episodes -> fine-tune again (0: skip)")
    k: int = Field(4, ge=1, description="episodes sampled per question and round")
    temperature: float = Field(0.7, gt=0, description="sampling temperature")
    controls: list[int] = Field([], description="rounds that also get an equal-steps control: the base model "
                                "fine-tuned on the GPT-4 data alone for as many optimizer steps as the round took, "
                                "which separates what the student's own episodes add from longer training")

    @model_validator(mode="after")
    def _controls_in_range(self) -> SelfImproveParams:
        if self.rounds and (bad := [r for r in self.controls if not 1 <= r <= self.rounds]):  # 0: study skipped
            raise ValueError(f"controls {bad} name no round (rounds: {self.rounds})")
        return self


class RLParams(TrainingQuestions):
    """GRPO (TRL's GRPOTrainer) from the SFT student, LoRA on top, reward = exact match (notebook 05)."""

    steps: int = Field(0, ge=0, description="optimizer steps (0: skip)")
    questions_per_step: int = Field(2, ge=1, description="questions per step; each gets num_generations episodes")
    num_generations: int = Field(4, ge=2, description="episodes per question: the group whose rewards are compared")
    micro_batch: int = Field(2, ge=1, description="episodes per forward/backward; a step accumulates all of its "
                             "episodes (full-vocabulary log-probs of 8 long episodes at once took 24 GB on CPU)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts (and of the loss)")
    learning_rate: float = Field(2e-5, gt=0, description="LoRA learning rate")
    beta: float = Field(0.0, ge=0, description="KL weight to the SFT student (0: no reference model, as DAPO)")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field("dapo", description="TRL's GRPO loss normalization")
    format_reward: float = Field(0.0, ge=0, description="reward added when an episode finishes with an answer")
    max_episode_tokens: int = Field(1024, ge=64, description="an episode's tokens after the prompt (model + observations)")
    decoder: Literal["generate", "vllm"] = Field(
        "generate", description="where rollouts sample: model.generate on the policy, or the SFT student's vLLM "
        "server with the policy's adapter loaded each step (2-core CPU: rollouts 55-57 s a step against 91-111 s "
        "on vLLM, docs/speed.md)")
    save_steps: int = Field(10, ge=1, description="checkpoint every N steps (resume point)")
    seed: int = Field(0, description="seed of the question order and sampling")

    @model_validator(mode="after")
    def _micro_batches(self) -> RLParams:
        if (self.questions_per_step * self.num_generations) % self.micro_batch:
            raise ValueError(f"micro_batch {self.micro_batch} must divide a step's episodes "
                             f"(questions_per_step x num_generations = {self.questions_per_step * self.num_generations})")
        return self


class Params(Section):
    """Everything one run needs."""

    name: str = Field("default", description="run name; artifacts go to outputs/runs/<name>")
    data_dir: str | None = Field(None, description="FireAct data dir; default $FIREACT_DATA_DIR or <repo>/data")
    multihop_dir: str | None = Field(
        None, description="Wikipedia multihop data dir; default $FIREACT_MULTIHOP_DIR or <repo>/data/multihop")
    output_root: str = Field("outputs/runs", description="parent of run folders (relative to the repo)")
    model: ModelParams = Field(default_factory=ModelParams)
    llm: LLMParams = Field(default_factory=LLMParams, description="backend of the evaluated agent")
    search: SearchParams = Field(default_factory=SearchParams)
    agent: AgentParams = Field(default_factory=AgentParams)
    evaluate: EvalParams = Field(default_factory=EvalParams)
    generate: GenerateParams = Field(default_factory=GenerateParams)
    dataset: DatasetParams = Field(default_factory=DatasetParams)
    train: TrainParams = Field(default_factory=TrainParams)
    study: StudyParams = Field(default_factory=StudyParams)
    self_improve: SelfImproveParams = Field(default_factory=SelfImproveParams)
    rl: RLParams = Field(default_factory=RLParams)

    @model_validator(mode="after")
    def _no_secrets(self) -> Params:
        # Keys must come from the environment; a literal key in params would leak into dumps.
        for sec in (self.llm, self.generate.teacher):
            if sec.api_key_env.startswith(("sk-", "hf_")):
                raise ValueError("api_key_env must name an environment variable, not hold a key")
        return self

    @property
    def run_dir(self) -> Path:
        root = Path(self.output_root)
        return (root if root.is_absolute() else REPO_ROOT / root) / self.name

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def changed(self) -> dict[str, Any]:
        """section.key -> value wherever this run differs from the schema's defaults."""
        base = _flat(Params())
        return {k: v for k, v in _flat(self).items() if base[k] != v}

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        """What a notebook shows for `p`: the run and what it sets, not all ~150 values (`p.dump()`)."""
        lines = [f"Params of run {self.name!r} ({self.run_dir}); differs from the schema's defaults in:"]
        lines += [f"  {k} = {v!r}" for k, v in self.changed().items() if k not in ("name", "output_root")]
        printer.text("\n".join(lines))


def _flat(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    """section.key -> value of every field, sections (and sections within them) opened."""
    out: dict[str, Any] = {}
    for k in type(model).model_fields:
        v = getattr(model, k)
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, BaseModel) else {f"{prefix}{k}": v}
    return out


def default(section: type[BaseModel], field: str) -> Any:
    """The schema's default of `section.field`, for library signatures: each default lives once."""
    return section.model_fields[field].default


class ParamsError(ValueError):
    """Invalid parameters; the message names the key."""


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ParamsError(f"{key}: {p} is not a section")
    d[parts[-1]] = value


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(s: str) -> tuple[str, Any]:
    """'train.epochs=3' -> ('train.epochs', 3); values are parsed as YAML scalars/lists."""
    if "=" not in s:
        raise ParamsError(f"override {s!r} must look like key.sub=value")
    k, v = s.split("=", 1)
    return k.strip(), yaml.safe_load(v)


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A params file as a dict; a top-level `base: other.yaml` (relative to this file) is read
    first and this file's keys override it, so a variant holds only what differs."""
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    if path.resolve() in chain:
        raise ParamsError(f"{path}: circular 'base' chain")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"malformed YAML in {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping")
    raw.setdefault("name", path.stem)  # a variant is its own run, never its base's
    base = raw.pop("base", None)
    if base is None:
        return raw
    return _deep_merge(_read_yaml(path.parent / str(base), (*chain, path.resolve())), raw)


def load_params(path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None) -> Params:
    """Resolve params: schema defaults < YAML at `path` (after its `base`) < `overrides` (dotted keys)."""
    raw: dict = {}
    if path:
        path = Path(path)
        if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
            path = REPO_ROOT / path
        raw = _read_yaml(path)
    ov: dict = {}
    items = list(overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or []))
    for k, v in items:
        _set_dotted(ov, k, v)
    merged = _deep_merge(raw, ov)
    for k, v in items:  # a mapping given for a key replaces the file's ('study.recipes={a: {...}}' is all the recipes)
        if isinstance(v, dict):
            _set_dotted(merged, k, v)
    try:
        return Params.model_validate(merged)
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in e.errors()]
        src = f" in {path}" if path else ""
        raise ParamsError(f"invalid params{src}:\n" + "\n".join(lines)) from None


def override(p: Params, overrides: dict[str, Any], where: str = "overrides") -> Params:
    """`p` with dotted-key overrides applied and validated (a bad one fails naming `where`)."""
    ov: dict = {}
    for k, v in overrides.items():
        _set_dotted(ov, k, v)
    try:
        return Params.model_validate(_deep_merge(p.dump(), ov))
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise ParamsError(f"invalid {where}:\n" + "\n".join(lines)) from None


def cache_dir() -> Path:
    """Root of caches (converted models, search indexes): $FIREACT_CACHE or ~/.cache/fireact."""
    return Path(os.environ.get("FIREACT_CACHE") or Path.home() / ".cache" / "fireact")


FETCH = "`make data` fetches it"  # ends every missing-data error: the one command that fetches the data


def _locate(path: str | Path | None, env: str, default: Path, what: str) -> Path:
    """A data directory: argument > $env > default; a one-line FileNotFoundError naming `make data`
    and `env` if it is missing."""
    src = "argument"
    if path is None:
        value = os.environ.get(env)
        path, src = (value, env) if value else (default, "default")
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        p = REPO_ROOT / p
    if not p.is_dir():
        raise FileNotFoundError(f"{what} not found: {p} (from {src}): {FETCH}, or set {env} to {_WHERE[env]}")
    return p.resolve()


_WHERE = {
    "FIREACT_DATA_DIR": "a copy of the FireAct data (e.g. ../shared/fireact)",
    "FIREACT_MULTIHOP_DIR": "a copy of the multihop Wikipedia data (e.g. ../shared/multihop)",
}


def data_dir(path: str | Path | None = None) -> Path:
    """The FireAct data directory: argument > $FIREACT_DATA_DIR > <repo>/data."""
    return _locate(path, "FIREACT_DATA_DIR", REPO_ROOT / "data", "FireAct data dir")


def multihop_dir(path: str | Path | None = None) -> Path:
    """The multihop Wikipedia data (questions + paragraphs): argument > $FIREACT_MULTIHOP_DIR > <repo>/data/multihop."""
    return _locate(path, "FIREACT_MULTIHOP_DIR", REPO_ROOT / "data" / "multihop", "multihop data dir")


def data_file(root: Path, rel: str) -> Path:
    """`root`/`rel`, a file (or folder) of the data that `download` fetches (`data_manifest.json`
    lists every one): the only way the kit opens one, so a missing one is always the same one line."""
    path = root / rel
    if not path.exists():
        raise DataFileError(f"data file not found: {path}: {FETCH}")
    return path
