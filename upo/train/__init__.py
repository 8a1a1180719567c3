"""``upo-train``: the training application built on the ``upo`` library (map: docs/layout.md).

    cli.py               the command line: flags, the one-line errors, the final report
    config.py            TrainConfig: defaults < config file < flags, validated
    data/                rows -> tokenised pairs -> ordered, padded or packed batches
    models.py            the built-in tiny Llama or a pretrained model; LoRA; activation checkpointing
    objective.py         which losses and rewards, and their options
    preference_model.py  the module DDP/FSDP wrap: backbone -> hidden states -> upo.fused_loss
    reference.py         reference log-probs precomputed once and cached
    trainer.py           the loop: set-up, optimiser step, evaluation, checkpoints, outputs
    checkpoints.py       checkpoint files, resume, random state
    optim.py             optimiser and learning-rate schedule
    metrics.py, plot.py  per-step numbers, plot.png
    runtime.py           device and process group (torchrun)

``python -m upo.train`` and ``torchrun ... -m upo.train`` run :func:`upo.train.cli.main`.
Importing this package is cheap: the heavy modules load when the command runs.
"""
