"""Attribution graphs on per-layer transcoders (circuit-tracer style), compute only.

- ``replacement``: one prompt's local replacement model, linear given frozen attention patterns and norm scales.
"""
