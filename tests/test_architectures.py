"""The kit on other model families than SmolLM2's, with tiny random models and tokenizers built
here (no downloads): Llama (Llama-3's byte-level BPE, a BOS, two EOS ids), Mistral (SentencePiece
BPE, a BOS), Gemma 3 (Gemma's tokenizer and chat template, a BOS, sliding-window layers) and Qwen3
(Qwen's byte-level BPE, no BOS, two EOS ids). For each:
- SFT's labelled-positions LM head gives transformers' own loss and gradients, and pads get none;
- SFT trains on the tokens inference sees for the same text: BOS, and each piece of the trajectory
  tokenized as it stands in the whole text;
- generation stops at every EOS id of the generation config, without the pads after it;
- GRPO rollouts see exactly what evaluation shows the model (prompt format, parsing, dtype), and
  give loss to none of its EOS or pads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fireact_utils import rl
from fireact_utils.agent import Agent, Episode, run_episodes
from fireact_utils.config import AgentParams, load_params
from fireact_utils.llm import GenerateBackend, encode
from fireact_utils.models import load_model
from fireact_utils.pipeline import finetuned_agent
from fireact_utils.tasks import Task
from fireact_utils.tokens import eos_ids, piece_ids
from fireact_utils.train import IGNORE, labelled_positions_only, tokenize_alpaca, tokenize_chat
from fireact_utils.trajectories import ALPACA_HEADER

FAMILIES = ("llama", "mistral", "gemma3", "qwen3")
WANTS_BOS = {"llama": True, "mistral": True, "gemma3": True, "qwen3": False}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATML_BOS = "{{ bos_token }}" + CHATML  # Llama-3's and Mistral's templates write the BOS themselves
GEMMA_CHAT = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
              "else m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

# Each question's turns as the scripted model writes them. The second one's first turn is a Thought
# without an Action, ended by the generation config's other EOS.
TURNS = {
    "What is the capital of France?": ["Thought: I need to search France.\nAction: search[France]\n",
                                       "Thought: The capital is Paris.\nAction: finish[Paris]\n"],
    "Who wrote Hamlet?": ["Thought: I should look it up.", " search[Hamlet]\n", "Action: finish[Shakespeare]\n"],
}
ANSWERS = ["Paris", "Shakespeare"]
PAGES = {"France": "France is a country in Europe. Its capital is Paris.",
         "Hamlet": "Hamlet is a tragedy written by William Shakespeare."}


def search(query: str) -> str:
    return PAGES.get(query, "No results.")


@dataclass
class Family:
    name: str
    path: str
    tok: object  # as `models.load_model` loads it from `path`
    other_eos: int  # an EOS id of the generation config that is not the tokenizer's (its own where none)
    turn_end: int  # the chat template's end of a turn (an EOS id of the generation config)


def _sentencepiece_bpe(specials: list[str]) -> tuple[dict, list]:
    """(vocab, merges) of a small SentencePiece-style BPE, as Llama-2's, Mistral's and Gemma's: spaces
    as '▁', byte tokens for what it lacks (the newline among them, as in Llama-2); `specials` first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    corpus = [line for text in [ALPACA_HEADER, *TURNS, *PAGES.values(), *(t for ts in TURNS.values() for t in ts),
                                "Observation: Episode finished, reward = True"] for line in text.split("\n")] * 5
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=700, special_tokens=specials + bytes_,
                                                        show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def _tokenizer(name: str, smollm2: str):
    """(tokenizer, the generation config's EOS ids, its chat template's end of turn first) of a
    family, built from SmolLM2's byte-level vocabulary or a SentencePiece-style one trained here."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import AutoTokenizer, GemmaTokenizer, LlamaTokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer

    if name in ("llama", "qwen3"):
        backend = AutoTokenizer.from_pretrained(smollm2).backend_tokenizer
        if name == "qwen3":  # no BOS; pad <|endoftext|> (id 0), which the generation config also stops at
            model = json.loads(backend.to_str())["model"]
            tok = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                                 eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML)
            return tok, [tok.eos_token_id, 0]
        backend = Tokenizer.from_str(backend.to_str())  # Llama-3: its post-processor starts every text with the BOS
        backend.post_processor = processors.TemplateProcessing(single="<repo_name> $A", special_tokens=[("<repo_name>", 3)])
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<repo_name>", eos_token="<|im_end|>",
                                      chat_template=CHATML_BOS)
        return tok, [tok.eos_token_id, 0]
    turn = ["<start_of_turn>", "<end_of_turn>"] if name == "gemma3" else ["<|im_start|>", "<|im_end|>"]
    if name == "gemma3":
        vocab, merges = _sentencepiece_bpe(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *turn])
        tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, chat_template=GEMMA_CHAT)
    else:
        vocab, merges = _sentencepiece_bpe(["<unk>", "<s>", "</s>", *turn])
        tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, chat_template=CHATML_BOS)
    tok.add_tokens([AddedToken(t, special=True) for t in turn])
    return tok, [tok.convert_tokens_to_ids(turn[1]), tok.eos_token_id]


def _config(name: str, tok):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen3Config

    common = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 1024,
              "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if name == "gemma3":  # windows shorter than a turn, so the sliding layers do cut
        return Gemma3TextConfig(**common, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                                query_pre_attn_scalar=16)
    return {"llama": LlamaConfig, "mistral": MistralConfig, "qwen3": Qwen3Config}[name](**common)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, model_path, tmp_path_factory) -> Family:
    """A tiny random model of the family and its tokenizer, saved together as a checkpoint dir."""
    from transformers import AutoModelForCausalLM

    name = request.param
    tok, eos = _tokenizer(name, model_path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(name, tok))
    model.generation_config.eos_token_id = eos
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    _, tok = load_model(str(path), device="cpu", dtype="float32")  # as every stage loads it
    return Family(name, str(path), tok, next((e for e in eos if e != tok.eos_token_id), tok.eos_token_id), eos[0])


def _record() -> dict:
    """The first question's trajectory, observations included, as evaluation records it."""
    q = next(iter(TURNS))
    return {"question": q, "steps": [
        {"thought": "I need to search France.", "action": "search", "arg": "France", "observation": PAGES["France"]},
        {"thought": "The capital is Paris.", "action": "finish", "arg": "Paris",
         "observation": "Episode finished, reward = True"}]}


