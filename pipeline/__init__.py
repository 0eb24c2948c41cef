"""The computation: models, corpus, activations, SAEs, training, evaluation, feature statistics, steering.

Pure torch; knows no saescope file formats (those live in ``storage``).
"""
