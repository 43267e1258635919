"""Shared test setup: float32 matmuls at full precision, an importable `tests` folder, and a fixture
for lowering Triton kernels for a GPU on this CPU."""

import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.dirname(__file__))
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def triton_lowers_as_for_h100(monkeypatch):
    """Lowering Pallas Triton kernels for CUDA on a CPU: jax >= 0.11 asks the device for its compute
    capability, so answer as an H100 would (older jax does not ask)."""
    try:
        from jax._src.pallas.triton import gpu_info, pallas_call_registration
        monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info",
                            lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))
    except ImportError:
        pass