def _batch(rows: list[dict], tok) -> dict:
    """SFTTrainer's own collation of tokenized rows (right-padded, pads labelled -100)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(rows)


def test_labelled_positions_head_gives_stock_loss_and_gradients(family):
    """SFT as the kit trains on a CPU (TRL's fused head, `labelled_positions_only`) against the
    model's own loss, on a right-padded batch of two trajectories (loss on all and on the agent)."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    rec = _record()
    short = {**rec, "steps": rec["steps"][1:]}
    rows = [tokenize_alpaca(rec, family.tok, "agent"), tokenize_alpaca(short, family.tok, "all")]
    batch = _batch(rows, family.tok)
    pads = batch["attention_mask"] == 0
    assert pads.any() and (batch["labels"][pads] == IGNORE).all()  # pads get no loss
    assert batch["labels"][0, len(rows[0]["labels"]) - 1] == family.tok.eos_token_id  # the closing EOS does
    model = AutoModelForCausalLM.from_pretrained(family.path, dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does

    def loss_and_grads(**kw):
        model.zero_grad()
        loss = model(**batch, **kw).loss
        loss.backward()
        return loss, {n: w.grad.clone() for n, w in model.named_parameters()}

    stock, stock_grads = loss_and_grads()  # transformers' own cross-entropy on the full logits
    with labelled_positions_only():
        ours, our_grads = loss_and_grads(fused_lm_head=True)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-6)
    for name, grad in stock_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("fmt", ["alpaca", "chat"])
def test_sft_trains_on_the_tokens_inference_sees(family, fmt):
    """At every turn, the prompt inference encodes (`Agent.prompt`, `llm.encode`) is a prefix of the
    SFT example's tokens, and the model's turn starts right after it: BOS included where the
    tokenizer wants one, the trajectory's pieces tokenized as in the whole text."""
    tok, rec = family.tok, _record()
    ex = (tokenize_alpaca if fmt == "alpaca" else tokenize_chat)(rec, tok, "agent")
    agent = Agent(Task("toy", "train", "qa", [rec["question"]], ["Paris"]), AgentParams(mode="finetuned", format=fmt),
                  search)
    for k in range(len(rec["steps"])):
        prompt = encode(tok, agent.prompt(Episode("e", 0, rec["question"], "Paris", "react", steps=rec["steps"][:k])))
        prompt = prompt.tolist()
        assert ex["input_ids"][:len(prompt)] == prompt, f"turn {k}: training's tokens differ from the prompt's"
        assert ex["labels"][len(prompt)] != IGNORE, f"turn {k}: the model's turn does not start after the prompt"
        if fmt == "alpaca":
            assert ex["labels"][len(prompt) - 1] == IGNORE
    n_bos = 1 if WANTS_BOS[family.name] else 0
    assert ex["input_ids"][:n_bos] == [tok.bos_token_id] * n_bos and ex["input_ids"].count(tok.bos_token_id) == n_bos


class Scripted:
    """The model made to write given token ids: each row of a `generate` call gets `script(context)`'s
    ids, one per step (their logit raised by 1e4), until `generate`'s own stopping ends it. Every
    row's context (without its padding) is kept in `contexts`."""

    def __init__(self, model, script):
        self.script, self.contexts, self.plan, self.step = script, [], [], 0
        model.get_output_embeddings().register_forward_hook(self._force)
        inner = model.generate

        def generate(input_ids, attention_mask, **kw):
            rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask, strict=True)]
            self.contexts += rows
            self.plan, self.step = [script(r) for r in rows], 0
            return inner(input_ids=input_ids, attention_mask=attention_mask, **kw)

        model.generate = generate

    def _force(self, module, args, logits):
        for row, ids in enumerate(self.plan):
            if self.step < len(ids):
                logits[row, -1, ids[self.step]] += 1e4
        self.step += 1
        return logits


