"""Distributed training: the per-rank weighted sampler, and a real two-process ``torchrun`` job
(gloo on CPU) on the synthetic data — identical weights on both ranks, rank 0 alone writes, the
world size is recorded, ``--resume`` works, and the metrics match a single-process evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import WeightedRandomSampler

from data_pipeline.dataset import (
    DistributedWeightedSampler,
    class_sampling_weights,
    expected_class_share,
    make_weighted_sampler,
)
from model.distributed import DIGEST_DIR_ENV
from tests.conftest import REPO, write_synthetic_ham


def _shares(labels: np.ndarray, power: float, n: int, world: int, epoch: int) -> list[list[int]]:
    out = []
    for rank in range(world):
        s = make_weighted_sampler(labels, power, n, seed=3, rank=rank, world_size=world)
        assert isinstance(s, DistributedWeightedSampler)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


def test_single_process_keeps_the_plain_weighted_sampler():
    assert isinstance(make_weighted_sampler([0, 1, 1, 2], 0.5, 10), WeightedRandomSampler)


def test_distributed_shares_are_disjoint_parts_of_one_weighted_sample():
    labels = np.repeat(np.arange(3), [60, 30, 10])
    world, n = 3, 100  # 100 is not a multiple of 3: rounded up to 102 so every rank gets 34
    shares = _shares(labels, 0.5, n, world, epoch=0)
    assert [len(s) for s in shares] == [34, 34, 34]
    weights = class_sampling_weights(np.bincount(labels), 0.5)[labels]
    g = torch.Generator().manual_seed(3)
    one = torch.multinomial(torch.as_tensor(weights), 102, True, generator=g).tolist()
    assert [one[r::world] for r in range(world)] == shares  # positions are dealt out, disjoint
    assert _shares(labels, 0.5, n, world, epoch=0) == shares  # deterministic per epoch
    assert _shares(labels, 0.5, n, world, epoch=1) != shares  # a new sample every epoch


def test_distributed_sample_stays_weighted():
    labels = np.repeat(np.arange(3), [900, 90, 10])
    shares = _shares(labels, 0.5, 60_000, world=4, epoch=2)
    drawn = np.bincount(labels[np.concatenate(shares)], minlength=3) / 60_000
    assert drawn == pytest.approx(expected_class_share(np.bincount(labels), 0.5), abs=0.01)
    per_rank = [np.bincount(labels[s], minlength=3) / len(s) for s in shares]
    for share in per_rank:  # every rank's share is itself a weighted sample
        assert share == pytest.approx(drawn, abs=0.02)


def test_bad_rank_is_refused():
    with pytest.raises(ValueError, match="outside a world"):
        DistributedWeightedSampler([1.0, 1.0], 4, rank=2, world_size=2)


def test_sync_batchnorm_keeps_the_network_and_its_checkpoint_keys():
    """The CUDA path converts BatchNorm to SyncBatchNorm; the saved weights must still load into a
    plain network and compute the same function (checked here in eval mode, which needs no GPU)."""
    from torch import nn

    from model.distributed import sync_batchnorm
    from model.network import FusionNet, ModelConfig

    torch.manual_seed(0)
    plain = FusionNet(ModelConfig(), pretrained=False).eval()
    synced = sync_batchnorm(FusionNet(ModelConfig(), pretrained=False))
    synced.load_state_dict(plain.state_dict())
    synced.eval()
    assert isinstance(synced, FusionNet)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    assert list(synced.state_dict()) == list(plain.state_dict())
    x, meta = torch.rand(2, 3, 64, 64), torch.zeros(2, 20)
    with torch.no_grad():
        assert torch.allclose(synced(x, meta), plain(x, meta), atol=1e-6)


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_torchrun_two_processes_train_resume_and_match_single_process_eval(tmp_path: Path):
    data = write_synthetic_ham(tmp_path / "ham", per_class=14)
    out, digests = tmp_path / "run", tmp_path / "digests"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({"OMP_NUM_THREADS": "1", DIGEST_DIR_ENV: str(digests)})
    env.pop("WORLD_SIZE", None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    train = [
        *torchrun,
        "--nproc_per_node",
        "2",
        "-m",
        "scripts.train",
        "--data-dir",
        str(data),
        "--out",
        str(out),
        "--splits",
        str(tmp_path / "splits.csv"),
        "--height",
        "64",
        "--width",
        "64",
        "--batch-size",
        "4",
        "--max-train-batches",
        "2",
        "--threads",
        "1",
        "--no-pretrained",
        "--device",
        "cpu",
    ]
    r = _run([*train, "--epochs", "1"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run([*train, "--epochs", "2", "--resume"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("resumed from") == 1  # every rank resumes, only rank 0 prints
    assert r.stdout.count("checkpoint written to") == 1

    # Both ranks ended with bit-identical weights and buffers (model and EMA).
    ranks = sorted(p.name for p in digests.iterdir())
    assert ranks == ["rank0.sha256", "rank1.sha256"]
    assert len({p.read_text() for p in digests.iterdir()}) == 1
    assert "all 2 ranks hold identical weights" in r.stdout

    # One output, written by rank 0 only: no per-rank files, one final checkpoint.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "best",
            "config.json",
            "history.csv",
            "history.json",
            "learning_curve.png",
            "model.onnx",
            "model.safetensors",
            "ood.safetensors",
            "splits.csv",
            "state.pt",
        ]
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["training"]["world_size"] == 2
    assert cfg["training"]["command"].startswith("torchrun --nnodes 1 --nproc_per_node 2 -m")
    assert cfg["training"]["distributed"]["backend"] == "gloo"
    assert cfg["training"]["distributed"]["global_batch_size"] == 8
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [1, 2]

    # The metrics rank 0 stored under DDP are those of a plain single-process evaluation.
    env.pop(DIGEST_DIR_ENV)
    for split in ("val", "test"):
        ev = tmp_path / f"eval_{split}"
        r = _run(
            [
                sys.executable,
                "-m",
                "scripts.evaluate",
                "--data-dir",
                str(data),
                "--checkpoint",
                str(out),
                "--out",
                str(ev),
                "--split",
                split,
                # the runtime training scored with: ONNX Runtime's last-digit differences can
                # reorder tied scores of this tiny model and move its AUC
                "--runtime",
                "torch",
            ],
            env,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        single = json.loads((ev / "metrics.json").read_text())
        stored = cfg["metrics"][split]
        assert single["n"] == stored["n"] > 0
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece"):
            assert single[key] == pytest.approx(stored[key], abs=1e-6), key
        assert single["confusion_matrix"] == stored["confusion_matrix"]
