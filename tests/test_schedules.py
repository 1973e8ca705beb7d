import pytest

from pipeline.schedules import learning_rate, plateau_drops, step_drops, warmup_factor


def test_plateau_divides_by_ten_after_patience_epochs_without_a_new_best():
    errors = [0.9, 0.8, 0.7, 0.7, 0.71, 0.7]  # best 0.7 at epoch 3, then three epochs without a new best
    assert plateau_drops(errors[:5], patience=3, max_drops=3) == 0
    assert plateau_drops(errors, patience=3, max_drops=3) == 1
    assert learning_rate("plateau", 0.01, epoch=7, val_errors=errors, patience=3) == pytest.approx(0.001)
    assert learning_rate("plateau", 0.01, epoch=6, val_errors=errors, patience=3) == pytest.approx(0.01)


def test_plateau_gives_each_new_lr_its_own_patience_and_stops_after_max_drops():
    flat = [0.5] * 20  # never improves after epoch 1
    assert [plateau_drops(flat[:n], patience=2, max_drops=3) for n in (1, 2, 3, 4, 5, 6, 7, 20)] == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
    ]
    assert learning_rate("plateau", 0.02, epoch=21, val_errors=flat, patience=2, max_drops=3) == pytest.approx(2e-5)


def test_plateau_only_looks_at_the_epochs_before_this_one():
    errors = [0.5, 0.5, 0.5, 0.5]
    assert learning_rate("plateau", 0.01, epoch=2, val_errors=errors, patience=1) == pytest.approx(0.01)
    assert learning_rate("plateau", 0.01, epoch=3, val_errors=errors, patience=1) == pytest.approx(0.001)


def test_step_is_torchvisions_divide_by_ten_every_thirty_epochs():
    assert [step_drops(e, 30) for e in (1, 30, 31, 60, 61, 90)] == [0, 0, 1, 1, 2, 2]
    lrs = [learning_rate("step", 0.01, e, [], step_epochs=30) for e in (1, 31, 61, 90)]
    assert lrs == pytest.approx([0.01, 0.001, 0.0001, 0.0001])


def test_constant_ignores_the_history_and_unknown_schedules_fail():
    assert learning_rate("constant", 0.01, 50, [0.5] * 49) == 0.01
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        learning_rate("cosine", 0.01, 1, [])


def test_warmup_rises_linearly_per_step_from_one_percent_to_the_full_lr():
    steps = 100  # per epoch
    factors = [warmup_factor(s, steps, warmup_epochs=5) for s in (0, 1, 250, 499, 500, 10_000)]
    assert factors == pytest.approx([0.01, 0.01 + 0.99 / 500, 0.505, 0.01 + 0.99 * 499 / 500, 1.0, 1.0])
    assert all(a < b for a, b in zip(factors[:4], factors[1:5], strict=True))
    assert warmup_factor(0, steps, warmup_epochs=0) == 1.0  # off
    assert warmup_factor(49, steps, warmup_epochs=0.5) < 1.0 == warmup_factor(50, steps, warmup_epochs=0.5)


def test_the_schedule_counts_epochs_from_the_end_of_warmup():
    flat = [0.5] * 20  # never improves
    # warmup epochs' errors do not count: patience 2 after 5 warmup epochs first drops at epoch 5 + 4
    lrs = [learning_rate("plateau", 0.1, e, flat, patience=2, warmup_epochs=5) for e in range(1, 11)]
    assert lrs == pytest.approx([0.1] * 8 + [0.01, 0.01])
    assert learning_rate("step", 0.1, 35, [], step_epochs=30, warmup_epochs=5) == pytest.approx(0.1)
    assert learning_rate("step", 0.1, 36, [], step_epochs=30, warmup_epochs=5) == pytest.approx(0.01)
    assert learning_rate("step", 0.1, 31, [], step_epochs=30, warmup_epochs=0.5) == pytest.approx(0.1)  # ceil
