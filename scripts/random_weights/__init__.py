"""Random FLUX-architecture models for tests, benchmarks, the GPU proof and the README's demo: a dev tool,
not part of the product (`scripts/make_tiny_weights.py` writes a tree; profiles in `models`)."""
