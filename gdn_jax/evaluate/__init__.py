"""Evaluation: perplexity, S-NIAH-1/2/3, MQAR, length extrapolation, plots (see docs/evaluation.md)."""
