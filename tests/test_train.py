"""Fine-tuning on real FireAct trajectories with the real built-in model (a few CPU steps)."""

import csv
import json
import platform
import subprocess
import sys

import pytest

from fireact_utils.config import AgentParams, ModelParams, TrainParams
from fireact_utils.data import load_fireact
from fireact_utils.train import IGNORE, adapter_model_params, finetune, tokenize_alpaca, tokenize_chat


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from fireact_utils.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


@pytest.fixture(scope="module")
def records(data_dir):
    return load_fireact("hotpotqa", data_dir=data_dir)[:8]


def _loss_text(tok, ex):
    return tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE])


def test_agent_only_mask_alpaca(tok, records):
    ex = tokenize_alpaca(records[0], tok, "agent")
    text = _loss_text(tok, ex)
    assert "Thought:" in text and "Action: search[" in text and "Action: finish[" in text
    assert "Observation" not in text  # tool output carries no loss
    assert "### Instruction" not in text and records[0]["question"] not in text
    assert ex["labels"][-1] == tok.eos_token_id  # learns to stop
    full = tokenize_alpaca(records[0], tok, "all")
    assert full["input_ids"] == ex["input_ids"] and all(lab != IGNORE for lab in full["labels"])


def test_agent_only_mask_chat(tok, records):
    ex = tokenize_chat(records[0], tok, "agent")
    text = _loss_text(tok, ex)
    assert "Action: finish[" in text and "Observation" not in text
    assert records[0]["question"] not in text
    assert len(ex["input_ids"]) == len(ex["labels"])


def test_truncation(tok, records):
    ex = tokenize_alpaca(records[0], tok, "agent", max_length=40)
    assert len(ex["input_ids"]) == len(ex["labels"]) == 40


