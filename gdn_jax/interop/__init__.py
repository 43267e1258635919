"""Checkpoint interop with FLA (flash-linear-attention) / Hugging Face.

    from gdn_jax.interop import load_fla_checkpoint, save_fla_checkpoint
    cfg, model = load_fla_checkpoint("fla_dir", dtype="float32")   # FLA -> our LM
    save_fla_checkpoint(model, cfg, "out_dir")                     # our LM -> FLA

    python3 -m gdn_jax.interop import-fla SRC_DIR --workdir DIR    # FLA dir -> train.py workdir
    python3 -m gdn_jax.interop export-fla --workdir DIR OUT_DIR    # workdir -> FLA dir

See docs/interop.md.
"""

from gdn_jax.interop.fla import load_fla_checkpoint, save_fla_checkpoint

__all__ = ["load_fla_checkpoint", "save_fla_checkpoint"]
