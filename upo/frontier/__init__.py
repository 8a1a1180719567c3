"""``upo-frontier`` (also ``python -m upo.frontier``): user preference against designer reward over a grid of runs.

    grid.py     the runs (UPO over lambda, relabelling over mixes, per base loss), relabelling the pairs
    study.py    the data split and scored once, each run (and seed) trained in-process with upo-train's Trainer
    sft.py      the shared SFT stage of --model: trained once, the start and reference of every run
    measure.py  what is measured on the held-out pairs (accuracy, designer reward of the preferred response, KL)
    generated.py what is measured on generations (designer and user reward, length, degenerate answers, KL)
    report.py   frontier.json (per run and seed, summary over seeds) and frontier.png
    cli.py      the command line

An application on top of the library and of ``upo.train`` (docs/frontier.md); ``import upo`` never
loads it, and importing this package loads nothing else.
"""
