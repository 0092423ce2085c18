"""A tiny real model on disk, for tests that need more than one model."""

from pathlib import Path


def tiny_llama(out: Path, tokenizer_dir: str, seed: int) -> Path:
    """A real Llama of 1 layer, 32 wide, random weights of `seed`, with the tokenizer of
    `tokenizer_dir`, saved at `out`: a second model in seconds."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out
