"""The CPU evaluation's tanh-GELU (x sigmoid(2u)) is transformers' tanh-GELU, no less accurate, and
every evaluation forward of a GPT-2 on the CPU runs it (prefill, latent steps, <eot>, decoding)."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

from simcot.models import tanh_gelu as tg
from simcot.models.decoding import greedy_decode, left_pad, prefill_ids
from simcot.models.latent_lm import LatentLM
from simcot.models.presets import PRESETS
from simcot.models.rollout import prefill_latents
from simcot.models.rollout_reference import naive_generate


def _exact(x: torch.Tensor) -> torch.Tensor:
    """The function in float64, in the sigmoid form: 1 + tanh(u) cancels even in float64 for u << 0."""
    x = x.double()
    return x * torch.sigmoid(2 * (2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3))


@pytest.mark.parametrize("own", [NewGELUActivation(), FastGELUActivation(), GELUTanh()])
def test_tanh_gelu_is_as_accurate_as_transformers_own(own):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.linspace(-12, 12, 200_001), torch.randn(100_000, generator=g) * 3])
    ref = _exact(x)
    ours, theirs = tg.tanh_gelu(x), own(x)
    assert ours.dtype == torch.float32
    rel = lambda y, m: ((y.double() - ref).abs()[m] / ref[m].abs()).max()  # noqa: E731
    eps = torch.finfo(torch.float32).eps
    # |value| >= 1: within 1.5 float32 ulps, as theirs
    assert rel(ours, ref.abs() >= 1) < 1.5 * eps
    # down to the float32 normals: the relative error stays ~|2u| ulps (the function's own conditioning),
    # where 1 + tanh(u) cancels to a few digits, or to 0
    assert rel(ours, ref.abs() > 1e-30) < 2e-5
    assert rel(ours, ref.abs() > 1e-6) < 2e-6 < 1e-2 < rel(theirs, ref.abs() > 1e-6)


def test_tanh_gelu_with_gradients_computes_the_same_bits_and_the_right_gradient():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    with torch.no_grad():
        in_place = tg.tanh_gelu(x)
    xg = x.clone().requires_grad_()
    out = tg.tanh_gelu(xg)
    assert torch.equal(out.detach(), in_place)
    out.sum().backward()
    xr = x.clone().requires_grad_()
    NewGELUActivation()(xr).sum().backward()
    assert torch.allclose(xg.grad, xr.grad, rtol=1e-12, atol=1e-14)


def _gpt2(dtype=torch.float64, activation="gelu_new"):
    torch.manual_seed(0)
    cfg = PRESETS["tiny-gpt2"].hf_config(vocab_size=40, hidden_size=32, num_layers=2, num_heads=2)
    cfg.initializer_range, cfg.pad_token_id, cfg.activation_function = 0.2, 0, activation
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def test_cpu_tanh_gelu_swaps_the_modules_only_on_the_cpu_for_full_precision_and_puts_them_back():
    lm = _gpt2()
    own = [block.mlp.act for block in lm.transformer.h]
    with tg.cpu_tanh_gelu(lm, torch.device("cpu")):
        assert all(block.mlp.act is tg.TANH_GELU for block in lm.transformer.h)
    assert [block.mlp.act for block in lm.transformer.h] == own
    with pytest.raises(RuntimeError, match="inside"):
        with tg.cpu_tanh_gelu(lm, torch.device("cpu")):
            raise RuntimeError("inside")
    assert [block.mlp.act for block in lm.transformer.h] == own
    with tg.cpu_tanh_gelu(lm, torch.device("cuda")):  # only the device's type is read
        assert [block.mlp.act for block in lm.transformer.h] == own
    bf16 = _gpt2(torch.bfloat16)
    with tg.cpu_tanh_gelu(bf16, torch.device("cpu")):
        assert all(type(block.mlp.act) is NewGELUActivation for block in bf16.transformer.h)
    with tg.cpu_tanh_gelu(lm, torch.device("cpu")):  # nested: the inner block leaves the outer's swap
        with tg.cpu_tanh_gelu(lm, torch.device("cpu")):
            pass
        assert all(block.mlp.act is tg.TANH_GELU for block in lm.transformer.h)
    assert [block.mlp.act for block in lm.transformer.h] == own
    lm.transformer.h[1].mlp.act = fresh = NewGELUActivation()  # replaced after the first look-up: found again
    with tg.cpu_tanh_gelu(lm, torch.device("cpu")):
        assert all(block.mlp.act is tg.TANH_GELU for block in lm.transformer.h)
    assert lm.transformer.h[1].mlp.act is fresh
    other = _gpt2(activation="gelu")  # erf GELU: not a tanh one
    with tg.cpu_tanh_gelu(other, torch.device("cpu")):
        assert all(block.mlp.act is not tg.TANH_GELU for block in other.transformer.h)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu_pytorch_tanh"])
def test_evaluation_on_the_cpu_runs_it_everywhere_and_generates_what_the_plain_model_does(activation, monkeypatch):
    """Prompt, latents, <eot> and every decoded token run through `tanh_gelu` (counted), and the
    generations equal Coconut's per-sample generate on the model's own modules, token for token."""
    calls = []
    real = tg.tanh_gelu
    monkeypatch.setattr(tg, "tanh_gelu", lambda x: calls.append(x.shape) or real(x))
    model = LatentLM(_gpt2(activation=activation))
    g = torch.Generator().manual_seed(2)
    prefixes = [torch.randint(5, 40, (n,), generator=g).tolist() + [2] for n in (4, 7, 2)]
    ids, mask = left_pad(prefixes, 0)
    state, _ = prefill_latents(model, ids, mask, torch.tensor([3, 3, 3]), 3, 3)
    out = greedy_decode(model.lm, state, 8, eos_id=-1, pad_id=0)
    layers = len(model.lm.transformer.h)
    assert len(calls) == layers * (1 + 3 + 1 + 7)  # prompt (one group), 3 latents, <eot>, 7 more tokens
    assert all(type(block.mlp.act) is not tg.TanhGELU for block in model.lm.transformer.h)
    calls.clear()
    refs = [naive_generate(model, p, 3, 3, 8, eos_id=-1) for p in prefixes]
    assert not calls  # the reference ran the model's own modules
    assert out.tolist() == refs
    state = prefill_ids(model.lm, ids, mask)  # the prompt-only path (No-CoT, CoT) too
    assert len(calls) == layers
