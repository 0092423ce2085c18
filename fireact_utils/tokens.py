"""Token ids as every stage sees them, whatever the model family.

Inference (`llm.encode`), SFT (`train.tokenize_alpaca`) and GRPO rollouts (`rl.Rollouts`) encode
text by the same three rules, so the tokens a trajectory trains on are those the model meets in use:
- a text starts with the BOS the tokenizer's own rules add (Llama, Gemma, Mistral), or with none
  (SmolLM2, Qwen): `bos_ids`;
- a trajectory's later pieces are tokenized as they stand in the whole text, after a newline, not
  alone: a SentencePiece tokenizer starts a lone piece with '▁' ('▁Thought' where the prompt the
  model reads has 'Thought'): `piece_ids`;
- a generation ends at every EOS id of the model's generation config (a list for Llama-3 and
  Qwen-Instruct), not only at the tokenizer's EOS: `eos_ids`.

    ids = text_ids(tok, prompt) + piece_ids(tok, "Observation: ...\\n")
"""

from __future__ import annotations

import functools


def bos_ids(tok) -> list[int]:
    """[BOS] where the tokenizer's own rules (`add_bos_token`, its post-processor) start a text with
    one, else []. Added by hand: `add_special_tokens=True` may also end a prompt with an EOS."""
    bos = tok.bos_token_id
    return [bos] if bos is not None and tok("", add_special_tokens=True)["input_ids"][:1] == [bos] else []


def text_ids(tok, text: str) -> list[int]:
    """Ids of a whole text (a prompt, a trajectory's first piece)."""
    return bos_ids(tok) + tok(text, add_special_tokens=False)["input_ids"]


def piece_ids(tok, text: str) -> list[int]:
    """Ids of `text` where it follows a newline inside a longer text, as the whole text's
    tokenization has them; `text` alone where the newline would merge into its first token."""
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    ids = tok("\n" + text, add_special_tokens=False)["input_ids"]
    return ids[len(newline):] if ids[:len(newline)] == newline else tok(text, add_special_tokens=False)["input_ids"]


def eos_ids(tok, generation_config=None) -> set[int]:
    """Every id that ends a generation: the tokenizer's EOS and each EOS of `generation_config`
    (default: the one saved next to the tokenizer; the kit loads a model and its tokenizer from one dir)."""
    config = generation_config or _saved_generation_config(tok.name_or_path)
    eos = getattr(config, "eos_token_id", None)
    return ({tok.eos_token_id} | set(eos if isinstance(eos, list) else [eos])) - {None}


@functools.lru_cache(maxsize=32)
def _saved_generation_config(path: str):
    from transformers import GenerationConfig

    if not path:  # a tokenizer built in memory
        return None
    try:
        return GenerationConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):  # no generation_config.json there: the tokenizer's EOS alone
        return None
