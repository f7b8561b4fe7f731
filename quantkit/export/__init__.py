"""Exports of quantkit checkpoints to formats other runtimes load (compressed-tensors)."""
