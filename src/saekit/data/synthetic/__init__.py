"""Generated worlds with known features: the built-in generator and SynthSAEBench."""
