"""Distributed contrastive pretraining over many modalities."""

__version__ = "0.1.0"
