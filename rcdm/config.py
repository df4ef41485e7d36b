"""Typed configuration, written once: these dataclasses are the schema behind the Hydra config groups
(``configs/``), nested as the YAML is, and the library receives them as they are.

A new training option is one field here (with its default) and, where the demo should set it, one line
in ``configs/sweep.yaml``. A key that is neither fails at composition with Hydra's own error.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Optional

# The synthetic-factor reader's training steps, everywhere one is trained (the shipped readers were trained with it)
READER_STEPS = 600

from rcdm.diffusion.gaussian import Process
from rcdm.diffusion.schedules import TIMESTEP_DISTRIBUTIONS, space_timesteps
from rcdm.errors import UserError
from rcdm.storage import StorageOptions, join

MISSING = "???"  # OmegaConf's mark of a value the command line must give
SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=,+-]*$")  # a name that is one folder: no '/', no '..', no space


def path_segment(key: str, value: str) -> str:
    """``value`` if it can be one folder or file name under a root (a split, a sweep id), else a UserError:
    names from the command line become paths, and must never reach outside their root."""
    if not isinstance(value, str) or not SEGMENT.match(value) or ".." in value:
        raise UserError(f"{key}={value!r} must be one folder name (letters, digits, _ . - = , +; no '/' or '..')")
    return value


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class ClusterConfig:
    """Where jobs run: ``local`` (this machine) or ``slurm`` (hydra-submitit-launcher for training, a
    submitit job array for sharding). Nothing cluster-specific is assumed: every value is the user's."""

    name: str = "local"
    folder: str = "logs/shard/%j"  # sharding array tasks' submitit folder
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    time_min: int = 240
    nodes: int = 1
    tasks_per_node: int = 1  # = GPUs per node on GPU nodes: one DDP rank per GPU
    gpus_per_node: Optional[int] = None
    cpus_per_task: int = 8
    mem_gb: int = 32
    array_parallelism: int = 64
    max_num_timeout: int = 3  # requeues after a time limit or preemption
    signal_delay_s: int = 120  # USR2 this long before the time limit: time to checkpoint
    wait: bool = True  # training on SLURM: false = submit, record the jobs (submitted.json), return
    # local sweep: jobs trained at once, each with its share of the cores (0: chosen by pipeline/local_jobs.py;
    # 1: one after another in the launching process)
    jobs_at_once: int = 0


@dataclass
class TrackingConfig:
    uri: Optional[str] = "sqlite:///mlflow.db"  # an MLflow tracking URI: a local store or an `mlflow server`
    experiment: str = "rcdm-demo"  # the MLflow experiment; also names the run, output and report folders


@dataclass
class Named:
    """A config group whose choice is a name: ``encoder=dino``, ``level=projector``."""

    name: str = MISSING


@dataclass
class ModelConfig:
    name: str = "tiny"  # a UNet preset (rcdm.presets)
    lr: float = 1e-3
    batch_size: int = 16


@dataclass
class DemoData:
    """How the embedded demo dataset is built when it is missing (``data.build_if_missing``)."""

    counts: dict[str, int] = field(default_factory=lambda: {"train": 2048, "val": 64})
    seed: int = 0
    encoders: list[str] = field(default_factory=lambda: ["vicreg", "dino", "barlow", "simclr"])
    arch: str = "tiny"
    encoder_weights: str = "released"
    image_size: int = 32
    shard_size: int = 512


@dataclass
class DataConfig:
    url: str = MISSING  # the dataset root (local path or s3://) written by launch/shard.py
    split: str = "train"
    heldout_split: str = "val"  # grids and faithfulness condition on its first images (else the training split's)
    build_if_missing: bool = False
    allow_url: Optional[str] = None  # the end-of-run checks may fetch encoder weights the manifest records at this URL
    synthetic: DemoData = field(default_factory=DemoData)


@dataclass
class LoopConfig:
    """The optimisation loop (``train.*``)."""

    steps: int = 100
    batch_size: int = 16  # global: split over the job's ranks
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999  # with a (1 + step) / (10 + step) warm-up
    grad_clip: float = 1.0
    log_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    sample_every: int = 50
    loader_workers: int = 1
    seed: int = 0
    compile: bool = False  # torch.compile the UNet
    # auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), fp32 elsewhere; fp32 | bf16
    precision: str = "auto"
    lr_schedule: str = "constant"  # constant | cosine (to 0 at train.steps; after the recipe's warm-up)
    progress: bool = True  # a progress bar on rank 0 when stderr is a terminal
    lease_s: float = 300.0  # the run root's lease (rcdm.lease): a second launch of the job is refused; 0 = none
    # start a new run from a trained RCDM's EMA weights (demo:<encoder>-<level>, a run root or checkpoint file) of
    # the same UNet, encoder and level; the optimizer starts fresh; ignored once the run has a checkpoint
    init_from: str | None = None
    # all: every weight (same encoder and level); decoder: all but the conditioning input (rcdm/warm_start.py), so
    # a model of any encoder and level can start the job
    init_parts: str = "all"


