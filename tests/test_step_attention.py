"""The attention of single-position steps on the CPU: transformers' eager math bit for bit, for every
model family it is used for, and one opaque op under torch.compile."""

import importlib

import pytest
import torch

from simcot.models.step_attention import STANDARD_ATTENTION, STEP_ATTENTION, _attention, step_attention


def _inputs(kv_heads=4, heads=4, t=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(3, heads, 1, d, generator=g)  # (B, H, 1, D)
    k, v = (torch.randn(3, kv_heads, t, d, generator=g) for _ in range(2))  # (B, H_kv, T, D)
    hidden = torch.rand(3, t, generator=g) < 0.3  # (B, T)
    hidden[:, -1] = False  # every row attends to something
    mask = torch.zeros(3, t).masked_fill(hidden, torch.finfo(torch.float32).min)[:, None, None, :]  # (B, 1, 1, T)
    return q, k, v, mask


class _Module(torch.nn.Module):
    """What the families' eager attention functions read from their attention module."""

    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups
        self.eval()


@pytest.mark.parametrize("family", STANDARD_ATTENTION)
def test_step_attention_is_each_familys_eager_attention_bit_for_bit(family):
    theirs = importlib.import_module(f"transformers.models.{family}.modeling_{family}").eager_attention_forward
    shapes = [(4, 4)] if family == "gpt2" else [(4, 4), (2, 4)]  # GPT-2 has no grouped-query attention
    for kv_heads, heads in shapes:
        q, k, v, mask = _inputs(kv_heads, heads)
        module = _Module(heads // kv_heads)
        want, _ = theirs(module, q, k, v, mask, scaling=0.37, dropout=0.0)
        got, weights = _attention(module, q, k, v, mask, scaling=0.37, dropout=0.0)
        assert weights is None
        assert got.shape == (3, 1, heads, 8) and got.is_contiguous()
        assert torch.equal(got, want.contiguous())


def test_under_torch_compile_the_step_attention_is_one_opaque_op():
    """inductor's code for a one-row attention is slower on the CPU than two eager matmuls: the
    compiled step must hand the attention over whole, as the op `simcot::step_attention`."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(q, k, v, mask):
        return _attention(None, q, k, v, mask, scaling=0.37)[0] * 2

    q, k, v, mask = _inputs(2, 4)
    got = torch.compile(step, backend=backend, fullgraph=True)(q, k, v, mask)
    called = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert any("simcot.step_attention" in c for c in called), called
    assert not any("matmul" in c or "bmm" in c or "softmax" in c for c in called), called
    assert torch.equal(got, step(q, k, v, mask))


def test_steps_run_it_on_the_cpu_for_standard_families_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert step_attention("sdpa", cpu, "llama") == STEP_ATTENTION
    assert step_attention("eager", cpu, "gpt2") == STEP_ATTENTION
    assert step_attention("sdpa", cpu, "gemma2") == "eager"  # logit soft-capping: its own eager attention
    assert step_attention("sdpa", cuda, "llama") == "sdpa"
    assert step_attention("flash_attention_2", cpu, "llama") == "flash_attention_2"
