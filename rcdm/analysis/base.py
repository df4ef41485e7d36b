"""What every analysis takes and gives. An analysis is one module with ``NAME``, a typed ``Options`` dataclass and
``run(inputs, options) -> Result``; ``rcdm.analysis.ANALYSES`` lists them, and the command line
(``launch/analyze.py``), the end-of-run evaluation of a training job (``rcdm.evaluation``) and the demo
findings (``rcdm.findings``) all go through that table."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rcdm.errors import UserError
from rcdm.model_card import LoadedRCDM
from rcdm.sampling import Sampling


@dataclass
class Reference:
    """Labelled embeddings (of images the analysed ones are not among), for what an embedding holds: the
    factor reads' bound."""

    embeddings: torch.Tensor  # [M, D]
    factors: list[dict]
    source: str  # where they come from, for the record


@dataclass(frozen=True)
class Labels:
    """What is known of the analysed images beyond their pixels: their generative factors and, where the caller has
    them, labelled reference embeddings (the factor reads' bound) and the reader that reads factors off images
    (else each analysis trains or loads the synthetic-factor reader)."""

    factors: list[dict]  # one per analysed image
    reference: Reference | None = None
    reader: object | None = None  # rcdm.analysis.factors.FactorNet
    reader_report: dict | None = None


@dataclass
class Inputs:
    """A model and the images it is analysed on, complete at construction."""

    loaded: LoadedRCDM
    encoder: object  # rcdm.encoders.SSLEncoder, frozen, on ``device``
    images: torch.Tensor  # [N, 3, S, S] in [-1, 1] at the model's size: what samples are compared with
    embeddings: torch.Tensor  # [N, D] of the model's level
    names: list[str]
    sampling: Sampling
    device: torch.device
    labels: Labels | None = None  # where the images' generative factors are known
    pils: list | None = None  # the images as given (analyses that edit and re-encode them)
    others: list[tuple[LoadedRCDM, object]] = field(default_factory=list)  # invariance: more levels
    download: bool = True  # may fetch weights (the Inception features) from the network
    _own: torch.Tensor | None = None

    def __post_init__(self):
        if self.labels is not None and len(self.labels.factors) != len(self.names):
            raise ValueError(f"{len(self.labels.factors)} images' factors for {len(self.names)} images")

    @property
    def factors(self) -> list[dict] | None:
        return self.labels.factors if self.labels else None

    @property
    def reference(self) -> Reference | None:
        return self.labels.reference if self.labels else None

    @classmethod
    def of_images(cls, loaded: LoadedRCDM, encoder, spec, sampling: Sampling, device: torch.device,
                  others: list | tuple = (), download: bool = True) -> "Inputs":
        """The one way a command builds its inputs: ``spec`` (an ``images=`` value: files, a folder,
        ``synthetic:N``) read at the model's size and encoded by ``encoder`` at the model's level, complete here."""
        from rcdm.analysis.images import load_inputs

        imgs = load_inputs(spec, loaded.model.cfg.image_size)
        h, shown = _encode(imgs.pils, encoder, loaded, device)
        labels = Labels(imgs.factors) if imgs.factors is not None else None
        return cls(loaded, encoder, shown, h, imgs.names, sampling, device, labels, imgs.pils, list(others),
                   download=download)

    @property
    def level(self) -> str:
        return self.loaded.level

    @property
    def image_size(self) -> int:
        return self.loaded.model.cfg.image_size

    def draw(self, h: torch.Tensor, loaded: LoadedRCDM | None = None) -> torch.Tensor:
        """One sample per row of ``h`` [K, D] (on the CPU, in [-1, 1]), seeded by the sampling's seed."""
        from rcdm.sampling import draw

        lo = loaded or self.loaded
        return draw(lo.model, lo.process, h.to(self.device), self.sampling).cpu()

    def own_samples(self) -> torch.Tensor:
        """One sample per input embedding, drawn once and shared (faithfulness, factor reads, fidelity)."""
        if self._own is None:
            self._own = self.draw(self.embeddings)
        return self._own

    def encode(self, pils: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Further images as the inputs were encoded -> (embeddings [K, D], images [K, 3, S, S])."""
        return _encode(pils, self.encoder, self.loaded, self.device)

    def reader_or(self, make, steps: int):
        """(reader, its report): the one given, else ``make(image_size, steps)`` (the synthetic-factor reader)."""
        if self.labels is not None and self.labels.reader is not None:
            return self.labels.reader, self.labels.reader_report or {}
        return make(self.image_size, steps)

    def need(self, n: int, what: str) -> None:
        if len(self.names) < n:
            raise UserError(f"{what} needs at least {n} images, got {len(self.names)}")

    def need_factors(self, what: str) -> list[dict]:
        if self.factors is None:
            raise UserError(f"{what} needs images whose generative factors are known: images=synthetic:N (the demo's "
                            f"generator), or a dataset that records them")
        return self.factors


def _encode(pils: list, encoder, loaded: LoadedRCDM, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Images encoded at the model's level and shown at its size -> (embeddings [K, D], images [K, 3, S, S])."""
    from rcdm.sampling import encode_pil

    h, shown = encode_pil(pils, encoder, encoder.preprocess, loaded.level, loaded.model.cfg.image_size, device)
    return h.cpu(), shown.cpu()


@dataclass
class Result:
    numbers: dict  # the JSON
    metrics: dict[str, float]  # headline scalars, as MLflow metrics
    figures: dict[str, bytes] = field(default_factory=dict)  # file suffix ("" = the main one) -> PNG