@dataclass
class DiffusionConfig:
    schedule: str = "linear"  # linear | cosine (rcdm.diffusion.schedules); set by the recipe
    steps: int = 1000


@dataclass
class RecipeConfig:
    """How the model learns (``recipe=``, configs/recipe/): what the network predicts, how the timesteps'
    losses are weighted, what the conditioning looks like. ``adm`` is the released models' recipe."""

    name: str = "adm"
    prediction: str = "epsilon"  # epsilon | v | x0
    learn_sigma: bool = True  # ADM's learned-range variance, trained by the VLB term (the hybrid loss)
    weighting: str = "uniform"  # uniform | min_snr
    min_snr_gamma: float = 5.0
    normalize_embeddings: bool = False  # per-dimension statistics of the training split, stored in the model
    whiten_embeddings: bool = False  # with normalize_embeddings: ZCA-whiten instead (the split's covariance)
    cond_drop: float = 0.0  # representation dropout: the share of a batch conditioned on a learned null embedding
    warmup_steps: int = 0  # linear learning-rate warm-up
    timesteps: str = "uniform"  # uniform | logit_normal: the training timesteps (rcdm/diffusion/schedules.py)
    timestep_mean: float = 0.0  # logit_normal: the normal's mean in logit space (> 0: more steps near the noise)
    timestep_std: float = 1.0  # logit_normal: its standard deviation

    def unet_options(self) -> dict:
        """What the recipe changes in the UNet (``rcdm.presets.build_unet`` options)."""
        return {"out_channels": 6 if self.learn_sigma else 3, "normalize_embeddings": self.normalize_embeddings,
                "null_embedding": self.cond_drop > 0, **({"whiten_embeddings": True} if self.whiten_embeddings else {})}

    def __post_init__(self):
        if self.whiten_embeddings and not self.normalize_embeddings:
            raise UserError("recipe.whiten_embeddings=true needs recipe.normalize_embeddings=true (whitening is a "
                            "normalisation); set both, or neither")


@dataclass
class GridConfig:
    """Sample grids from the EMA model on fixed held-out images, every ``train.sample_every`` steps."""

    images: int = 8
    samples: int = 3
    steps: str = "ddim25"
    guidance: float = 1.0  # classifier-free guidance scale; 1 = the plain conditional model


@dataclass
class FaithfulnessConfig:
    """The RCDM protocol at the end of every run (rcdm/analysis/faithfulness.py)."""

    images: int = 64  # first held-out embeddings, one sample each, re-encoded and ranked; 0 = off
    steps: str = "ddim25"
    guidance: float = 1.0  # classifier-free guidance scale, recorded with the numbers; 1 = plain conditional


@dataclass
class InvarianceCheckConfig:
    """At the end of every run: the embedding invariance index of the job's level for each SSL augmentation
    family (rcdm.analysis.invariance), on the first held-out images; encoder only, no sampling."""

    images: int = 64  # 0 = off
    seed: int = 0


@dataclass
class FidelityCheckConfig:
    """At the end of every run, when ``features`` is set: FID and precision/recall of the faithfulness samples
    against the same held-out images (rcdm.analysis.fidelity). ``encoder`` works offline (the job's own
    encoder as feature space; not comparable with published FIDs); ``inception`` is torch-fidelity's
    Inception-v3 (fetched once). Needs faithfulness.images > 0."""

    features: Optional[str] = None  # null (off) | encoder | inception


@dataclass
class FactorReadOptions:
    """The factor reads' options (``analysis=factor_reads``, and ``factor_reads.*`` of every training run)."""

    k: int = 10  # neighbours of the embedding bound's vote
    reference_images: int = 2048  # labelled reference embeddings for the bound
    reader_steps: int = READER_STEPS  # training steps of the synthetic-factor reader (cached once trained)


@dataclass
class FactorReadsCheckConfig(FactorReadOptions):
    """At the end of every run on data that records the demo generator's factors: what the faithfulness samples
    keep, factor by factor, beside the embedding's own bound (rcdm.analysis.factor_reads)."""

    enabled: bool = True


@dataclass
class ConditioningDiagnosticConfig:
    """How much the model uses its embedding, per quartile of t (rcdm.evaluation.conditioning_gains): on a fixed
    held-out batch with fixed noise and t, the loss with the true embeddings against permuted ones (and the null
    embedding). Logged at every logging step and at the end."""

    images: int = 16  # 0 = off
    seed: int = 0


