"""Attribution graphs on per-layer transcoders (circuit-tracer style), and interventions on their features.

- ``replacement``: one prompt's local replacement model, linear given frozen attention patterns and norm scales.
- ``attribution``: the nodes (features, errors, tokens, target logits), their direct effects by batched backward passes.
- ``pruning``: influence on the targets through the matrix series; the nodes and edges that carry most of it.
- ``scores``: the replacement and completeness scores of a graph (circuit-tracer's definitions).
- ``graph_tensors``: an unpruned Graph as flat tensors (adjacency, node table, ...) for a safetensors file.
- ``graph_json``: a pruned graph as the document Neuronpedia's graph viewer uploads (JSON text), and back.
- ``trace``: ``trace(model, ids, transcoders)`` -> Graph, tying the three together.
- ``paths``: the strongest paths from an input token to a target in a pruned graph.
- ``intervention``: ablate or clamp transcoder features at prompt positions; logits and generation.
"""
