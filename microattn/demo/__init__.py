"""The demo: a small transformer trained on synthetic tasks, and the ``microattn`` command.

Built on the library (``microattn.nn``, ``optim``, ``losses``), never the other way round:
nothing in the library core imports this package. One module per job:

    tasks.py        synthetic next-token tasks (recall, copy, needle, induction) and any
                    file's bytes (text), batches a pure function of (seed, split, step)
    loop.py         TrainConfig, Run (model + optimizer + schedule + step), train(),
                    Ctrl-C at step boundaries, the progress bar
    checkpoint.py   the checkpoint format, atomic save, load, and the checks on a loaded run
    inspection.py   held-out accuracy, greedy predictions, attention maps, head ablation
    plots.py        the loss curve and attention-map PNGs (matplotlib, optional)
    text.py         text in and out: tokenizers, streamed decoding, token-id prompts,
                    generation past a context, fine-tuning a pretrained model
    cli.py          the ``microattn`` command: argument parsing and the commands

``python -m microattn`` and the ``microattn`` console script both run :func:`cli.main`.
"""
