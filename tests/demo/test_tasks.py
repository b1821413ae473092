"""The synthetic tasks: deterministic, well-formed, and every answer recoverable from its input."""

import numpy as np
import pytest

from microattn.demo.tasks import IGNORE, TASKS, heldout_batches, make_batch, make_task

TASK_NAMES = sorted(TASKS)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_batches_are_a_pure_function_of_seed_split_and_step(name):
    task = make_task(name)
    first = make_batch(task, seed=7, step=3, batch_size=16)
    make_batch(task, seed=7, step=4, batch_size=16)  # asking for another batch changes nothing
    again = make_batch(make_task(name), seed=7, step=3, batch_size=16)
    np.testing.assert_array_equal(first.inputs, again.inputs)
    np.testing.assert_array_equal(first.targets, again.targets)

    for other in (make_batch(task, seed=8, step=3, batch_size=16),
                  make_batch(task, seed=7, step=5, batch_size=16),
                  make_batch(task, seed=7, step=3, batch_size=16, split="heldout")):
        assert not np.array_equal(first.inputs, other.inputs)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_answer_is_recoverable_from_the_inputs(name):
    task = make_task(name)
    for step in range(5):
        batch = make_batch(task, seed=0, step=step, batch_size=64)
        assert batch.inputs.shape == batch.targets.shape == (64, task.seq_len)
        assert batch.inputs.dtype == batch.targets.dtype == np.int64
        assert batch.inputs.min() >= 0 and batch.inputs.max() < task.vocab_size
        answers = batch.targets[batch.targets != IGNORE]
        assert answers.size > 0 and answers.max() < task.vocab_size
        np.testing.assert_array_equal(task.solve(batch.inputs), batch.targets)


def test_recall_layout():
    task = make_task("recall", num_pairs=4, num_queries=2, num_keys=6, num_values=5)
    batch = make_batch(task, seed=1, step=0, batch_size=32)
    assert task.seq_len == 4 + 2 * 2 and task.vocab_size == 6 * 5 + 6 + 5 + 1
    for row in batch.inputs:
        pairs = row[:4]
        assert pairs.max() < 30 and len(set((pairs // 5).tolist())) == 4  # one token per pair, distinct keys
        assert row[4] == task.query_token
        queried = row[5::2] - task.first_key
        assert set(queried.tolist()) <= set((pairs // 5).tolist())
    assert task.decode([7]) == "b2"  # key 1 ("b"), value 2
    assert (batch.targets[:, 5::2] >= task.first_value).all()  # one answer after each queried key
    assert (batch.targets[:, :5] == IGNORE).all()


def test_induction_recall_layout():
    task = make_task("induction", num_pairs=4, num_queries=2, num_keys=6, num_values=5)
    batch = make_batch(task, seed=1, step=0, batch_size=32)
    assert task.seq_len == 2 * 4 + 2 * 2
    for row in batch.inputs:
        keys, values = row[0:8:2], row[1:8:2]
        assert len(set(keys.tolist())) == 4 and keys.max() < 6  # distinct keys
        assert values.min() >= 6 and values.max() < 11  # values from their own alphabet
        assert row[8] == task.query_token
        assert set(row[9::2].tolist()) <= set(keys.tolist())
    assert (batch.targets[:, 9::2] != IGNORE).all()
    assert (batch.targets[:, :9] == IGNORE).all()


def test_copy_scores_exactly_the_second_half():
    task = make_task("copy", length=5)
    batch = make_batch(task, seed=0, step=0, batch_size=8)
    assert (batch.inputs[:, 5] == task.separator).all()
    np.testing.assert_array_equal(batch.targets[:, 5:], batch.inputs[:, :5])
    assert (batch.targets[:, :5] == IGNORE).all()


def test_needle_is_always_at_least_min_distance_before_the_query():
    task = make_task("needle", seq_len=24, min_distance=16)
    batch = make_batch(task, seed=0, step=0, batch_size=512)
    needle_at = np.argmax(batch.inputs == task.marker, axis=1) + 1
    assert (batch.inputs == task.marker).sum(axis=1).tolist() == [1] * 512
    assert (task.seq_len - 1 - needle_at >= 16).all()
    assert len(set(needle_at.tolist())) == 24 - 1 - 16  # every allowed position occurs
    assert (batch.inputs[:, -1] == task.query_token).all()


def test_heldout_set_is_fixed_and_sized():
    task = make_task("recall")
    first = list(heldout_batches(task, seed=3, num_examples=300, batch_size=128))
    assert [b.inputs.shape[0] for b in first] == [128, 128, 44]
    again = list(heldout_batches(task, seed=3, num_examples=300, batch_size=128))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.inputs, b.inputs)


def test_decode_and_config_round_trip():
    for name in TASK_NAMES:
        task = make_task(name)
        rebuilt = make_task(**task.config())
        assert rebuilt.config() == task.config() and rebuilt.seq_len == task.seq_len
        batch = make_batch(task, seed=0, step=0, batch_size=1)
        assert len(task.decode(batch.inputs[0]).split()) == task.seq_len


def test_bad_task_arguments_are_value_errors():
    with pytest.raises(ValueError, match="unknown task"):
        make_task("sorting")
    with pytest.raises(ValueError, match="num_queries"):
        make_task("recall", num_pairs=2, num_queries=3)
    with pytest.raises(ValueError, match="min_distance"):
        make_task("needle", seq_len=10, min_distance=20)
    with pytest.raises(ValueError, match="split"):
        make_batch(make_task("copy"), 0, 0, 1, split="test")


@pytest.mark.parametrize("name, options, message", [
    ("recall", {"pairs": 3}, "task recall has no option 'pairs'; its options are num_pairs"),
    ("copy", {"length": "10"}, "task option length must be an integer"),
    ("needle", {"num_fillers": True}, "task option num_fillers must be an integer"),
    ("recall", {"num_values": 0}, "1 to 10 values"),
    ("induction", {"num_values": 0}, "1 to 16 values"),
    ("needle", {"num_fillers": 0}, "1 to 26 fillers"),
    ("needle", {"num_values": -2}, "1 to 10 values"),
])
def test_bad_task_options_are_value_errors(name, options, message):
    """Before: an unknown option was a TypeError from the constructor's call, and zero
    values or fillers failed later inside the random generator."""
    with pytest.raises(ValueError, match=message):
        make_task(name, **options)
