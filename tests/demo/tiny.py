"""A run small enough that a dozen steps take well under a second, for every demo test."""

from microattn.demo.loop import Run, TrainConfig

TINY = dict(task="recall", task_options={"num_pairs": 3, "num_queries": 2, "num_keys": 6, "num_values": 5},
            embed_dim=16, num_heads=2, num_layers=2, batch_size=4, steps=12, checkpoint_every=5,
            backend="reference")


def tiny_run(**overrides) -> Run:
    return Run.create(TrainConfig(**{**TINY, **overrides}))
