"""Graph-free (detached) solver steps in reduced precision (`deq.solve(detached_dtype=...)`; the model's training
option lost its study, docs/equilibrium-study.md §bf16 graph-free steps, and the solver keeps the mechanism).

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
