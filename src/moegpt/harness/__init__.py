"""Harnesses the tests and benchmarks drive (layout jobs under torchrun, fault injection),
kept out of the core packages: they import the trainer, which the core must not."""
