"""The losses against hand-computed values, and their gradient, precision and invariance properties."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.losses import byol_loss, info_nce, nt_xent, simsiam_loss

S = 1 / math.sqrt(2)  # cosine of 45 degrees


def test_nt_xent_by_hand():
    # Normalised rows: a=(1,0), b=(0,1) | c=(1,0), d=(S,S); positives a-c and b-d.
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    t = 0.5
    e = math.exp
    l_a = -math.log(e(1 / t) / (e(0 / t) + e(1 / t) + e(S / t)))  # a.b=0, a.c=1, a.d=S
    l_b = -math.log(e(S / t) / (e(0 / t) + e(0 / t) + e(S / t)))  # b.a=0, b.c=0, b.d=S
    l_c = -math.log(e(1 / t) / (e(1 / t) + e(0 / t) + e(S / t)))  # c.a=1, c.b=0, c.d=S
    l_d = -math.log(e(S / t) / (3 * e(S / t)))  # d.a = d.b = d.c = S
    expected = (l_a + l_b + l_c + l_d) / 4
    assert nt_xent(z1, z2, temperature=t).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_all_equal_is_log_of_candidates():
    z = torch.ones(3, 4)
    assert nt_xent(z, z, temperature=0.1).item() == pytest.approx(math.log(2 * 3 - 1), rel=1e-6)
    assert nt_xent(z.double(), z.double()).dtype == torch.float64  # float64 is kept


def test_nt_xent_invariances():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    ref = nt_xent(z1, z2)
    torch.testing.assert_close(nt_xent(3.0 * z1, 0.25 * z2), ref)  # cosine: scale-free
    torch.testing.assert_close(nt_xent(z2, z1), ref)  # symmetric in the views
    perm = torch.randperm(6, generator=g)
    torch.testing.assert_close(nt_xent(z1[perm], z2[perm]), ref)  # order of the batch


def test_nt_xent_distributed_form_matches_full_batch():
    """Anchors of each 'rank' against the whole candidate set average to the full loss and gradient."""
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True)
    full = nt_xent(z1, z2, 0.2)
    (g1_full, g2_full) = torch.autograd.grad(full, (z1, z2))
    world, n = 2, 4
    parts = [
        nt_xent(z1[r * n : (r + 1) * n], z2[r * n : (r + 1) * n], 0.2, z1_all=z1, z2_all=z2, offset=r * n)
        for r in range(world)
    ]
    mean = sum(parts) / world
    torch.testing.assert_close(mean, full)
    g1, g2 = torch.autograd.grad(mean, (z1, z2))
    torch.testing.assert_close(g1, g1_full)
    torch.testing.assert_close(g2, g2_full)
    with pytest.raises(ValueError, match="both"):
        nt_xent(z1, z2, z1_all=z1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_and_autocast(dtype):
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    queue = torch.nn.functional.normalize(torch.randn(64, 32, generator=g), dim=1)
    for t in (0.1, 0.02):  # 1/T = 50
        low = nt_xent(z1.to(dtype), z2.to(dtype), temperature=t)
        assert low.dtype == torch.float32 and torch.isfinite(low)
        assert low.item() == pytest.approx(nt_xent(z1, z2, temperature=t).item(), rel=1e-2)
    a, b = z1.to(dtype).requires_grad_(), z2.to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # losses opt out of autocast: full precision
        for loss, args in [
            (nt_xent, (a, b)),
            (info_nce, (a, b, queue)),
            (byol_loss, (a, b)),
            (simsiam_loss, (a, b)),
        ]:
            value = loss(*args)
            assert value.dtype == torch.float32
            expected = loss(*(x.detach().float() for x in args))
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
            value.backward()
            assert a.grad.dtype == dtype and torch.isfinite(a.grad).all()


def test_nt_xent_gradients_reach_both_views():
    z1 = torch.randn(4, 3, requires_grad=True)
    z2 = torch.randn(4, 3, requires_grad=True)
    nt_xent(z1, z2).backward()
    assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0
    assert torch.isfinite(z2.grad).all() and z2.grad.abs().sum() > 0


def test_info_nce_by_hand():
    q = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised: e1, e2
    k = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # normalised: (S, S), e2
    queue = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    t = 0.5
    e = math.exp
    loss_1 = -math.log(e(S / t) / (e(S / t) + e(1 / t) + e(-1 / t) + e(0 / t)))  # l_neg = [1, -1, 0]
    loss_2 = -math.log(e(1 / t) / (e(1 / t) + e(0 / t) + e(0 / t) + e(1 / t)))  # l_neg = [0, 0, 1]
    assert info_nce(q, k, queue, temperature=t).item() == pytest.approx((loss_1 + loss_2) / 2, rel=1e-6)


def test_info_nce_gradient_only_into_queries():
    q = torch.randn(4, 3, requires_grad=True)
    k = torch.randn(4, 3, requires_grad=True)
    queue = torch.nn.functional.normalize(torch.randn(10, 3), dim=1).requires_grad_()
    info_nce(q, k, queue).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None


def test_byol_loss_by_hand_and_stop_gradient():
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    z = torch.tensor([[0.0, 2.0], [3.0, 3.0]], requires_grad=True)
    loss = byol_loss(p, z)  # cos = 0 and 1: mean(2 - 0, 2 - 2)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert p.grad is not None and z.grad is None
    # equals the squared distance of normalised vectors
    pn, zn = torch.nn.functional.normalize(p, dim=1), torch.nn.functional.normalize(z, dim=1)
    assert loss.item() == pytest.approx(((pn - zn) ** 2).sum(1).mean().item(), rel=1e-6)


def test_simsiam_loss_by_hand_and_stop_gradient():
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    z = torch.tensor([[-1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    loss = simsiam_loss(p, z)  # cos = -1 and S
    assert loss.item() == pytest.approx(-(-1 + S) / 2, rel=1e-6)
    loss.backward()
    assert p.grad is not None and z.grad is None
    torch.testing.assert_close(simsiam_loss(5 * p, 0.1 * z), loss)