@dataclass
class TrainConfig:
    """One training job of a sweep (``configs/sweep.yaml``): ``train(cfg)`` takes this object."""

    encoder: Named = field(default_factory=Named)
    level: Named = field(default_factory=Named)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageOptions = field(default_factory=StorageOptions)
    sweep_id: str = "main"  # same sweep_id + same overrides = the same jobs: they resume
    job_name: str = "job"
    device: str = "auto"  # cuda (bf16 autocast, NCCL) when a GPU is visible, else cpu (gloo)
    train: LoopConfig = field(default_factory=LoopConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    faithfulness: FaithfulnessConfig = field(default_factory=FaithfulnessConfig)
    diagnostic: ConditioningDiagnosticConfig = field(default_factory=ConditioningDiagnosticConfig)
    invariance: InvarianceCheckConfig = field(default_factory=InvarianceCheckConfig)
    factor_reads: FactorReadsCheckConfig = field(default_factory=FactorReadsCheckConfig)
    fidelity: FidelityCheckConfig = field(default_factory=FidelityCheckConfig)

    def __post_init__(self) -> None:
        """Every value checked where it is declared: a bad one is a UserError naming the key, before any job."""
        if self.fidelity.features not in (None, "encoder", "inception"):
            raise UserError(f"fidelity.features={self.fidelity.features} is not one of null, encoder, inception")
        if not self.storage.run_root:
            raise UserError("storage.run_root is not set: add storage.run_root=<a folder or s3://bucket/prefix> "
                            "for the checkpoints")
        for key in ("tracking.experiment", "sweep_id", "job_name", "data.split", "data.heldout_split"):
            path_segment(key, _get(self, key))
        t = self.train
        for key in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints", "sample_every"):
            if getattr(t, key) < 1:
                raise UserError(f"train.{key}={getattr(t, key)} must be at least 1")
        for key in ("lr", "grad_clip"):
            if not 0 < getattr(t, key) < math.inf:
                raise UserError(f"train.{key}={getattr(t, key)} must be a positive finite number")
        for key in ("grid", "faithfulness"):  # how the end-of-run samples are drawn: checked before training
            spacing, guidance = _get(self, f"{key}.steps"), _get(self, f"{key}.guidance")
            try:
                space_timesteps(self.diffusion.steps, spacing)
            except (ValueError, TypeError) as e:
                raise UserError(f"{key}.steps={spacing!r} is not a sampling schedule over diffusion.steps="
                                f"{self.diffusion.steps} ({e}); use ddim<N> (e.g. ddim25), a step count, or counts "
                                f"per section (10,15,20)") from None
            if not 0 <= guidance < math.inf:
                raise UserError(f"{key}.guidance={guidance} must be a finite number >= 0 (1 = the plain conditional "
                                f"model)")
        checks = {"cluster.jobs_at_once": self.cluster.jobs_at_once >= 0,
                  "train.loader_workers": t.loader_workers >= 0, "train.weight_decay": t.weight_decay >= 0,
                  "train.ema_decay": 0 <= t.ema_decay < 1, "train.lease_s": 0 <= t.lease_s < math.inf,
                  "train.lr_schedule": t.lr_schedule in ("constant", "cosine"),
                  "train.precision": t.precision in ("auto", "fp32", "bf16"),
                  "train.init_parts": t.init_parts in ("all", "decoder"),
                  "recipe.prediction": self.recipe.prediction in ("epsilon", "v", "x0"),
                  "recipe.weighting": self.recipe.weighting in ("uniform", "min_snr"),
                  "recipe.cond_drop": 0 <= self.recipe.cond_drop < 1, "recipe.warmup_steps": self.recipe.warmup_steps >= 0,
                  "recipe.timesteps": self.recipe.timesteps in TIMESTEP_DISTRIBUTIONS,
                  "recipe.timestep_std": 0 < self.recipe.timestep_std < math.inf,
                  "recipe.timestep_mean": math.isfinite(self.recipe.timestep_mean),
                  "diffusion.steps": self.diffusion.steps >= 2, "grid.images": self.grid.images >= 0,
                  "grid.samples": self.grid.samples >= 1, "faithfulness.images": self.faithfulness.images >= 0,
                  "invariance.images": self.invariance.images >= 0, "diagnostic.images": self.diagnostic.images >= 0}
        for key, ok in checks.items():
            if not ok:
                raise UserError(f"{key}={_get(self, key)} is out of range; see its comment in rcdm/config.py")
        from rcdm.presets import PRESETS  # the registry imports the UNet; the schema stays light until here

        if self.model.name not in PRESETS:
            raise UserError(f"unknown model {self.model.name!r}; choose one of {sorted(PRESETS)}")

    @property
    def sweep_root(self) -> str:
        return join(self.storage.run_root, self.tracking.experiment, self.sweep_id)

    @property
    def run_root(self) -> str:
        """This job's folder: R/<experiment>/<sweep id>/<job name>."""
        return join(self.sweep_root, self.job_name)

    @property
    def parent_run_file(self) -> str:
        """The JSON holding the sweep's parent MLflow run id."""
        return join(self.sweep_root, "parent_run.json")

    @property
    def submitted_file(self) -> str:
        """The JSON a sweep submitted with cluster.wait=false is recorded in (read by launch/status.py)."""
        return join(self.sweep_root, "submitted.json")

    def process(self) -> Process:
        """The diffusion this job trains, as sampling will need it."""
        return Process(self.diffusion.schedule, self.diffusion.steps, self.recipe.prediction, self.recipe.learn_sigma)

    def to_dict(self) -> dict:
        """The resolved config, for MLflow params and checkpoints."""
        return dataclasses.asdict(self)
