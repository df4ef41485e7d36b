"""rcdm: diffusion models conditioned on frozen SSL embeddings (RCDM), from shards to samples."""

__version__ = "0.1.0"
