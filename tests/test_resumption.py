"""Exact resumption: a run interrupted by the preemption signal at arbitrary steps and started again ends
bitwise equal to the same run never interrupted (model, EMA, optimizer), because the batch and every random
draw of step k are functions of (seed, rank, k), not of when the job started."""
import os
import signal

import pytest
import torch

import rcdm.train as train_module
from pipeline.stages import train_config
from rcdm import train_checkpoints
from rcdm.data import open_dataset, train_loader
from rcdm.train import Preempted, train

STEPS = 18


def _config(compose_sweep, dataset, root, db, workers: int):
    return train_config(compose_sweep([
        "data=shards", f"data.url={dataset}", "encoder=dino", "level=backbone", f"storage.run_root={root}",
        f"tracking.uri=sqlite:///{db}", f"train.steps={STEPS}", "train.batch_size=8", "train.log_every=6",
        "train.checkpoint_every=1000", "train.sample_every=1000", f"train.loader_workers={workers}",
        "train.progress=false", "grid.images=2", "grid.samples=1", "grid.steps=ddim2", "faithfulness.images=0",
        "invariance.images=0", "diagnostic.images=0"]))


def _final_state(cfg) -> dict:
    return train_checkpoints.load(train_checkpoints.latest_path(cfg.run_root))


def _assert_bitwise_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_bitwise_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_interrupted_three_times_ends_bitwise_equal_to_an_uninterrupted_one(
        tmp_path, dataset, compose_sweep, monkeypatch, workers):
    whole = _config(compose_sweep, dataset, tmp_path / "whole", tmp_path / "m.db", workers)
    assert train(whole)["step"] == STEPS

    # the preemption signal, for real, in the middle of the updates 4, 9 and 15 (counted over all starts)
    updates, apply_update = [0], train_module.apply_update

    def update_then_maybe_signal(*args, **kwargs):
        out = apply_update(*args, **kwargs)
        updates[0] += 1
        if updates[0] in (4, 9, 15):
            os.kill(os.getpid(), signal.SIGUSR2)
        return out

    monkeypatch.setattr(train_module, "apply_update", update_then_maybe_signal)
    cut = _config(compose_sweep, dataset, tmp_path / "cut", tmp_path / "m.db", workers)
    starts, stopped_at = 0, []
    while True:
        starts += 1
        try:
            assert train(cut)["step"] == STEPS
            break
        except Preempted:
            stopped_at.append(_final_state(cut)["step"])
    assert starts == 4 and stopped_at == [5, 10, 16] and updates[0] == STEPS  # no update done twice

    a, b = _final_state(whole), _final_state(cut)
    for key in ("model", "ema", "optimizer"):
        _assert_bitwise_equal(a[key], b[key], key)
    assert set(a) == {"step", "train_seconds", "train_cpu_seconds", "model", "ema", "optimizer", "config",
                      "mlflow_run_id", "meta", "format", "version"}  # every key read on resume or by a loader


def test_the_batch_of_a_step_does_not_depend_on_where_the_loader_started(dataset):
    info = open_dataset(dataset, "dino", "backbone")
    for workers in (0, 2):
        from_start = iter(train_loader(info, 8, 0, 1, seed=3, workers=workers))
        batches = [next(from_start) for _ in range(9)]  # 48 images: the stream goes round more than once
        resumed = iter(train_loader(info, 8, 0, 1, seed=3, workers=workers, start=5))
        for k in range(5, 9):
            x, h = next(resumed)
            assert torch.equal(x, batches[k][0]) and torch.equal(h, batches[k][1]), (workers, k)
    other_rank = next(iter(train_loader(info, 8, 1, 2, seed=3, workers=0)))
    first_rank = next(iter(train_loader(info, 8, 0, 2, seed=3, workers=0)))
    assert not torch.equal(other_rank[1], first_rank[1])
    # a pass over the data sees every image, each once, flipped or not
    one = iter(train_loader(info, 8, 0, 1, seed=4, workers=0))
    seen = torch.cat([next(one)[0] for _ in range(6)])
    signature = (seen + seen.flip(3)).pow(2).flatten(1).sum(1).round(decimals=2)  # the same for both views
    assert len(torch.unique(signature)) == 48


def test_every_stream_gets_an_equal_share_of_every_epoch(dataset):
    """(rank, worker) streams cut each epoch's samples into equal ranges, whatever the number of shards: 12 streams
    over 48 samples in 3 shards get 4 samples each, the epoch's samples each exactly once, in a new shard order
    every epoch (with whole shards per stream, some would get a shard and others none)."""
    from rcdm.data import TrainStream

    info = open_dataset(dataset, "dino", "backbone")
    world, workers = 4, 3
    streams = [TrainStream(info, 8, rank, world, seed=0, workers=workers) for rank in range(world)]
    total = sum(streams[0].counts)
    for epoch in (0, 1):
        seen, sizes = [], []
        for rank, stream in enumerate(streams):
            for local in range(workers):
                pieces = stream.pieces(rank * workers + local, epoch)
                sizes.append(sum(hi - lo for _, lo, hi in pieces))
                seen += [(shard, k) for shard, lo, hi in pieces for k in range(lo, hi)]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == total
        assert sorted(seen) == sorted((i, k) for i, c in enumerate(streams[0].counts) for k in range(c))
    assert streams[0].pieces(0, 0) != streams[0].pieces(0, 1) or len(streams[0].counts) == 1
    with pytest.raises(Exception, match="fewer than the 64 loader streams"):
        TrainStream(info, 8, 0, 32, seed=0, workers=2)


def test_a_signal_in_the_last_step_or_after_it_leaves_the_job_finished(tmp_path, dataset, compose_sweep,
                                                                        monkeypatch):
    """SLURM's time-limit signal can come while the last step runs, or after the loop: the job is done, so it
    ends normally (a preempted, requeued finished job would run again; a killed one would end FAILED)."""
    updates, apply_update = [0], train_module.apply_update

    def update_then_maybe_signal(*args, **kwargs):
        out = apply_update(*args, **kwargs)
        updates[0] += 1
        if updates[0] == STEPS - 1:  # read at the start of the last step
            os.kill(os.getpid(), signal.SIGUSR2)
        return out

    monkeypatch.setattr(train_module, "apply_update", update_then_maybe_signal)
    try:
        assert train(_config(compose_sweep, dataset, tmp_path / "r", tmp_path / "m.db", 0))["step"] == STEPS
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN  # a later signal is ignored, not fatal
        os.kill(os.getpid(), signal.SIGUSR2)
    finally:
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
