"""Steering: feature edits as an immutable spec and hook, and generation with and without them."""
