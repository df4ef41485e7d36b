"""The training input pipeline: a dataset opened through its manifest, streaming images paired with
one (encoder, level) embedding, resampled so that every rank and worker sees an endless stream.

Each (rank, loader worker) is one stream. With at least as many shards as streams, stream s reads the
shards s, s + S, s + 2S, ... in a fresh order every pass; with fewer shards, every stream reads all of
them. Either way no rank ever runs dry, so no collective waits on a starved rank. The batch of every step
is a function of (seed, rank, step, loader workers): resumption is exact (``TrainStream``).
"""
from __future__ import annotations

import io
import itertools
import json
import math
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rcdm.errors import DatasetError, UserError
from rcdm.manifest import EncoderRecord, Manifest, read_manifest
from rcdm.storage import HashingReader, StorageOptions, join, open_fs
from rcdm.tars import TruncatedTar, read_samples


MAX_MEMBER_BYTES = 64 * 2 ** 20  # an rcdm shard member: one training image or one embedding vector


@dataclass(frozen=True)
class DatasetInfo:
    url: str
    manifest: Manifest
    encoder: str
    level: str
    split: str

    @property
    def embed_dim(self) -> int:
        return self.encoder_record.levels[self.level]

    @property
    def image_size(self) -> int:
        return self.manifest.image_size

    @property
    def shards(self) -> list[str]:
        return self.manifest.splits[self.split].shard_names()

    @property
    def encoder_record(self) -> EncoderRecord:
        return self.manifest.encoders[self.encoder]

    def with_split(self, split: str) -> DatasetInfo:
        return DatasetInfo(self.url, self.manifest, self.encoder, self.level, split)


def open_dataset(url: str, encoder: str, level: str, split: str = "train",
                 storage: StorageOptions | None = None) -> DatasetInfo:
    """Read the manifest and check that it holds (encoder, level, split); the error names what it has."""
    manifest = read_manifest(url, storage)
    if manifest is None:
        raise UserError(f"no dataset at {url} (no manifest.json): build it with launch/shard.py output={url}")
    rec = manifest.encoders.get(encoder)
    if rec is None or level not in rec.levels:
        raise UserError(f"dataset {url} has no {encoder} {level} embeddings ({manifest.describe_contents()}); "
                        f"choose one of those or add it with launch/shard.py output={url} encoders=[{encoder}]")
    if split not in manifest.splits or (rec.splits and split not in rec.splits):
        raise UserError(f"dataset {url} has no {split} split for {encoder} ({manifest.describe_contents()})")
    return DatasetInfo(url, manifest, encoder, level, split)


def _fix(info: DatasetInfo) -> str:
    return (f"rebuild it (launch/shard.py with the command that made {info.url}: complete shards are skipped, so "
            f"delete the damaged ones first) or restore it from a copy")


