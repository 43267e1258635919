"""Shared test setup: float32 matmuls at full precision and an importable `tests` folder."""

import os
import sys

import jax

sys.path.insert(0, os.path.dirname(__file__))
jax.config.update("jax_default_matmul_precision", "highest")
