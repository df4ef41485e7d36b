"""What a model records about the encoder that made its conditioning: which method, architecture and level,
which weights (``WeightsRecord``), and the exact input preprocessing. Checkpoints, the demo records and the
released-file loader carry it inside their ``ModelCard`` (rcdm.model_card); the encoder builder takes it
whole (``rcdm.encoders.build_recorded_encoder``)."""
from __future__ import annotations

from dataclasses import dataclass

from rcdm.encoders.weights import WeightsRecord
from rcdm.preprocess import Preprocess


@dataclass(frozen=True)
class EncoderCard:
    name: str  # a registry key (rcdm.encoders.ENCODERS)
    arch: str
    level: str
    weights: WeightsRecord
    preprocess: Preprocess | None = None  # None: the encoder's own (the official input, for the released RCDMs)

    def to_dict(self) -> dict:
        return {"name": self.name, "arch": self.arch, "level": self.level, "weights": self.weights.to_dict(),
                "preprocess": self.preprocess.to_dict() if self.preprocess else None}

    @classmethod
    def from_dict(cls, d: dict) -> EncoderCard:
        pre = d.get("preprocess")
        return cls(d["name"], d["arch"], d["level"], WeightsRecord.from_dict(d["weights"]),
                   Preprocess.from_dict(pre) if pre else None)