def shard_samples(info: DatasetInfo, shard_set: str, shard: str, storage: StorageOptions | None = None,
                  opened: tuple | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, members) of ``<shard_set>/<shard>``; read to its end, the shard is checked against the manifest:
    its sample count and, where the manifest records it, its sha256 (hashed as it streams). Anything wrong is a
    ``DatasetError`` naming the shard. ``opened``: (filesystem, root) of the dataset, when the caller has them."""
    fs, root = opened or open_fs(info.url, storage)
    name = f"{shard_set}/{shard}"
    entry = info.manifest.splits[info.split].entry(shard)
    n = 0
    try:
        with fs.open(join(root, shard_set, shard), "rb") as f:
            stream = HashingReader(f)
            for sample in read_samples(stream, MAX_MEMBER_BYTES):
                if sample.problems:
                    raise DatasetError(f"shard {name} of {info.url}: sample {sample.key}: {sample.problems[0]}; "
                                       f"{_fix(info)}")
                n += 1
                yield sample.key, sample.members
            digest = stream.drain()
    except FileNotFoundError:
        raise DatasetError(f"shard {name} of {info.url} is missing; {_fix(info)}") from None
    except TruncatedTar as e:
        raise DatasetError(f"shard {name} of {info.url}: {e}; {_fix(info)}") from None
    if n != entry["count"]:
        raise DatasetError(f"shard {name} of {info.url} holds {n} samples but the manifest says {entry['count']}; the "
                           f"shard or the manifest was altered: {_fix(info)}")
    want = (entry.get("sha256") or {}).get(shard_set)
    if want and digest != want:
        raise DatasetError(f"shard {name} of {info.url} does not match its sha256 in the manifest ({digest[:12]}... "
                           f"against {want[:12]}...): it is damaged or altered; {_fix(info)}")


def paired_samples(info: DatasetInfo, shard: str, storage: StorageOptions | None = None, fresh: bool = True
                   ) -> Iterator[tuple[str, dict, dict]]:
    """(key, image members, embedding members) of one shard, checked to be in step."""
    opened = open_fs(info.url, storage, fresh=fresh)
    images = shard_samples(info, "images", shard, opened=opened)
    embeds = shard_samples(info, info.encoder, shard, opened=opened)
    for pair in itertools.zip_longest(images, embeds):
        if None in pair:
            short = "images" if pair[0] is None else info.encoder
            raise DatasetError(f"shard {short}/{shard} of {info.url} ends before its partner: the shard sets are out of "
                               f"step; {_fix(info)}")
        (k_img, img), (k_emb, emb) = pair
        if k_img != k_emb:
            raise DatasetError(f"shard {shard} of {info.url}: image key {k_img} beside embedding key {k_emb}: the "
                               f"shard sets are out of step; {_fix(info)}")
        yield k_img, img, emb


def decode_pair(info: DatasetInfo, img: dict, emb: dict, flip: bool, where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """-> (image [3, S, S] in [-1, 1], embedding [D] float32), both of the mirrored view when ``flip``;
    ``where`` (shard and key) names a sample that cannot be decoded."""
    fmt, size, dim = info.manifest.image_format, info.image_size, info.embed_dim
    name = f"{info.level}.flip.npy" if flip else f"{info.level}.npy"
    try:
        with Image.open(io.BytesIO(img[fmt])) as im:
            if im.size != (size, size):
                raise ValueError(f"its image is {im.size[0]}x{im.size[1]}, not {size}x{size}")
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        vec = np.load(io.BytesIO(emb[name]), allow_pickle=False)
        if vec.shape != (dim,):
            raise ValueError(f"its {name} has shape {vec.shape}, not ({dim},)")
    except (KeyError, ValueError, OSError, SyntaxError, EOFError) as e:
        what = f"missing member {e}" if isinstance(e, KeyError) else str(e)
        raise DatasetError(f"sample {where or '?'} of {info.url} cannot be read ({what}); {_fix(info)}") from None
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    h = torch.from_numpy(vec.astype(np.float32))
    return (x.flip(2) if flip else x), h


class TrainStream(IterableDataset):
    """Endless batches (images [B, 3, S, S], embeddings [B, D]) for one rank, where the batch of step k is a
    function of (seed, rank, k, workers) alone: a job resumed at step k gets the batches an uninterrupted
    job got from step k on, whenever and however often it was restarted.

    Each rank has ``workers`` streams (one per loader worker; 1 without workers), step k belonging to stream
    k mod workers. Every epoch the split's shards are put in a new random order and their samples, counted in
    that order, are cut into equal ranges, one per (rank, stream): every stream gets the same number of samples
    (up to one), whatever the number of shards, and reads the shards its range covers (a shard at a range's
    edge is read by both streams, each keeping its part). A stream's range is taken in blocks of at least
    ``shuffle_buffer`` samples, each block shuffled as a whole, each sample's flip drawn with it (the flip takes
    the mirrored view's embedding). Its n-th batch is its samples [n*B, (n+1)*B): the shard counts in the
    manifest say where that is, so resuming reads only the block it starts in.
    """

    def __init__(self, info: DatasetInfo, batch_size: int, rank: int, world: int, seed: int, start: int = 0,
                 workers: int = 0, storage: StorageOptions | None = None, shuffle_buffer: int = 256):
        self.info, self.batch_size, self.rank, self.world, self.seed = info, batch_size, rank, world, seed
        self.start, self.streams = start, max(1, workers)
        self.storage, self.shuffle_buffer = storage, shuffle_buffer
        counts = {s["name"]: s["count"] for s in info.manifest.splits[info.split].shards}
        self.counts = [counts[name] for name in info.shards]
        total, streams = sum(self.counts), world * self.streams
        if total < streams:
            raise UserError(f"split {info.split} of {info.url} has {total} samples, fewer than the {streams} loader "
                            f"streams ({world} ranks x {self.streams} workers): use fewer train.loader_workers or "
                            f"ranks, or more data")
        self.edges = [total * k // streams for k in range(streams + 1)]  # stream s: samples [edges[s], edges[s+1])

    def pieces(self, stream: int, epoch: int) -> list[tuple[int, int, int]]:
        """This stream's share of the epoch: (shard index, first sample, end) in the epoch's shard order."""
        n = len(self.counts)
        # seeded as the one stream of a single-process job always was, so such a job reads what it read before
        order = random.Random(f"{self.seed}/0/{epoch}").sample(range(n), n)
        first, end = self.edges[stream], self.edges[stream + 1]
        out, pos = [], 0
        for i in order:
            lo, hi = max(first, pos), min(end, pos + self.counts[i])
            if lo < hi:
                out.append((i, lo - pos, hi - pos))
            pos += self.counts[i]
            if pos >= end:
                break
        return out

    def _blocks(self, stream: int, epoch: int) -> list[list[tuple[int, int, int]]]:
        mine = self.pieces(stream, epoch)
        mean = sum(hi - lo for _, lo, hi in mine) / len(mine)
        per = max(1, math.ceil(self.shuffle_buffer / max(mean, 1)))
        return [mine[i:i + per] for i in range(0, len(mine), per)]

    def _read_block(self, stream: int, epoch: int, b: int, pieces: list[tuple[int, int, int]]
                    ) -> list[tuple[str, dict, dict, bool]]:
        """The block's samples in their shuffled order, each with its flip."""
        # a shard at the edge of the range is read whole all the same: read to its end, it is checked (count, sha256)
        items = [(f"{self.info.shards[i]}#{key}", img, emb) for i, lo, hi in pieces
                 for key, img, emb in list(paired_samples(self.info, self.info.shards[i], self.storage))[lo:hi]]
        rng = random.Random(f"{self.seed}/{stream}/{epoch}/{b}")
        rng.shuffle(items)
        return [(where, img, emb, self.info.manifest.flip and rng.random() < 0.5) for where, img, emb in items]

    def _samples_from(self, stream: int, position: int) -> Iterator[tuple[str, dict, dict, bool]]:
        """The stream's samples from ``position`` on, forever."""
        epoch, offset = divmod(position, self.edges[stream + 1] - self.edges[stream])
        while True:
            for b, pieces in enumerate(self._blocks(stream, epoch)):
                size = sum(hi - lo for _, lo, hi in pieces)
                if offset >= size:
                    offset -= size
                    continue
                yield from self._read_block(stream, epoch, b, pieces)[offset:]
                offset = 0
            epoch += 1

    def __iter__(self):
        wi = get_worker_info()
        workers, wid = (wi.num_workers, wi.id) if wi else (1, 0)
        if workers != self.streams:
            raise RuntimeError(f"TrainStream made for {self.streams} loader workers runs in {workers}")
        step = self.start + wid  # this worker yields steps start+wid, start+wid+W, ...: the DataLoader's order
        local = step % self.streams
        stream = self.rank * self.streams + local
        samples = self._samples_from(stream, (step // self.streams) * self.batch_size)
        while True:
            batch = [decode_pair(self.info, img, emb, flip, where) for where, img, emb, flip in
                     itertools.islice(samples, self.batch_size)]
            yield torch.stack([x for x, _ in batch]), torch.stack([h for _, h in batch])


def train_loader(info: DatasetInfo, batch_size: int, rank: int, world: int, seed: int, workers: int,
                 storage: StorageOptions | None = None, start: int = 0) -> DataLoader:
    """Batches of (images [B, 3, S, S], embeddings [B, D]) for this rank from step ``start`` on, forever;
    the batch of each step depends on (seed, rank, step, workers) only (``TrainStream``)."""
    return DataLoader(TrainStream(info, batch_size, rank, world, seed, start, workers, storage), batch_size=None,
                      num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                      multiprocessing_context="spawn" if workers and "://" in info.url else None,
                      prefetch_factor=4 if workers else None)


def embedding_stats(info: DatasetInfo, storage: StorageOptions | None = None, max_samples: int = 65536,
                    whiten: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-dimension mean and std [D] of the split's embeddings (both views), from at most ``max_samples``
    samples in shard order, and with ``whiten`` their ZCA matrix [D, D] (``zca``), all from one read of the
    embedding shards: what a recipe with normalised (or whitened) embeddings stores in the model."""
    h = _embedding_rows(info, storage, max_samples)
    images = len(h) // (2 if info.manifest.flip else 1)
    if images < 2:  # one image (and its mirror) has no spread to speak of: its statistics are NaN or degenerate
        raise UserError(f"split {info.split} of {info.url} holds {images} image(s): normalised embeddings "
                        f"(recipe.normalize_embeddings) need the statistics of at least 2; shard more images, or set "
                        f"recipe.normalize_embeddings=false")
    return h.mean(0).float(), h.std(0).clamp_min(1e-6).float(), zca(h)[1] if whiten else None


def zca(h: torch.Tensor, eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and ZCA matrix [D, D] of rows ``h`` [n, D]: (h - mean) @ W has identity covariance, up to ``eps``
    times the largest eigenvalue added to every eigenvalue, so directions of almost no variance are not blown up
    into noise. Small-variance directions (on the demo: much of what tells shape apart) reach the network at the
    scale of the dominant ones (colour)."""
    h = h.double()
    mean = h.mean(0)
    lam, u = torch.linalg.eigh(torch.cov((h - mean).T))
    lam = lam.clamp_min(0)
    w = u @ torch.diag(1 / torch.sqrt(lam + eps * lam.max().clamp_min(1e-12))) @ u.T
    return mean.float(), w.float()


def _embedding_rows(info: DatasetInfo, storage: StorageOptions | None, max_samples: int) -> torch.Tensor:
    """[n * views, D] float64: the split's first ``max_samples`` samples' embeddings, both views."""
    opened = open_fs(info.url, storage)
    names = [f"{info.level}.npy"] + ([f"{info.level}.flip.npy"] if info.manifest.flip else [])
    rows, n = [], 0
    for shard in info.shards:
        for key, emb in shard_samples(info, info.encoder, shard, opened=opened):
            try:
                rows += [np.load(io.BytesIO(emb[name]), allow_pickle=False).astype(np.float64) for name in names]
            except (KeyError, ValueError, OSError) as e:
                raise DatasetError(f"sample {shard}#{key} of {info.url}: its {info.encoder} embedding cannot be read "
                                   f"({e}); {_fix(info)}") from None
            n += 1
            if n >= max_samples:
                break
        if n >= max_samples:
            break
    return torch.from_numpy(np.stack(rows))  # [n * views, D]


def heldout(info: DatasetInfo, count: int, storage: StorageOptions | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first ``count`` samples of the split, unflipped: fixed conditioning for sample grids."""
    xs, hs, keys = [], [], []
    for shard in info.shards:
        for key, img, emb in paired_samples(info, shard, storage, fresh=False):
            x, h = decode_pair(info, img, emb, flip=False, where=f"{shard}#{key}")
            xs.append(x)
            hs.append(h)
            keys.append(key)
            if len(keys) == count:
                return torch.stack(xs), torch.stack(hs), keys
    if not keys:
        raise UserError(f"split {info.split} of {info.url} is empty")
    return torch.stack(xs), torch.stack(hs), keys


def heldout_factors(info: DatasetInfo, count: int, storage: StorageOptions | None = None) -> list[dict] | None:
    """The generative factors (``json`` member ``factors``) of the split's first ``count`` samples, or None when the
    dataset does not record them."""
    fs, root = open_fs(info.url, storage)
    out = []
    for shard in info.shards:
        with fs.open(join(root, "images", shard), "rb") as f:
            for sample in read_samples(f, MAX_MEMBER_BYTES):
                try:
                    factors = json.loads(sample.members.get("json", b"{}")).get("factors")
                except ValueError:
                    factors = None
                if not isinstance(factors, dict):
                    return None
                out.append(factors)
                if len(out) == count:
                    return out
    return out or None


def labelled_embeddings(info: DatasetInfo, count: int, storage: StorageOptions | None = None
                        ) -> tuple[torch.Tensor, list[dict]] | None:
    """The split's first ``count`` embeddings (unflipped) [M, D] with their generative factors, or None when the
    dataset does not record factors: what an embedding holds about each factor is measured against these."""
    hs, factors = [], []
    for shard in info.shards:
        for key, img, emb in paired_samples(info, shard, storage, fresh=False):
            try:
                f = json.loads(img.get("json", b"{}")).get("factors")
                h = np.load(io.BytesIO(emb[f"{info.level}.npy"]), allow_pickle=False)
            except (ValueError, KeyError) as e:
                raise DatasetError(f"sample {shard}#{key} of {info.url} cannot be read ({e}); {_fix(info)}") from None
            if not isinstance(f, dict):
                return None
            hs.append(torch.from_numpy(h.astype(np.float32)))
            factors.append(f)
            if len(factors) == count:
                return torch.stack(hs), factors
    return (torch.stack(hs), factors) if factors else None
