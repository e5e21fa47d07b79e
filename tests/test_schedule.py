"""noam_lr / inverse_sqrt_lr against hand-computed values; make_scheduler on a real optimizer."""

from __future__ import annotations

import pytest
import torch

from seq2seq_cli.recipe import TrainConfig
from seq2seq_cli.schedule import inverse_sqrt_lr, lr_at, make_scheduler, noam_lr


def test_noam_hand_values() -> None:
    d, w = 512, 4000
    assert noam_lr(1, d, w, 1.0) == pytest.approx(512 ** -0.5 * 4000 ** -1.5, rel=1e-12)
    assert noam_lr(1, d, w, 1.0) == pytest.approx(1.7469e-7, rel=1e-4)
    assert noam_lr(w, d, w, 1.0) == pytest.approx(512 ** -0.5 * 4000 ** -0.5, rel=1e-12)
    assert noam_lr(w, d, w, 1.0) == pytest.approx(6.9877e-4, rel=1e-4)
    assert noam_lr(4 * w, d, w, 1.0) == pytest.approx(0.5 * 6.9877e-4, rel=1e-4)  # step^-0.5 decay
    assert noam_lr(2000, d, w, 1.0) == pytest.approx(0.5 * 6.9877e-4, rel=1e-4)  # linear warm-up
    assert noam_lr(w, d, w, 2.0) == pytest.approx(2 * 6.9877e-4, rel=1e-4)      # factor scales
    assert noam_lr(0, d, w, 1.0) == noam_lr(1, d, w, 1.0)


def test_noam_shape() -> None:
    lrs = [noam_lr(s, 64, 50, 1.0) for s in range(1, 300)]
    peak = max(range(len(lrs)), key=lrs.__getitem__) + 1
    assert peak == 50
    assert all(a < b for a, b in zip(lrs[:49], lrs[1:50]))   # strictly increasing in warm-up
    assert all(a > b for a, b in zip(lrs[49:], lrs[50:]))     # strictly decreasing after


def test_inverse_sqrt_hand_values() -> None:
    assert inverse_sqrt_lr(1, 4000, 5e-4) == pytest.approx(5e-4 / 4000, rel=1e-12)
    assert inverse_sqrt_lr(0, 4000, 5e-4) == pytest.approx(5e-4 / 4000, rel=1e-12)
    assert inverse_sqrt_lr(2000, 4000, 5e-4) == pytest.approx(2.5e-4, rel=1e-12)
    assert inverse_sqrt_lr(4000, 4000, 5e-4) == pytest.approx(5e-4, rel=1e-12)
    assert inverse_sqrt_lr(16000, 4000, 5e-4) == pytest.approx(2.5e-4, rel=1e-12)
    assert inverse_sqrt_lr(3999, 4000, 5e-4) < inverse_sqrt_lr(4000, 4000, 5e-4)


def test_lr_at_dispatches() -> None:
    noam = TrainConfig(schedule="noam", warmup_steps=100, lr_factor=2.0)
    inv = TrainConfig(schedule="inverse_sqrt", warmup_steps=100, peak_lr=1e-3)
    assert lr_at(37, noam, 256) == pytest.approx(2.0 * 256 ** -0.5 * 37 * 100 ** -1.5)
    assert lr_at(400, inv, 256) == pytest.approx(5e-4)


@pytest.mark.parametrize("schedule", ["noam", "inverse_sqrt"])
def test_scheduler_drives_optimizer(schedule: str) -> None:
    cfg = TrainConfig(schedule=schedule, warmup_steps=10, lr_factor=1.5, peak_lr=3e-3)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=123.0)
    sched = make_scheduler(opt, cfg, d_model=32)
    seen = []
    for k in range(40):
        lr = opt.param_groups[0]["lr"]
        assert lr == pytest.approx(lr_at(k + 1, cfg, 32), rel=1e-12), k
        seen.append(lr)
        # the update really uses that lr: SGD moves p by -lr * grad with grad = 1
        before = p.detach().clone()
        p.grad = torch.ones(3)
        opt.step()
        assert torch.allclose(before - p.detach(), torch.full((3,), lr), rtol=1e-5)
        sched.step()
    assert max(range(40), key=seen.__getitem__) + 1 == 10  # the peak is update number `warmup`
    assert seen[9] == pytest.approx(lr_at(10, cfg, 32))
    if schedule == "inverse_sqrt":
        assert seen[9] == pytest.approx(3e-3)
    else:
        assert seen[9] == pytest.approx(1.5 * 32 ** -0.5 * 10 ** -0.5)


def test_scheduler_state_dict_resume() -> None:
    cfg = TrainConfig(warmup_steps=8)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_scheduler(opt, cfg, 64)
    for _ in range(5):
        opt.step()
        sched.step()
    state_o, state_s = opt.state_dict(), sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = make_scheduler(opt2, cfg, 64)
    opt2.load_state_dict(state_o)
    sched2.load_state_dict(state_s)
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(6, cfg, 64))
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(7, cfg, 64))
