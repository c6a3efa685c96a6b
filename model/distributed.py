"""Data-parallel training across processes and machines with PyTorch's own machinery.

``torchrun`` starts one process per device and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
the rendezvous (``MASTER_ADDR`` / ``MASTER_PORT``) in each process's environment; :func:`init`
reads them and joins the process group (NCCL on CUDA, gloo on CPU). Started any other way
(``python -m scripts.train``) the world has size 1, no process group is created, and every helper
here is a no-op, so the single-process path stays exactly as it was.

Choices (documented in docs/guide/training.md, "Distributed training"):

* **Sampling** — :class:`data_pipeline.dataset.DistributedWeightedSampler`: each epoch one
  weighted sample is drawn (same seed and epoch on every rank) and rank r takes every
  world-size-th index from r, so the shares are disjoint and together are one weighted sample.
  ``--batch-size`` is per process; the global batch is ``world_size × batch_size``.
* **BatchNorm** — on CUDA, ``SyncBatchNorm`` (timm's conversion, which keeps BatchNormAct's
  activation). PyTorch's SyncBatchNorm does not run on CPU, so under gloo each rank normalises
  with its own batch statistics and the running statistics of rank 0 are broadcast to every rank
  after each step (:func:`sync_buffers`), so all ranks hold identical weights and buffers.
* **Validation** — rank 0 scores the full, unsharded validation sets with the unwrapped EMA
  model, exactly as a single process does, while the other ranks wait at a barrier; the result is
  broadcast so every rank takes the same early-stopping decision. Same checkpoint, same metrics.
* **Output** — only rank 0 writes logs, ``best/``, ``state.pt`` and the final checkpoint.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

from common.errors import DermError

T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)

#: How long a rank waits at a collective (e.g. while rank 0 validates) before giving up.
TIMEOUT = timedelta(hours=2)
#: When set, each rank writes the SHA-256 of its final weights to ``<dir>/rank<r>.sha256``
#: (the DDP test compares them across ranks).
DIGEST_DIR_ENV = "DERMFUSION_DDP_DIGEST_DIR"


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job (world size 1 when not started by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def env_rank() -> int:
    """This process's rank as torchrun set it (0 otherwise); valid before and after the group."""
    return int(os.environ.get("RANK", "0") or 0)


def init(device_name: str) -> tuple[DistInfo, torch.device | None]:
    """Join the process group torchrun describes (if any); returns it and this rank's device
    (None in a single process: the caller picks the device as it always has).

    ``device_name`` is the ``--device`` flag: under torchrun ``auto`` / ``cuda`` mean this
    process's GPU (``cuda:LOCAL_RANK``), ``cpu`` means gloo on CPU."""
    world = env_world_size()
    if world <= 1:
        return DistInfo(), None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_name.startswith("cuda:"):
        raise DermError(
            f"--device {device_name} under torchrun: use --device cuda (each process takes "
            "cuda:LOCAL_RANK) or limit the GPUs with CUDA_VISIBLE_DEVICES."
        )
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise DermError("--device cuda, but no CUDA device is available.")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
    return DistInfo(rank, dist.get_world_size(), local_rank, backend), device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(obj: T, src: int = 0) -> T:
    """``obj`` as rank ``src`` has it, on every rank (any picklable object)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_sum(*values: float) -> list[float]:
    """Element-wise sums of ``values`` over all ranks (e.g. loss totals and sample counts)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return [float(v) for v in t.cpu()]


def prepare_model(model: M, info: DistInfo, device: torch.device) -> M:
    """SyncBatchNorm on CUDA (see the module docstring for CPU); returns the unwrapped module."""
    if info.enabled and device.type == "cuda":
        return sync_batchnorm(model).to(device)
    return model


def sync_batchnorm(model: M) -> M:
    """The same model with SyncBatchNorm layers: same class, same state-dict keys (so checkpoints
    load into a plain network), and timm's BatchNormAct keeps its activation."""
    from timm.layers import convert_sync_batchnorm

    return cast(M, convert_sync_batchnorm(model))


def wrap(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """The module to run forward/backward on: DDP under torchrun (which broadcasts rank 0's
    weights to every rank here), else ``model`` itself."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
    if not active():
        return
    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def state_digest(*modules: nn.Module) -> str:
    """SHA-256 over every tensor of the modules' state dicts, in order (names included)."""
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def check_identical(*modules: nn.Module) -> str:
    """Raise unless every rank holds bit-identical weights and buffers; returns the digest.

    With ``$DERMFUSION_DDP_DIGEST_DIR`` set, each rank also writes its digest there."""
    digest = state_digest(*modules)
    out_dir = os.environ.get(DIGEST_DIR_ENV)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"rank{rank()}.sha256"), "w") as fh:
            fh.write(digest + "\n")
    if active():
        digests: list[Any] = [None] * world_size()
        dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks hold different weights: {digests}")
    return digest
