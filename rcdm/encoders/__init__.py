"""Frozen SSL encoders: ``build_encoder(name, arch, weights)`` and the registry behind it."""
from rcdm.encoders.card import EncoderCard
from rcdm.encoders.weights import WeightsRecord
from rcdm.encoders.zoo import (
    ENCODERS,
    LEVELS,
    SSLEncoder,
    build_encoder,
    build_recorded_encoder,
    embed_in_chunks,
    encoder_spec,
    recorded_weights,
)

__all__ = ["ENCODERS", "LEVELS", "EncoderCard", "SSLEncoder", "WeightsRecord", "build_encoder",
           "build_recorded_encoder", "embed_in_chunks", "encoder_spec", "recorded_weights"]
