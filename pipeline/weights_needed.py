"""Every weight file a training job needs from the internet, for nodes that have none: the encoder the job
re-encodes its samples with (the one its dataset was embedded with, as the manifest records it), the released RCDM
a job starts from (``train.init_from=rcdm_ema_dino_trunk.pt``) and, with ``fidelity.features=inception``,
torch-fidelity's Inception-v3. ``fetch_all`` puts each into the torch.hub cache
(``$TORCH_HOME/hub/checkpoints``: point TORCH_HOME at a shared filesystem) and checks it against the sha256 the
manifest records and the prefix its URL publishes."""
from __future__ import annotations

from dataclasses import dataclass

from rcdm.config import TrainConfig
from rcdm.encoders.weights import fetch, hub_cache_path, published_prefix
from rcdm.encoders.zoo import encoder_spec
from rcdm.manifest import read_manifest
from rcdm.model_files import released_url


@dataclass
class FetchOptions:
    """``launch/fetch_weights.py``'s own key (``fetch.download=false``), beside the sweep's overrides."""
    download: bool = True  # false: only check what the cache holds, download nothing


@dataclass(frozen=True)
class Needed:
    what: str  # "vicreg resnet50", "inception (fidelity)"
    url: str
    sha256: str | None  # what the dataset's manifest records; None where nothing records it


def needed(cfg: TrainConfig) -> tuple[list[Needed], list[str]]:
    """-> (files to fetch, notes on what needs nothing: shipped, random or a local file)."""
    files, notes = [], []
    name = cfg.encoder.name
    if cfg.data.build_if_missing:  # the demo: built here with data.synthetic's encoders
        arch, kind, sha = cfg.data.synthetic.arch, cfg.data.synthetic.encoder_weights, None
    else:
        manifest = read_manifest(cfg.data.url, cfg.storage)
        rec = manifest.encoders.get(name) if manifest else None
        if rec is None:  # not sharded yet: the released file the sharding stage will fetch
            arch, kind, sha = encoder_spec(name).arch or "resnet50", "released", None
            notes.append(f"{name}: no manifest at {cfg.data.url} records it yet; the released file is fetched unchecked "
                         f"beyond its URL's published prefix")
        else:
            arch, kind, sha = rec.arch, rec.weights.kind, rec.weights.sha256
            if kind == "file":
                notes.append(f"{name}: embedded with a local file ({rec.weights.path}); copy it to the nodes yourself")
    if kind == "released" and arch == "tiny":
        notes.append(f"{name} tiny: ships with rcdm")
    elif kind == "released":
        files.append(Needed(f"{name} {arch}", encoder_spec(name).url, sha))
    elif kind == "random":
        notes.append(f"{name}: random weights, nothing to fetch")
    start = released_url(cfg.train.init_from or "")  # a released decoder to start from, by name
    if start:
        files.append(Needed(f"init_from {cfg.train.init_from}", start, None))
    if cfg.fidelity.features == "inception":
        from rcdm.analysis.fidelity import INCEPTION_URL

        files.append(Needed("inception (fidelity)", INCEPTION_URL, None))
    return files, notes


def fetch_all(files: list[Needed], download: bool) -> list[dict]:
    """Each file into the hub cache, checked; -> one row per file. A file that cannot be had or fails its checksum
    raises the UserError ``fetch`` raises (naming the URL and where to place the file)."""
    rows = []
    for f in dict.fromkeys(files):
        had = hub_cache_path(f.url).exists()
        path = fetch(f.url, download=download, sha256=f.sha256)
        rows.append({"what": f.what, "path": str(path), "state": "present" if had else "downloaded",
                     "checked": "sha256 (manifest)" if f.sha256 else (
                         f"published prefix {published_prefix(f.url)}" if published_prefix(f.url) else "no checksum known")})
    return rows
