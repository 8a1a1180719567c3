"""Integrations of upo into other training libraries; ``import upo`` never imports them.

    trl/   UPOConfig and UPOTrainer: TRL's DPOTrainer with the loss computed by upo (docs/trl.md)
"""
