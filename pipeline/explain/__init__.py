"""Explaining features: examples, token and LLM explainers, scorers, their metrics, backends, embeddings."""
