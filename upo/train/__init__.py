"""``upo-train``: the training application built on the ``upo`` library (map: docs/layout.md).

    cli.py               the command line: flags, the one-line errors, exit codes, the final report
    allocator.py         the process's malloc: tcmalloc or jemalloc preloaded by restarting in place
    errors.py            how a run ends other than by finishing: user errors, stop signals
    config.py            TrainConfig: defaults < config file < flags, validated
    config_file.py       --config files through the flags' own parser; TRL DPOConfig names
    data/                rows -> tokenised pairs -> ordered, padded or packed batches
    run_data.py          which pairs train, which are held out, truncation report
    models.py            the built-in tiny Llama or a pretrained model; LoRA; activation checkpointing
    objective.py         which losses and rewards, and their options
    preference_model.py  the module DDP/FSDP wrap: backbone -> hidden states -> upo.fused_loss
    hidden_states.py     a batch's hidden states the head consumes, each prompt's last (the value head's input)
    kto_pairs.py         KTO in the trainer: mismatched pairs' log-probs, their reference cache, unpaired rows
    reference.py         reference log-probs precomputed once and cached
    trainer.py           the loop: set-up, optimiser step, evaluation, checkpoints, outputs
    output_dir.py        one run per --output-dir (--overwrite, --resume); run_lock.py: its lock
    signals.py           SIGTERM/SIGINT/SIGUSR1: stop after the step with a checkpoint
    divergence.py        non-finite losses and gradients: stop or skip (--max-skipped-batches)
    checkpoints.py       checkpoint files, resume, random state
    evaluation.py        held-out metrics with a progress bar, implicit-reward correlation
    optim.py             optimiser and learning-rate schedule
    metrics.py, plot.py  per-step numbers, plot.png
    runtime.py           device and process group (torchrun)
    tensor_parallel.py   --tp: the (dp, tp) mesh, the sharded model, gradients averaged over dp

``python -m upo.train`` and ``torchrun ... -m upo.train`` run :func:`upo.train.cli.main`.
Importing this package is cheap: the heavy modules load when the command runs.
"""
