"""noam_lr / inverse_sqrt_lr against hand-computed values; make_scheduler on a real optimizer."""

from __future__ import annotations

import pytest
import torch

from seq2seq_cli.recipe import TrainConfig
from seq2seq_cli.schedule import inverse_sqrt_lr, lr_at, make_scheduler, noam_lr


def test_noam_hand_values() -> None:
    d, w = 512, 4000
    assert noam_lr(1, d, w, 1.0) == pytest.approx(512**-0.5 * 4000**-1.5, rel=1e-12)
    assert noam_lr(1, d, w, 1.0) == pytest.approx(1.7469e-7, rel=1e-4)
    assert noam_lr(w, d, w, 1.0) == pytest.approx(512**-0.5 * 4000**-0.5, rel=1e-12)
    assert noam_lr(w, d, w, 1.0) == pytest.approx(6.9877e-4, rel=1e-4)
    assert noam_lr(4 * w, d, w, 1.0) == pytest.approx(0.5 * 6.9877e-4, rel=1e-4)  # step^-0.5 decay
    assert noam_lr(2000, d, w, 1.0) == pytest.approx(0.5 * 6.9877e-4, rel=1e-4)  # linear warm-up
    assert noam_lr(w, d, w, 2.0) == pytest.approx(2 * 6.9877e-4, rel=1e-4)  # factor scales
    assert noam_lr(0, d, w, 1.0) == noam_lr(1, d, w, 1.0)


def test_noam_shape() -> None:
    lrs = [noam_lr(s, 64, 50, 1.0) for s in range(1, 300)]
    peak = max(range(len(lrs)), key=lrs.__getitem__) + 1
    assert peak == 50
    assert all(a < b for a, b in zip(lrs[:49], lrs[1:50]))  # strictly increasing in warm-up
    assert all(a > b for a, b in zip(lrs[49:], lrs[50:]))  # strictly decreasing after


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
    assert lr_at(37, noam, 256) == pytest.approx(2.0 * 256**-0.5 * 37 * 100**-1.5)
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
        assert seen[9] == pytest.approx(1.5 * 32**-0.5 * 10**-0.5)


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


# ------------------------------------------------------------------------------ budget (Li et al. 2020)


def test_budget_lr_hand_values() -> None:
    from seq2seq_cli.schedule import budget_lr

    assert budget_lr(0.0, 0.1, 2e-3) == 0.0
    assert budget_lr(0.05, 0.1, 2e-3) == pytest.approx(1e-3)  # half-way up the warm-up
    assert budget_lr(0.1, 0.1, 2e-3) == pytest.approx(2e-3)  # the peak at the warm-up's end
    assert budget_lr(0.55, 0.1, 2e-3) == pytest.approx(1e-3)  # half-way down the decay
    assert budget_lr(1.0, 0.1, 2e-3) == 0.0 and budget_lr(1.7, 0.1, 2e-3) == 0.0  # zero at (and past) the end


def test_budget_progress_is_the_most_spent_budget() -> None:
    from seq2seq_cli.schedule import budget_progress

    both = TrainConfig(schedule="budget", max_steps=1000, max_time=10.0)
    assert budget_progress(100, 60.0, both) == pytest.approx(0.1)  # 10% of the steps, 10% of the time
    assert budget_progress(100, 300.0, both) == pytest.approx(0.5)  # time binds: the slower machine
    assert budget_progress(800, 60.0, both) == pytest.approx(0.8)  # steps bind: the faster machine
    assert budget_progress(5, 30.0, TrainConfig(schedule="budget", max_time=1.0)) == pytest.approx(0.5)


def test_budget_schedule_on_a_time_budget_fits_any_speed() -> None:
    """The same recipe on a machine 2.5x slower: fewer updates, but the same warm-up and decay shape
    against the fraction of time spent, ending at zero either way (noam would still be warming up)."""
    cfg = TrainConfig(schedule="budget", max_time=12.0, warmup_fraction=0.1, peak_lr=2e-3)
    for seconds_per_step in (0.5, 1.25):
        steps = int(12 * 60 / seconds_per_step)
        lrs = [lr_at(s, cfg, 256, seconds=(s - 1) * seconds_per_step) for s in range(1, steps + 1)]
        top = max(range(steps), key=lrs.__getitem__)
        assert abs(top / steps - 0.1) < 0.01 and max(lrs) == pytest.approx(2e-3, rel=0.01)
        assert lrs[-1] < 0.01 * max(lrs)


def test_budget_schedule_needs_a_budget() -> None:
    from seq2seq_cli.recipe import RecipeError, recipe_from_dict

    base = {"output_dir": "o", "data": {"train": {"src": "a", "tgt": "b"}}}
    with pytest.raises(RecipeError, match="schedule budget needs a budget to fit"):
        recipe_from_dict({**base, "train": {"schedule": "budget", "max_epochs": 3}})
    assert recipe_from_dict({**base, "train": {"schedule": "budget", "max_time": 5}}).train.max_time == 5


def test_make_scheduler_budget_reads_the_run_clock() -> None:
    cfg = TrainConfig(schedule="budget", max_time=1.0, warmup_fraction=0.5, peak_lr=1e-2)
    clock = {"s": 0.0}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, cfg, 64, lambda: clock["s"])
    lrs = []
    for seconds in (15.0, 30.0, 45.0, 60.0):
        clock["s"] = seconds
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([5e-3, 1e-2, 5e-3, 0.0])
