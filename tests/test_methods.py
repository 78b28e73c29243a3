"""Heads and methods: losses and gradients, MoCo's queue, EMA updates, BYOL's schedule, resuming."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.encoders import build_encoder
from pretrain.heads import LayerSpec, MLPHead, simsiam_prediction, simsiam_projection
from pretrain.methods import BYOL, MoCoV2, SimCLR, SimSiam, build_method, byol_tau

# as the trainer passes them: every option to every method
SMALL_HEADS = {"proj_hidden": 32, "proj_out": 16, "pred_hidden": 8, "queue_size": 32, "temperature": 0.2}


class TinyEncoder(nn.Module):
    """Conv-BN-ReLU-pool: enough to exercise BN buffers cheaply."""

    feat_dim = 4

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x))).mean(dim=(2, 3))


def _views(batch: int = 4, size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(2)]


def _frozen_modules(method: nn.Module) -> list[nn.Module]:
    return [m for name, m in method.named_children() if name.startswith(("momentum_", "target_"))]


@pytest.mark.parametrize("name", ["simclr", "moco", "byol", "simsiam"])
def test_loss_is_finite_and_only_online_parameters_get_gradients(name):
    torch.manual_seed(0)
    method = build_method(name, build_encoder("resnet18", 3, small_stem=True), **SMALL_HEADS)
    loss = method(_views())
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    frozen = {id(p) for m in _frozen_modules(method) for p in m.parameters()}
    assert bool(frozen) == (name in ("moco", "byol"))
    for pname, p in method.named_parameters():
        if id(p) in frozen:
            assert not p.requires_grad and p.grad is None, pname
        else:
            assert p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert method.encoder.conv1.weight.grad.abs().sum() > 0


def test_heads_follow_the_specs():
    head = MLPHead([LayerSpec(8, 16, nn.BatchNorm1d(16), nn.ReLU()), (16, 4, None, None)])
    linear1, bn, relu, linear2 = head.layers
    assert linear1.bias is None and isinstance(bn, nn.BatchNorm1d) and isinstance(relu, nn.ReLU)
    assert linear2.bias is not None and (head.in_dim, head.out_dim) == (8, 4)
    assert head(torch.randn(3, 8)).shape == (3, 4)
    with pytest.raises(ValueError, match="chain"):
        MLPHead([(8, 16, None, None), (12, 4, None, None)])
    projection = simsiam_projection(512, 64, 32)
    assert not projection.layers[-1].affine and not isinstance(projection.layers[-1], nn.ReLU)
    assert sum(isinstance(m, nn.Linear) for m in projection.layers) == 3
    assert simsiam_prediction().layers[0].out_features == 512  # the paper's bottleneck


def test_paper_defaults():
    moco = build_method("moco", TinyEncoder())
    assert moco.queue.shape == (65536, 128) and moco.temperature == 0.2 and moco.momentum == 0.99
    byol = build_method("byol", TinyEncoder())
    assert byol.projection.layers[0].out_features == 4096 and byol.prediction.out_dim == 256
    assert build_method("simclr", TinyEncoder()).temperature == 0.1
    assert build_method("simsiam", TinyEncoder()).projection.out_dim == 2048
    with pytest.raises(ValueError, match="unknown method"):
        build_method("dino", TinyEncoder())
    assert build_method("moco", TinyEncoder(), temperature=None, queue_size=8).temperature == 0.2
    with pytest.raises(TypeError, match="queue_length"):
        build_method("simclr", TinyEncoder(), queue_length=10)
    with pytest.raises(ValueError, match="two augmented views"):
        build_method("simclr", TinyEncoder())(_views()[:1])


def test_moco_queue_holds_the_normalised_keys_of_both_views():
    torch.manual_seed(0)
    method = MoCoV2(TinyEncoder(), MLPHead([(4, 8, None, nn.ReLU()), (8, 6, None, None)]), queue_size=12)
    assert torch.allclose(method.queue.norm(dim=1), torch.ones(12))
    for step, (start, ptr) in enumerate([(0, 8), (8, 4)]):  # the second step wraps around
        views = _views(seed=step)
        with torch.no_grad():
            key_net = nn.Sequential(method.momentum_encoder, method.momentum_projection)
            k1, k2 = (F.normalize(key_net(v), dim=1) for v in views)
        before = method.queue.clone()
        method(views).backward()
        idx = (torch.arange(8) + start) % 12
        torch.testing.assert_close(method.queue[idx], torch.cat([k1, k2]))
        untouched = torch.ones(12, dtype=torch.bool)
        untouched[idx] = False
        assert torch.equal(method.queue[untouched], before[untouched])
        assert method.queue_ptr.item() == ptr
    method.eval()
    queue = method.queue.clone()
    method(_views(seed=5))
    assert torch.equal(method.queue, queue) and method.queue_ptr.item() == 4  # evaluation does not enqueue


def test_byol_tau_schedule():
    assert byol_tau(0, 100, 0.99) == pytest.approx(0.99)
    assert byol_tau(50, 100, 0.99) == pytest.approx(0.995)
    assert byol_tau(100, 100, 0.99) == pytest.approx(1.0)
    assert byol_tau(150, 100, 0.99) == pytest.approx(1.0)
    method = build_method("byol", TinyEncoder(), **SMALL_HEADS)
    assert method.current_tau == 0.99
    method.step_update(50, 100)
    assert method.current_tau == pytest.approx(0.995)


@pytest.mark.parametrize("name", ["byol", "moco"])
def test_ema_updates_parameters_not_buffers(name):
    torch.manual_seed(0)
    method = build_method(name, TinyEncoder(), **SMALL_HEADS)
    target = method.target_encoder if name == "byol" else method.momentum_encoder
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(1.0)
        method.encoder.bn.running_mean.fill_(5.0)
    target_params = [p.clone() for p in target.parameters()]
    target_running_mean = target.bn.running_mean.clone()
    method.step_update(25, 100)
    decay = byol_tau(25, 100, 0.99) if name == "byol" else 0.99
    for t, t0, o in zip(target.parameters(), target_params, method.encoder.parameters(), strict=True):
        torch.testing.assert_close(t, decay * t0 + (1 - decay) * o)
    assert torch.equal(target.bn.running_mean, target_running_mean)


@pytest.mark.parametrize("cls", [SimCLR, SimSiam])
def test_step_update_is_a_no_op_without_target_network(cls):
    method = build_method(cls.__name__.lower(), TinyEncoder(), **SMALL_HEADS)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    method.step_update(3, 10)
    assert all(torch.equal(state[k], v) for k, v in method.state_dict().items())


def test_state_dict_round_trip_restores_queue_and_momentum_network():
    torch.manual_seed(0)
    method = build_method("moco", TinyEncoder(), **SMALL_HEADS)
    method(_views()).backward()
    method.step_update(0, 10)
    torch.manual_seed(1)
    resumed = build_method("moco", TinyEncoder(), **SMALL_HEADS)
    assert not torch.equal(resumed.queue, method.queue)
    resumed.load_state_dict(method.state_dict())
    assert resumed.queue_ptr.item() == 8
    for key, value in method.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert any(k.startswith("momentum_encoder.") for k in method.state_dict())
    byol = build_method("byol", TinyEncoder(), **SMALL_HEADS)
    assert isinstance(byol, BYOL) and any(k.startswith("target_projection.") for k in byol.state_dict())
