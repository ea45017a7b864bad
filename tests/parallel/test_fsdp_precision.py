"""FSDP2's mixed-precision policy from the run's settings."""

from __future__ import annotations

import pytest
import torch

from moegpt.parallel.apply import fsdp_precision


@pytest.mark.parametrize("reduce_dtype", ["float32", "bfloat16"])
def test_bfloat16_runs_on_gpus_gather_bf16_and_reduce_in_the_chosen_dtype(reduce_dtype) -> None:
    policy = fsdp_precision("bfloat16", reduce_dtype, torch.device("cuda"))
    assert policy.param_dtype == torch.bfloat16
    assert policy.reduce_dtype == getattr(torch, reduce_dtype)


@pytest.mark.parametrize(
    ("dtype", "device"), [("float32", "cuda"), ("bfloat16", "cpu"), ("float32", "cpu")]
)
def test_other_runs_keep_fp32_whatever_reduce_dtype_says(dtype: str, device: str) -> None:
    policy = fsdp_precision(dtype, "bfloat16", torch.device(device))
    assert policy.param_dtype is None
    assert policy.reduce_dtype == torch.float32
