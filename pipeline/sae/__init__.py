"""Sparse autoencoders: the model, sparse kernels, SAELens layout, initialization, training, schedules."""
