"""Exponential moving average of the weights, the model that is validated and shipped.

Short CPU runs end while the learning rate is still high enough for the raw weights to jitter
from batch to batch; the average is smoother, scores higher and makes "best epoch by val balanced
accuracy" less of a coin toss. Buffers (BatchNorm statistics) are averaged too, as in timm's
``ModelEmaV3``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA:
    """``ema = d·ema + (1-d)·weights`` after every optimiser step, with a warm-up on ``d``
    (``(1+n)/(10+n)``) so the first steps are not dominated by the random initial head."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = model.state_dict()
        for name, avg in self.module.state_dict().items():
            new = current[name]
            if avg.dtype.is_floating_point:
                avg.lerp_(new.to(avg.dtype), 1.0 - d)
            else:
                avg.copy_(new)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
