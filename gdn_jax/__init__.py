"""gdn-jax: Gated DeltaNet (Yang, Kautz and Hatamizadeh, ICLR 2025) in JAX/Flax, with Pallas GPU kernels."""

__version__ = "0.1.0"
