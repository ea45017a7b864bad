"""Parallel layouts applied to an ordinary model from outside: tensor, expert, pipeline and
data parallelism (FSDP2 / ZeRO-1), all built from torch.distributed's own pieces."""
