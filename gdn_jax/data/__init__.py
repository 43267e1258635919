"""Input data: the embedded corpus, tokenizers, sources and the grain packing pipeline."""
