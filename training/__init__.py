"""Training code for LlamaFlex: corpus and data, the small parent, elastic training."""
