"""Frozen SSL encoders: ``build_encoder(name, arch, weights)`` and the registry behind it."""
from rcdm.encoders.weights import WeightsRecord
from rcdm.encoders.zoo import (
                               ENCODERS,
                               LEVELS,
                               SSLEncoder,
                               build_encoder,
                               build_recorded_encoder,
                               embed_in_chunks,
                               encoder_spec,
)

__all__ = ["ENCODERS", "LEVELS", "SSLEncoder", "WeightsRecord", "build_encoder", "build_recorded_encoder",
           "embed_in_chunks", "encoder_spec"]
