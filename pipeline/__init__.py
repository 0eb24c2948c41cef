"""The computation: pure torch, no saescope file formats (those live in ``storage``).

- ``lm``: the language model side: loading, corpora, packing contexts and prompts, hooks, activations.
- ``sae``: the sparse autoencoder, its sparse kernels, the SAELens layout, initialization, training.
- ``evaluation``: reconstruction metrics (FVU, PCA baseline, L0, dead) and LM loss with the SAE spliced in.
- ``features``: streaming feature statistics, decoder geometry (logit effects, neighbours), text probes.
- ``steering``: feature edits as an immutable spec and hook; generation with and without them.
- ``explain``: examples, token and LLM explainers, scorers and their metrics, LLM backends, embeddings.
- ``tracing``: attribution graphs on per-layer transcoders: replacement model, direct effects, pruning, viewer JSON.
- ``runtime``: torch.distributed groups, dtype choice by measurement, one-line errors.
"""