def test_generation_stops_at_every_eos_of_the_generation_config(family):
    """A row that writes the generation config's other EOS ends there in `continue_ids` (what GRPO
    trains on) and in `generate`'s token counts, while the other row runs on: no pads are its tokens."""
    model, tok = load_model(family.path, device="cpu", dtype="float32")
    a = int(encode(tok, "a")[-1])
    Scripted(model, lambda ctx: [a] * 8 if ctx[-1] == a else [a, a, family.other_eos])
    backend = GenerateBackend(model=model, tokenizer=tok)
    contexts = [encode(tok, p).tolist() for p in ("a", "b")]
    assert backend.continue_ids(contexts, [], 8, 0.0) == [[a] * 8, [a, a, family.other_eos]]
    assert [g.completion_tokens for g in backend.generate(["a", "b"], [], 8)] == [8, 3]


def _script(tok, fmt: str, family: Family):
    """The scripted model of `TURNS`: each question's next turn, as the tokens inference would read
    it in; in chat every turn ends with the template's end of turn, in the Alpaca format a turn
    without a newline (a Thought without an Action) with the generation config's other EOS."""
    done = dict.fromkeys(TURNS, 0)

    def script(ctx: list[int]) -> list[int]:
        q = next(q for q in TURNS if q in tok.decode(ctx))
        text = TURNS[q][done[q]]
        done[q] += 1
        if fmt == "chat":
            return piece_ids(tok, text.rstrip("\n")) + [family.turn_end]
        return piece_ids(tok, text) + ([] if text.endswith("\n") else [family.other_eos])

    return script