KEEP_FREED_CHECK = """
import ctypes, os
from pathlib import Path
import torch
from fireact_utils.train import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
big = 64 << 20  # over glibc's largest mmap threshold

def mmapped_while_alive() -> int:
    x = torch.ones(big, dtype=torch.uint8)
    held = libc.mallinfo2().hblkhd
    assert int(x.sum()) == big
    return held

def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

base = libc.mallinfo2().hblkhd
default = mmapped_while_alive() - base
with keep_freed_memory():
    kept_mmapped = mmapped_while_alive() - base
    kept_rss = rss()
print(default >= big, kept_mmapped < big, rss() < kept_rss - big // 2)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_serves_big_tensors_from_the_heap():
    """In a fresh process (a test process that has trained holds big free chunks glibc would reuse
    anyway): a 64 MB tensor is its own mmap by default, comes from the heap inside
    `keep_freed_memory`, and the kept memory goes back to the kernel when it exits."""
    out = subprocess.run([sys.executable, "-c", KEEP_FREED_CHECK], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True"], out.stdout + out.stderr


def test_labelled_positions_only_scores_fewer_rows_same_loss_and_grads(tok, records, model_path):
    """The CPU switch of TRL's fused LM head: only the labelled positions reach the head, and the
    loss and every gradient are those of the stock path (real model, two real trajectories)."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer import utils

    from fireact_utils.train import labelled_positions_only

    rows = [tokenize_alpaca(r, tok, "agent") for r in records[:2]]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [IGNORE] * (width - len(r["labels"])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    scored, apply = [], utils._ChunkedLogProbFunction.apply

    def spy(hidden, *args):
        scored.append(hidden.shape[0])
        return apply(hidden, *args)

    def step():
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        out.loss.backward()
        return out, {n: w.grad.clone() for n, w in model.named_parameters()}

    utils._ChunkedLogProbFunction.apply = spy
    try:
        stock, stock_grads = step()
        with labelled_positions_only():
            compact, compact_grads = step()
        after, _ = step()  # the switch is undone on leaving
    finally:
        utils._ChunkedLogProbFunction.apply = apply
    n_labelled = int((labels[:, 1:] != IGNORE).sum())
    assert scored == [ids.numel() - len(rows), n_labelled, ids.numel() - len(rows)]
    assert n_labelled < 0.7 * scored[0]  # the prompt and observations are most of the text
    torch.testing.assert_close(compact.loss, stock.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compact.is_top1, stock.is_top1)
    for name, grad in stock_grads.items():
        torch.testing.assert_close(compact_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_lora_finetune_lowers_loss_saves_and_changes_agent(tmp_path, records, data_dir):
    from fireact_utils.agent import run_episodes
    from fireact_utils.llm import GenerateBackend
    from fireact_utils.tasks import eval_indices, load_task
    from fireact_utils.tools import RecordedSearch

    p = TrainParams(method="lora", max_steps=6, batch_size=4, learning_rate=2e-3, logging_steps=1, save_steps=3,
                    lora_r=8, lora_alpha=16)
    # Repeated data (the same 4 trajectories) must be memorised: loss goes down.
    out = finetune(records[:4], tmp_path / "ft", p, ModelParams())
    assert (out / "adapter_config.json").is_file() and (out / "train_done.json").is_file()
    with open(tmp_path / "ft" / "train_log.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert sorted(d.name for d in (tmp_path / "ft").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    card = (out / "README.md").read_text()  # names the base model, the data and the recipe
    assert "Base model: `smollm2-135m`" in card and "4 trajectories (hotpotqa:react 4)" in card
    assert "LoRA r=8, alpha=16" in card and "None" not in card
    # Asking again returns the finished result without training; other params are refused.
    assert finetune(records[:4], tmp_path / "ft", p, ModelParams()) == out
    with pytest.raises(ValueError, match=r"made with other settings \(train\.lora_r 8 -> 4\)"):
        finetune(records[:4], tmp_path / "ft", p.model_copy(update={"lora_r": 4}), ModelParams())

    task = load_task("hotpotqa", "dev", data_dir)
    idx = eval_indices(task, 2)
    ap = AgentParams(mode="finetuned", max_turns=2, max_new_tokens=32)
    base = run_episodes(task, idx, GenerateBackend(ModelParams()), RecordedSearch(), ap, progress=False)
    tuned = run_episodes(task, idx, GenerateBackend(adapter_model_params(ModelParams(), out)), RecordedSearch(), ap,
                         progress=False)
    assert [r["steps"] for r in base] != [r["steps"] for r in tuned]


def test_trainer_holds_train_dtype_and_decoder_model_dtype(tmp_path, records, model_path):
    """train.dtype is the weights' dtype while fine-tuning (bf16 weights train and are saved in bf16),
    model.dtype the one the fine-tuned model decodes in; fp32 masters by default, with a note when
    model.dtype alone asks for half precision (before train.dtype, it set training's too)."""
    import warnings

    import torch
    from tiny import tiny_llama  # tests/ is on sys.path (no package)
    from transformers import AutoModelForCausalLM

    from fireact_utils.llm import GenerateBackend

    p = TrainParams(method="full", max_steps=1, batch_size=2, max_length=128, logging_steps=1, bf16=False,
                    dtype="bfloat16")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = finetune(records[:2], tmp_path / "bf16", p, ModelParams(dtype="float32"))
    assert not [w for w in seen if "train.dtype" in str(w.message)]  # fp32 decoding of bf16 training: no note
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    assert json.loads((out / "train_done.json").read_text())["params"]["dtype"] == "bfloat16"
    assert "full fine-tuning" in (out / "README.md").read_text()
    assert GenerateBackend(adapter_model_params(ModelParams(dtype="float32", device="cpu"), out)).model.dtype \
        == torch.float32

    tiny = str(tiny_llama(tmp_path / "tiny", model_path, 0))  # default train.dtype, bf16 decoding: fp32 masters
    mp = ModelParams(name=tiny, dtype="bfloat16", device="cpu")
    with pytest.warns(UserWarning, match="set train.dtype=bfloat16"):
        out = finetune(records[:2], tmp_path / "fp32", p.model_copy(update={"dtype": "float32"}), mp)
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float32
    assert GenerateBackend(adapter_model_params(mp, out)).model.dtype == torch.bfloat16


def test_train_switches_are_params_and_only_those_that_change_numbers_enter_the_key(tmp_path):
    """train.report_to reaches TRL's config ("none" when empty); the CPU speed-ups are params that
    can be turned off; a fine-tune's key (`keys.train_settings`) holds every setting that changes
    its weights, with autos resolved, and none of logging, checkpoint cadence or the allocator."""
    from fireact_utils import keys
    from fireact_utils.config import TrainParams
    from fireact_utils.train import make_sft_config

    assert make_sft_config(TrainParams(report_to=["tensorboard"]), tmp_path, "cpu").report_to == ["tensorboard"]
    assert make_sft_config(TrainParams(), tmp_path, "cpu").report_to == []
    mp = ModelParams(name=str(tmp_path / "absent"), device="cpu")
    base = keys.train_settings(TrainParams(), mp)
    assert base["model.weights"] is None and base["model.device"] == "cpu"  # weights not here: not compared
    assert base["train.bf16"] in (True, False) and base["train.gradient_checkpointing"] is False  # resolved
    for same in ({"logging_steps": 1}, {"save_steps": 7}, {"report_to": ["trackio"]}, {"keep_freed_memory": False},
                 {"labelled_positions_only": False}):
        assert keys.train_settings(TrainParams(**same), mp) == base, same
    for other in ({"learning_rate": 2e-4}, {"epochs": 3.0}, {"dtype": "bfloat16"}, {"bf16": not base["train.bf16"]},
                  {"seed": 1}, {"loss_on": "all"}):
        diff = keys.differences(base, keys.train_settings(TrainParams(**other), mp))
        assert [d.split(" ")[0] for d in diff] == [f"train.{next(iter(other))}"], other


def test_model_card_has_hub_metadata_and_measured_em(tmp_path):
    """The kit's card: base_model, license, datasets and, once evaluated, a model-index with the EM;
    it replaces TRL's card beside the checkpoints too."""
    import json

    import yaml

    from fireact_utils.config import ModelParams, TrainParams
    from fireact_utils.train import record_results

    final = tmp_path / "finetune" / "final"
    final.mkdir(parents=True)
    (tmp_path / "finetune" / "README.md").write_text("TRL's card: [None](https://huggingface.co/None)")
    meta = {"params": TrainParams().model_dump(mode="json"), "model": ModelParams().model_dump(mode="json"),
            "base_path": "/cache/smollm2-135m", "n_examples": 500, "n_tokens": 10, "n_loss_tokens": 5,
            "train_runtime_s": 60.0, "final_loss": 0.5, "data_mix": "hotpotqa:react 500",
            "data_sources": ["fireact:hotpotqa"]}
    (final / "train_done.json").write_text(json.dumps(meta))
    record_results(final, "finetuned_react", "hotpotqa dev", [{"em": True}, {"em": False}, {"em": False}, {"em": True}])
    for card in (final / "README.md", tmp_path / "finetune" / "README.md"):
        text = card.read_text()
        head = yaml.safe_load(text.split("---\n")[1])
        assert head["base_model"] == "smollm2-135m" and head["license"] == "apache-2.0"
        assert head["datasets"] == ["fireact:hotpotqa"] and head["library_name"] == "peft"
        metric = head["model-index"][0]["results"][0]["metrics"][0]
        assert metric == {"type": "exact_match", "value": 50.0, "name": "EM % (4 questions)"}
        assert "hotpotqa dev, 4 questions): EM 50.0%" in text and "huggingface.co/None" not in text
    assert json.loads((final / "eval_results.json").read_text())["finetuned_react"]["n"] == 4


def test_configs_use_transformers_current_names(tmp_path):
    """SFT's and GRPO's configs set activation checkpointing by its current name: the old one makes
    transformers print a FutureWarning into notebook 02 (and 05)."""
    import warnings

    from fireact_utils import rl
    from fireact_utils.config import RLParams
    from fireact_utils.train import make_sft_config

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sft = make_sft_config(TrainParams(gradient_checkpointing=True), tmp_path, "cpu")
        grpo = rl.grpo_config(RLParams(), "float32", tmp_path, "cpu")
    assert sft.activation_checkpointing is True and grpo.activation_checkpointing is False
    assert not [w for w in seen if "checkpointing" in str(w.message)]
