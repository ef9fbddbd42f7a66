"""The run's shape (accumulation, steps per epoch, total steps) comes from one place, RunShape."""

import pytest

from simcot.train.config import ConfigError, RunShape, TrainConfig


def test_shape_of_a_run():
    t = TrainConfig(batch_size=16, micro_batch_size=4, epochs=3)
    assert RunShape.of(t, 1, 70) == RunShape(world=1, accum=4, steps_per_epoch=4, total_steps=12)
    assert RunShape.of(t, 2, 70) == RunShape(world=2, accum=2, steps_per_epoch=4, total_steps=12)
    t.max_steps = 5
    assert RunShape.of(t, 4, 70).total_steps == 5
    t.max_steps = 50  # a cap above the run's length changes nothing
    assert RunShape.of(t, 4, 70).total_steps == 12


def test_shape_errors_name_the_cause():
    t = TrainConfig(batch_size=16, micro_batch_size=4)
    with pytest.raises(ConfigError, match=r"^train.batch_size \(16\) must be a multiple of train.micro_batch_size "
                                          r"\(4\) x world size \(3\)$"):
        RunShape.of(t, 3, 70)
    with pytest.raises(ConfigError, match=r"^train.batch_size \(10\) must be a multiple of "
                                          r"train.micro_batch_size \(4\)$"):
        RunShape.accumulation(TrainConfig(batch_size=10, micro_batch_size=4))
    with pytest.raises(ValueError, match=r"^the training split has 15 examples, fewer than one global batch "
                                         r"\(train.batch_size=16\)$"):
        RunShape.of(t, 1, 15)