@pytest.mark.parametrize("fmt", ["alpaca", "chat"])
def test_rollouts_see_what_evaluation_sees(family, fmt):
    """The same scripted model, evaluated (`run_episodes` on `GenerateBackend`) and rolled out for
    GRPO (`Rollouts`): the parsed episodes are the same, and so is every turn's context, token for
    token where the model writes what evaluation's prompt re-renders (the first question), as text
    after the Alpaca format's Thought without an Action (re-rendered in chat). The rollout's model
    tokens are SFT's labelled ones, with no EOS or pad among them (chat: only each turn's end)."""
    p = load_params(None, {"model.name": family.path, "model.device": "cpu", "train.format": fmt,
                           "agent.max_turns": 4, "agent.max_new_tokens": 80, "rl.max_episode_tokens": 1000})
    task = Task("toy", "train", "qa", list(TURNS), ANSWERS)
    seen = {}
    for who in ("evaluation", "rollouts"):
        model, tok = load_model(family.path, device="cpu", dtype="float32")
        scripted = Scripted(model, _script(tok, fmt, family))
        if who == "evaluation":
            recs = run_episodes(task, [0, 1], GenerateBackend(model=model, tokenizer=tok), search, finetuned_agent(p),
                                progress=False)
        else:
            recs, prompt_ids, comp, env = rl.Rollouts(finetuned_agent(p), p.rl, task, search, tok).episodes(model, list(TURNS))
        assert [r["em"] for r in recs] == [True, True]
        seen[who] = ([(r["steps"], r["status"], r["answer"]) for r in recs],
                     [[ctx for ctx in scripted.contexts if q in tok.decode(ctx)] for q in TURNS])
    (evaluated, (first, second)), (rolled, (first_rl, second_rl)) = seen["evaluation"], seen["rollouts"]
    assert rolled == evaluated
    assert first_rl == first
    if fmt == "alpaca":
        assert [tok.decode(c) for c in second_rl] == [tok.decode(c) for c in second]
    ex = (tokenize_alpaca if fmt == "alpaca" else tokenize_chat)(recs[0], tok, "agent")
    ids = prompt_ids[0] + comp[0]
    assert ids == ex["input_ids"][:len(ids)]
    labelled = [lab != IGNORE for lab in ex["labels"][len(prompt_ids[0]):len(ids)]]
    if fmt == "alpaca":
        assert env[0] == labelled
    else:  # SFT also labels the template's assistant header, which rollouts read as the prompt's
        assert all(lab for lab, m in zip(labelled, env[0], strict=True) if m)
    stops = eos_ids(tok) | {tok.pad_token_id}
    for c, m in zip(comp, env, strict=True):
        ends = [i for i, t in enumerate(c) if t in stops and m[i]]  # model tokens that end a generation
        assert not ends if fmt == "alpaca" else all(i + 1 == len(c) or not m[i + 1] for i in ends), tok.decode(c)


def test_grpo_policy_has_evaluations_dtype(family, monkeypatch, tmp_path):
    """GRPO's policy (and so its rollouts) is loaded in model.dtype, as evaluation loads the model
    (auto: fp32 on a CPU), with bf16 autocast where that is bf16."""
    from fireact_utils import tools

    monkeypatch.setattr(rl, "training_prompts", lambda p: (Task("toy", "train", "qa", list(TURNS), ANSWERS), None))
    monkeypatch.setattr(tools, "make_search", lambda *a: search)
    for dtype, want in (("auto", torch.float32), ("bfloat16", torch.bfloat16)):
        p = load_params(None, {"model.name": family.path, "model.device": "cpu", "model.dtype": dtype})
        model, *_ = rl._student(p, family.path)
        assert model.dtype == want
        assert rl.grpo_config(p.rl, p.model.dtype, Path(tmp_path), "cpu").bf16 == (want == torch.bfloat16)
