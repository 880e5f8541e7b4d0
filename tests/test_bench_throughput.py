"""bench/train_throughput.py's FLOP count: the matrix products a step executes, a frozen LM's backward
without weight-gradient products, and CPU attention counted (tiny GPT-2 and tensors built here)."""

from __future__ import annotations

import pytest
import torch

from bench.train_throughput import counting

B, T, D, HEADS, VOCAB = 2, 8, 64, 4, 100
# forward FLOPs of one layer's linear products (qkv 3D^2, out D^2, MLP 2 x 4D^2) and of the output layer
LINEAR = 2 * B * T * (3 * D * D + D * D + 2 * 4 * D * D)
HEAD = 2 * B * T * D * VOCAB


def _step_flops(trained: bool) -> tuple[int, dict]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=D, n_head=HEADS, vocab_size=VOCAB, n_positions=T))
    lm.requires_grad_(trained)
    x = torch.randn(B, T, D, requires_grad=True)  # the mapper's prefix: its gradient is always needed
    with counting(True) as c:
        lm(inputs_embeds=x).logits.sum().backward()
    return c.get_total_flops(), c.get_flop_counts()["Global"]


def test_frozen_lm_backward_counts_activation_gradients_only() -> None:
    frozen, _ = _step_flops(trained=False)
    trained, _ = _step_flops(trained=True)
    # weight gradients: one more product per linear layer and for the output layer, nothing else
    assert trained - frozen == LINEAR + HEAD
    assert frozen >= 2 * (LINEAR + HEAD)  # forward + activations' gradients (+ attention)


@pytest.mark.parametrize("mask", [None, torch.ones(B, 1, T, T, dtype=torch.bool)], ids=["no mask", "mask"])
def test_cpu_attention_is_counted(mask) -> None:
    q = torch.randn(B, HEADS, T, D // HEADS, requires_grad=True)
    k, v = torch.randn(B, HEADS, T, D // HEADS), torch.randn(B, HEADS, T, D // HEADS)
    with counting(True) as c:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
    counts = {str(k): n for k, n in c.get_flop_counts()["Global"].items()}
    forward = 4 * B * HEADS * T * T * (D // HEADS)  # QK^T and AV
    op = "aten._scaled_dot_product_flash_attention_for_cpu"  # the kernel torch runs on a CPU
    assert counts[op] == forward
    assert counts[f"{op}_backward"] == forward * 5 // 2  # scores recomputed + four gradient products


def test_not_counting_is_a_no_op() -> None:
    with counting(False) as c:
        torch.ones(2, 2) @ torch.ones(2, 2)
    assert c is None
