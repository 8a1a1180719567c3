"""Speed and memory benchmarks of upo's fused log-prob losses against naive PyTorch, TRL,
Liger-Kernel and Cut Cross-Entropy. See benchmarks/README.md."""
