"""Looking inside a model: predictions with and without the KV cache, held-out accuracy,
head ablation, attention maps."""

import numpy as np
import pytest

from microattn.demo import inspection, loop
from microattn.demo.tasks import make_batch
from tests.demo.tiny import tiny_run


def model_state(run):
    return run.model.state_dict()


@pytest.mark.parametrize("attention", ["exact", "window", "linear", "gqa"])
def test_kv_cache_decoding_agrees_with_one_forward_pass(attention):
    run = tiny_run(attention=attention, window=3, kv_heads=1)
    loop.train(run)
    batch = make_batch(run.task, 0, 0, 8, split="heldout")
    full = inspection.predict(run.model, batch.inputs)
    cached = inspection.predict(run.model, batch.inputs, use_cache=True)
    np.testing.assert_array_equal(full, cached)
    assert run.model.training  # predict restores the mode it found


def test_evaluate_scores_only_answer_tokens():
    run = tiny_run()
    accuracy = inspection.evaluate(run.model, run.task, seed=0, num_examples=64)
    assert 0.0 <= accuracy <= 1.0
    assert run.model.training


def test_head_ablation_restores_the_weights_and_reports_each_head():
    run = tiny_run(steps=30, lr=1e-2)
    loop.train(run)
    before = model_state(run)
    with inspection.ablate_head(run.model, layer=1, head=0):
        weight = inspection.attention_layers(run.model)[1].out_proj.weight.data
        assert not weight[:, :8].any() and weight[:, 8:].any()  # head 0 of 2, head_dim 8
    after = model_state(run)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
    baseline, drops = inspection.head_ablation(run.model, run.task, num_examples=32)
    assert drops.shape == (2, 2) and 0 <= baseline <= 1


def test_attention_maps_have_one_array_per_layer():
    run = tiny_run()
    inputs = make_batch(run.task, 0, 0, 1).inputs
    maps = inspection.attention_maps(run.model, inputs)
    N = run.task.seq_len
    assert [m.shape for m in maps] == [(1, 2, N, N)] * 2
    np.testing.assert_allclose(maps[0].sum(axis=-1), 1.0, rtol=1e-5)
    assert np.triu(maps[0][0, 0], k=1).max() == 0  # causal
    assert "forward" not in inspection.attention_layers(run.model)[0].__dict__  # wrapper removed


