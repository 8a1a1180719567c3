"""``upo-frontier`` (also ``python -m upo.frontier``): user preference against designer reward over a grid of runs.

    grid.py     the runs (UPO over lambda, relabelling over mixes, per base loss), relabelling the pairs
    study.py    the data split and scored once, each run trained in-process with upo-train's Trainer
    measure.py  what is measured on the held-out pairs (accuracy, designer reward, KL, generations)
    report.py   frontier.json and frontier.png
    cli.py      the command line

An application on top of the library and of ``upo.train`` (docs/frontier.md); ``import upo`` never
loads it, and importing this package loads nothing else.
"""
