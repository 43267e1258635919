"""Pallas GPU kernels for the chunkwise gated delta rule, forward and backward (jax.custom_vjp).

Callers use `gdn_jax.ops.gated_delta_rule(..., impl="pallas")`; on a machine without a GPU the same
kernels run in Pallas interpret mode.
"""

from kernels_pallas.gated_delta_rule import launch_defaults, pallas_gated_delta_rule

__all__ = ["launch_defaults", "pallas_gated_delta_rule"]
