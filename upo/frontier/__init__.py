"""``upo-frontier`` (also ``python -m upo.frontier``): user preference against designer reward over a grid of runs.

    grid.py     the runs (UPO over lambda, relabelling over mixes, per base loss), relabelling the pairs
    study.py    the data split and scored once, each run (and seed) trained in-process with upo-train's Trainer
    sft.py      the shared SFT stage of --model: trained once, the start and reference of every run
    measure.py  what is measured on the held-out pairs (accuracy, designer reward of the preferred response, KL)
    prompts.py  the prompts completed: the held-out pairs', then questions without labels
    generated.py what is measured on generations (designer and user reward, length, degenerate answers, KL,
                the trait's rate; sampled, with a greedy diagnostic)
    reference_generations.py the reference's completions before the grid, the trait-rate gate on them
    gates.py    the trait-rate gate and the positive control (relabelling at m = 1 must move the designer reward)
    compare.py  the one number: UPO's designer reward minus relabelling's at the same user reward and KL
    report.py   frontier.json (per run and seed, summary over seeds) and frontier.png
    cli.py      the command line

An application on top of the library and of ``upo.train`` (docs/frontier.md); ``import upo`` never
loads it, and importing this package loads nothing else.
"""
