"""Frozen SSL encoders: ``build_encoder(name, arch, weights)`` and the registry behind it."""
from rcdm.encoders.zoo import ENCODERS, LEVELS, SSLEncoder, build_encoder, encoder_spec

__all__ = ["ENCODERS", "LEVELS", "SSLEncoder", "build_encoder", "encoder_spec"]
