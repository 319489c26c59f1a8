"""Graph-free (detached) training steps in reduced precision (`deq.solve(detached_dtype=...)`, the model's
`train_detached_precision`).

What stays exact: the prefix only moves where the differentiated steps start. f at that start is evaluated
again in full precision, so the reversible gradient equals autograd through the differentiated steps unrolled
from the same start (float64, rel <= 1e-10) and the reversal rebuilds that start to rounding."""

from __future__ import annotations

import pytest
import torch
from test_deq_gradients import _rel
from torch import nn

from revdeq_cli import deq
from revdeq_cli.deq import precision
from revdeq_cli.errors import ConfigError
from revdeq_cli.model import RevDEQConfig, RevDEQForCausalLM


class DtypeFollowingBlock(nn.Module):
    """f(z, x) = 0.7 tanh(W tanh(A z + U x)) computed in z's dtype (its float64 weights cast to it), recording
    the dtype and autocast state of every call."""

    def __init__(self, width: int = 6, hidden: int = 12):
        super().__init__()
        self.a = nn.Parameter(torch.randn(hidden, width, dtype=torch.float64) / width**0.5)
        self.u = nn.Parameter(torch.randn(hidden, width, dtype=torch.float64) / width**0.5)
        self.w = nn.Parameter(torch.randn(width, hidden, dtype=torch.float64) / hidden**0.5)
        self.calls: list[tuple[torch.dtype, torch.dtype, bool]] = []

    def forward(self, z, x):
        self.calls.append((z.dtype, x.dtype, torch.is_autocast_enabled("cpu")))
        a, u, w = (p.to(z.dtype) for p in (self.a, self.u, self.w))
        return 0.7 * torch.tanh(torch.tanh(z @ a.T + x.to(z.dtype) @ u.T) @ w.T)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_prefix_runs_in_that_dtype_and_the_differentiated_steps_stay_exact(dtype):
    torch.manual_seed(0)
    k, n = 6, 3
    z0 = torch.randn(4, 6, dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    results = {}
    for adjoint in (deq.ReversibleAdjoint(), deq.UnrolledAdjoint()):
        torch.manual_seed(1)
        f = DtypeFollowingBlock()
        sol = deq.solve(f, z0, x, solver=deq.Reversible(0.5), adjoint=adjoint, tol=None, max_steps=n,
                        detached_steps=k, detached_dtype=dtype)
        loss = (sol.z**3).sum() + sol.z.sum()
        results[type(adjoint).__name__] = (sol, f, torch.autograd.grad(loss, [x, *f.parameters()]))
    sol, f, rev = results["ReversibleAdjoint"]
    # the prefix (f at z0, then 2 evaluations per step) in `dtype` under autocast; then f at z_k again and
    # the differentiated steps in float64, without autocast
    prefix = 1 + 2 * k
    assert f.calls[:prefix] == [(dtype, dtype, True)] * prefix
    assert set(f.calls[prefix:]) == {(torch.float64, torch.float64, False)}
    assert sol.steps == k + n and sol.nfe == prefix + 1 + 2 * n and sol.z.dtype == torch.float64
    assert sol.backward.reconstruction_error < 1e-12  # the start (y_k, z_k) is rebuilt: f(z_k) was re-evaluated
    ref_sol, _, ref = results["UnrolledAdjoint"]
    assert torch.equal(sol.z.detach(), ref_sol.z.detach())  # the same prefix, the same iterates
    for g_rev, g_ref in zip(rev, ref, strict=True):
        assert _rel(g_rev, g_ref) <= 1e-10
    # and the prefix really ran in low precision: its end is near, not at, the float64 prefix's
    torch.manual_seed(1)
    full = deq.solve(DtypeFollowingBlock().requires_grad_(False), z0, x.detach(), solver=deq.Reversible(0.5),
                     tol=None, max_steps=n, detached_steps=k)
    assert 0 < _rel(sol.z.detach(), full.z) < 5e-2


def test_detached_dtype_is_validated():
    f = DtypeFollowingBlock()
    with pytest.raises(ValueError, match="detached_dtype"):
        deq.solve(f, torch.zeros(2, 6, dtype=torch.float64), torch.zeros(2, 6, dtype=torch.float64),
                  solver=deq.Reversible(0.5), detached_steps=2, detached_dtype=torch.float32)


def test_native_low_precision_is_bf16_only_on_bf16_hardware(monkeypatch):
    precision.native_low_precision.cache_clear()
    try:
        for amx, avx512_bf16, want in ((True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                       (False, False, None)):
            precision.native_low_precision.cache_clear()
            monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
            monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
            assert precision.native_low_precision("cpu") is want
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        for capability, want in (((8, 0), torch.bfloat16), ((7, 5), None)):
            precision.native_low_precision.cache_clear()
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
            assert precision.native_low_precision("cuda") is want
        assert precision.native_low_precision("meta") is None
    finally:
        precision.native_low_precision.cache_clear()


def _model(precision_name: str, dtype: torch.dtype = torch.float32) -> RevDEQForCausalLM:
    torch.manual_seed(0)
    config = RevDEQConfig(vocab_size=40, hidden_size=16, num_attention_heads=2, max_position_embeddings=16,
                          init_state="input", block_skip="input", max_steps=2, tol=None,
                          train_detached_precision=precision_name)
    return RevDEQForCausalLM(config).to(dtype).train()


def test_model_runs_its_detached_steps_in_the_configured_precision(monkeypatch):
    ids = torch.randint(0, 40, (2, 12))
    seen = []
    outputs = {}
    for name in ("same", "bf16"):
        model = _model(name)
        model.blocks[0].register_forward_pre_hook(lambda module, args, name=name: seen.append((name, args[0].dtype)))
        out = model(ids, labels=ids, solver_steps=2, detached_steps=3)
        out.loss.backward()
        outputs[name] = out
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.blocks[0].parameters())
    assert [d for n, d in seen if n == "same"] == [torch.float32] * len([1 for n, _ in seen if n == "same"])
    bf16 = [d for n, d in seen if n == "bf16"]
    assert bf16[:7] == [torch.bfloat16] * 7 and set(bf16[7:]) == {torch.float32}  # the prefix: 1 + 2 * 3 calls
    assert float(outputs["bf16"].loss.detach()) != float(outputs["same"].loss.detach())  # another start ...
    gap = abs(float(outputs["bf16"].loss.detach()) - float(outputs["same"].loss.detach()))
    assert gap < 0.05  # ... near the same one
    # "auto" follows the hardware; a float64 model keeps float64 (autocast leaves float64 weights alone)
    monkeypatch.setattr(precision, "native_low_precision", lambda device: None)
    monkeypatch.setattr("revdeq_cli.model.modeling.native_low_precision", lambda device: None)
    assert _model("auto")._detached_dtype(torch.device("cpu")) is None
    monkeypatch.setattr("revdeq_cli.model.modeling.native_low_precision", lambda device: torch.bfloat16)
    assert _model("auto")._detached_dtype(torch.device("cpu")) is torch.bfloat16
    assert _model("bf16", torch.float64)._detached_dtype(torch.device("cpu")) is None


def test_model_gradient_with_a_bf16_prefix_equals_the_unrolled_one():
    ids = torch.randint(0, 40, (2, 12))
    grads = {}
    for adjoint in ("reversible", "unrolled"):
        model = _model("bf16")
        model.config.adjoint = adjoint
        out = model(ids, labels=ids, solver_steps=3, detached_steps=4)
        out.loss.backward()
        grads[adjoint] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert grads["reversible"].keys() == grads["unrolled"].keys()
    for name, g in grads["unrolled"].items():  # float32 f: equal to its rounding
        assert _rel(grads["reversible"][name], g) <= 1e-4, name


def test_train_detached_precision_is_validated():
    with pytest.raises(ConfigError, match="^train_detached_precision: must be one of same, bf16, auto"):
        RevDEQConfig(train_detached_precision="fp8")
