"""Optional int8 export: ``model.int8.onnx``, a statically quantised copy of ``model.onnx``.

Why it exists: on a 2-core CPU the float32 export of the shipped two-network ensemble cannot go
faster than ~100 images/s or ~10 ms per image (measured: batch size, thread layout, spinning and
fusing the members into grouped convolutions all give the same), while int8 convolutions on
VNNI/AMX hardware run about twice as fast. Why it is **not** the default: post-training
quantisation moves probabilities (on the shipped model 3–5 % of top-1 classes change on the
validation sets and the selection score drops; docs/benchmarks.md, "Why float32 stays the
default"). It is a documented speed-for-accuracy trade a deployment may choose with
``--runtime int8``; float32 stays the reference that every published metric comes from unless
a row says otherwise.

How: ONNX Runtime's static quantisation (QDQ format, per-channel symmetric int8 weights, uint8
activations with MinMax ranges) calibrated on training images only — a class-stratified sample
of the checkpoint's HAM10000 *train* split plus any extra training folder — never on validation
or test images. ``config.json`` → ``onnx.int8`` records the file's SHA-256, the weights it was
made from and the calibration set, and the runtime refuses a file that does not match.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.errors import DataError
from data_pipeline.dataset import LesionDataset
from data_pipeline.ham10000 import load_metadata
from data_pipeline.transforms import ImageTransform
from model.checkpoint import (
    INT8_FILE,
    CheckpointConfig,
    CheckpointError,
    load_config,
    write_config,
)
from model.evaluate import select_rows
from model.onnx_runtime import onnx_status, write_export

#: Calibration images per class and per folder (the ranges settle well below this).
PER_CLASS = 48
METHOD = "static QDQ: per-channel int8 weights, uint8 activations, MinMax ranges"


def calibration_rows(
    cfg: CheckpointConfig,
    data_dir: Path | str,
    extra: Sequence[Path | str] = (),
    per_class: int = PER_CLASS,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Training images to calibrate on: a class-stratified sample of ``data_dir``'s train split
    (the checkpoint's split file) and of each ``extra`` folder (training sources, used whole)."""
    ham, info = select_rows(load_metadata(data_dir, classes=cfg.classes), cfg, "train", None)
    frames = [ham] + [load_metadata(folder, classes=cfg.classes) for folder in extra]
    picked = [
        g.sample(min(len(g), per_class), random_state=seed)
        for df in frames
        for _, g in df.groupby("dx")
    ]
    rows = pd.concat(picked, ignore_index=True)
    if rows.empty:
        raise DataError(f"No training rows to calibrate on in {data_dir}.")
    record = {
        "images": len(rows),
        "per_class": per_class,
        "seed": seed,
        "folders": [str(data_dir), *(str(e) for e in extra)],
        "split": "train",
        "split_sha256": info.get("split_sha256"),
    }
    return rows, record


def _batches(rows: pd.DataFrame, cfg: CheckpointConfig) -> Iterator[dict[str, np.ndarray]]:
    dataset = LesionDataset(rows, ImageTransform(cfg.preprocessing, train=False))
    for i in range(len(dataset)):
        image, meta, _ = dataset[i][:3]
        yield {"image": image[None].numpy(), "meta": meta[None].numpy().astype(np.float32)}


def quantize_int8(
    folder: Path | str,
    data_dir: Path | str,
    extra: Sequence[Path | str] = (),
    per_class: int = PER_CLASS,
    verbose: bool = False,
) -> Path:
    """Write ``folder/model.int8.onnx`` from the checkpoint's verified float32 export, calibrated
    on training images of ``data_dir`` (+ ``extra``), and record it in ``config.json``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    folder = Path(folder)
    cfg = load_config(folder)  # the config alone: the weights are not needed here
    problem = onnx_status(folder, cfg)
    if problem is not None:
        raise CheckpointError(f"Cannot quantise: {problem}.")
    rows, calibration = calibration_rows(cfg, data_dir, extra, per_class)
    feeds = _batches(rows, cfg)

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(feeds, None)

    with tempfile.TemporaryDirectory(prefix="dermfusion-int8-") as tmp:
        # folds the float16 casts and BatchNorm into the convolutions the quantiser sees
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(folder / cfg.onnx["file"]), str(pre), skip_symbolic_shape=True)
        raw = Path(tmp) / "int8.onnx"
        quantize_static(
            str(pre),
            str(raw),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        data = raw.read_bytes()
    cfg.onnx["int8"] = {
        **write_export(folder, INT8_FILE, data, cfg),
        "method": METHOD,
        "calibration": calibration,
    }
    write_config(cfg, folder)
    if verbose:
        print(f"wrote {folder / INT8_FILE} ({len(data) / 1e6:.1f} MB)", file=sys.stderr)
    return folder / INT8_FILE
