"""Engines: plain PyTorch and DeepSpeed behind one contract, process groups, checkpoints."""
