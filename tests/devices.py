"""Devices a test runs on: always the CPU, and CUDA where there is one (the GPU machine's run)."""
import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
