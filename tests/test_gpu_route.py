"""The GPU route, correct by construction and checked without a GPU: the vLLM server's command line
and environment on a card (its memory share, CUDA_VISIBLE_DEVICES), a fine-tune or GRPO that stops
the server on its card before weights load, bf16 only where the card has it, FSDP saving one full
model, and the setup that pins the CUDA vLLM and marks .venv-vllm done only once it imports.
Servers here are `servers.fake_vllm`: real processes on loopback, up in a fraction of a second."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from fireact_utils import keys, models
from fireact_utils.config import ModelParams, TrainParams
from fireact_utils.train import use_bf16

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def card(monkeypatch):
    """A CUDA card as torch reports it, at the one point the kit asks (`models.bf16_supported`):
    `card.bf16` sets what it answers; `card.asked` lists the device it was asked about and whether
    emulation was allowed."""
    class Card:
        def __init__(self) -> None:
            self.bf16, self.asked = True, []

    c = Card()
    monkeypatch.setattr(torch.cuda, "device", lambda d: c.asked.append(str(d)) or nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: c.asked.append(including_emulation) or c.bf16)
    return c



# ---------------------------------------------------------------- bf16 only where the card has it

@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_dtypes_are_bf16_only_on_a_card_that_has_it(card, has_bf16):
    """Every `auto` resolves through `models.bf16_supported`, which asks torch without emulation
    (a pre-Ampere card emulates bf16 slowly, and vLLM refuses it): decoding in bf16 or fp16, bf16
    autocast on or off for training, and the settings a key or a pre-registration records."""
    card.bf16 = has_bf16
    want = torch.bfloat16 if has_bf16 else torch.float16
    assert models.pick_dtype("auto", "cuda:1") == want and card.asked == ["cuda:1", False]
    assert use_bf16(TrainParams(), "cuda") is has_bf16 and use_bf16(TrainParams(bf16=True), "cuda")
    settings = keys.model_settings(ModelParams(device="cuda:1"), decoder=False)
    assert settings == {"model.device": "cuda", "model.dtype": str(want).removeprefix("torch.")}
    assert models.pick_dtype("auto", "cpu") == torch.float32 and models.pick_dtype("bfloat16", "cuda") == torch.bfloat16
