"""The language model side: loading, corpora, packing into contexts, hooks, activations."""
