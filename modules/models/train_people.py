"""Train the pedestrian counter (2-D CNN on 96x96 gray frames of vtest.avi), export it to ONNX,
quantize it to int8 and score both on the held-out frames.

    .venv-train/bin/python modules/models/train_people.py [--video FILE] [--out DIR]

The labels (pedestrians per frame) come from a classical procedure on the full-resolution frames
(nn_data.pedestrian_blobs: median background, difference, morphology, blob size) and are
written to labels.csv beside the models; the model sees only what the appliance's camera source
delivers (gray, INTER_AREA to 96x96 on the host). Writes people_cnn.onnx, people_cnn.int8.onnx,
labels.csv and report.json to modules/models/people_cnn/.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nn_data as ds  # noqa: E402
import train_common as common  # noqa: E402

SEED = 9
EPOCHS = 80
BATCH = 16
SCALE, OFFSET = 1 / 255, 0.0       # model input = pixel * SCALE + OFFSET (the module applies it to u8 pixels)
OUT = Path(__file__).resolve().parent / "people_cnn"
INPUT, OUTPUT = "frame", "people"
GRID = (12, 12)                    # (rows, columns) of the density map


def build_model():
    import torch.nn as nn

    class PeopleCNN(nn.Module):
        """96x96 gray -> pedestrian count. Three 3x3 convolutions of stride 2 (96 -> 48 -> 24 -> 12),
        then two 1x1 ones down to a 12x12 density map (pedestrians per cell, >= 0) whose sum is the
        count: counting is local evidence added up, so it holds for more people than a training
        frame had. About 1.6 M multiply-adds. Batch norms fold into the convolutions at export."""

        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.Conv2d(32, 16, 1), nn.ReLU())
            self.density = nn.Conv2d(16, 1, 1)
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.export_count = False

        def forward(self, x):
            d = self.density(self.features(x)).relu()
            if not self.export_count:
                return d
            # The sum over the 12x12 map, as the mean times 144: relu(144 z) = 144 relu(z), so the
            # factor goes into the last convolution and the graph ends Conv, Relu, GlobalAveragePool.
            return self.pool(d)

    return PeopleCNN()


def fold_count_scale(model) -> None:
    """Make the exported mean of the density map the count (see PeopleCNN.forward)."""
    import torch
    cells = GRID[0] * GRID[1]
    with torch.no_grad():
        model.density.weight.mul_(cells)
        model.density.bias.mul_(cells)
    model.export_count = True


def density_targets(blobs: list[list[tuple[int, int, int, int, int]]], full_size: tuple[int, int]) -> np.ndarray:
    """Per frame, each pedestrian's unit mass spread over its box on the 12x12 grid, in proportion
    to the box's overlap with each cell: (n, 1, 12, 12) float32 whose sums are the labels."""
    width, height = full_size
    gy, gx = GRID
    out = np.zeros((len(blobs), 1, gy, gx), np.float32)
    cx = np.arange(gx + 1) * width / gx
    cy = np.arange(gy + 1) * height / gy
    for i, frame in enumerate(blobs):
        for x, y, w, h, _ in frame:
            ox = np.clip(np.minimum(cx[1:], x + w) - np.maximum(cx[:-1], x), 0, None)
            oy = np.clip(np.minimum(cy[1:], y + h) - np.maximum(cy[:-1], y), 0, None)
            out[i, 0] += np.outer(oy, ox) / (w * h)
    return out


def to_input(frames: np.ndarray) -> np.ndarray:
    return (frames.astype(np.float32) * np.float32(SCALE) + np.float32(OFFSET))[:, None]


def train(x: np.ndarray, density: np.ndarray):
    import torch
    model = build_model()
    rng = np.random.default_rng(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
    for epoch in range(EPOCHS):
        model.train()
        order = rng.permutation(len(x))
        map_sum = count_sum = 0.0
        for i in range(0, len(order), BATCH):
            idx = order[i:i + BATCH]
            # Lighting and sensor noise vary; the scene does not (a fixed camera).
            gain = rng.uniform(0.85, 1.15, (len(idx), 1, 1, 1)).astype(np.float32)
            shift = rng.uniform(-0.06, 0.06, (len(idx), 1, 1, 1)).astype(np.float32)
            noise = rng.normal(0, 2 / 255, x[idx].shape).astype(np.float32)
            xb = torch.from_numpy(np.clip(x[idx] * gain + shift + noise, 0, 1))
            t = torch.from_numpy(density[idx])
            opt.zero_grad()
            d = model(xb)
            map_loss = ((d - t) ** 2).sum(dim=(1, 2, 3)).mean()
            count_loss = ((d.sum(dim=(1, 2, 3)) - t.sum(dim=(1, 2, 3))) ** 2).mean()
            loss = map_loss + 0.1 * count_loss
            loss.backward()
            opt.step()
            map_sum += map_loss.item() * len(idx)
            count_sum += count_loss.item() * len(idx)
        sched.step()
        if epoch % 10 == 9 or epoch == EPOCHS - 1:
            print(f"epoch {epoch + 1:>3}: map loss {map_sum / len(x):.4f}, count mse {count_sum / len(x):.4f}",
                  flush=True)
    model.eval()
    return model


def metrics(pred: np.ndarray, truth: np.ndarray) -> dict:
    err = pred - truth
    rounded = np.rint(pred).astype(np.int64)
    return {"frames": int(len(truth)), "mae": float(np.abs(err).mean()), "bias": float(err.mean()),
            "exact": float((rounded == truth).mean()), "within_1": float((np.abs(rounded - truth) <= 1).mean())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--video", type=Path, default=ds.VIDEO)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    common.deterministic(SEED)
    import torch

    t0 = time.monotonic()
    full = ds.read_frames(args.video, resize=None)
    blobs = ds.pedestrian_blobs(full)
    labels = np.array([len(b) for b in blobs], np.int64)
    density = density_targets(blobs, (full.shape[2], full.shape[1]))
    del full
    frames = ds.read_frames(args.video)
    if len(frames) != len(labels):
        raise RuntimeError(f"{args.video}: {len(frames)} resized frames but {len(labels)} full-size ones")
    print(f"{len(frames)} frames; labels read in {time.monotonic() - t0:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "labels.csv", "w") as fh:
        fh.write("frame,people\n")
        fh.writelines(f"{i},{n}\n" for i, n in enumerate(labels))

    x = to_input(frames)
    train_x, train_y = x[:ds.TRAIN_FRAMES], labels[:ds.TRAIN_FRAMES]
    test_x, test_y = x[ds.TEST_FROM:], labels[ds.TEST_FROM:]
    model = train(train_x, density[:ds.TRAIN_FRAMES])
    fold_count_scale(model)

    float_path, int8_path = args.out / "people_cnn.onnx", args.out / "people_cnn.int8.onnx"
    common.export(model, np.zeros((1, 1, ds.FRAME[1], ds.FRAME[0]), np.float32), float_path, INPUT, OUTPUT)
    common.quantize(float_path, int8_path, INPUT, train_x[::4])     # calibration: training frames only

    with torch.no_grad():
        torch_out = model(torch.from_numpy(test_x)).numpy()[:, 0]
    held = {kind: common.ort_outputs(path, test_x)[:, 0] for kind, path in (("float", float_path),
                                                                          ("int8", int8_path))}
    train_pred = common.ort_outputs(float_path, train_x)[:, 0]
    export_err = float(np.abs(torch_out - held["float"]).max())
    report = {
        "task": "number of pedestrians in view, from one 96x96 gray frame",
        "input": {"name": INPUT, "shape": [1, 1, ds.FRAME[1], ds.FRAME[0]], "pixels": "u8 gray, INTER_AREA",
                  "scale": SCALE, "offset": OFFSET},
        "output": {"name": OUTPUT, "shape": [1, 1]},
        "labels": {"file": "labels.csv", "procedure": {"diff": ds.DIFF, "min_area": ds.MIN_AREA,
                                                       "min_height": ds.MIN_HEIGHT},
                   "train_counts": np.bincount(train_y).tolist(), "held_out_counts": np.bincount(test_y).tolist()},
        "split": {"frames": int(len(frames)), "train": [0, ds.TRAIN_FRAMES], "held_out": [ds.TEST_FROM,
                                                                                         int(len(frames))]},
        "training": {"seed": SEED, "epochs": EPOCHS, "batch": BATCH, **common.versions()},
        "files": {"float": common.file_info(float_path), "int8": common.file_info(int8_path)},
        "export_max_abs_diff_torch_vs_ort": export_err,
        "train": {"float": metrics(train_pred, train_y)},
        "held_out": {kind: metrics(pred, test_y) for kind, pred in held.items()},
        "held_out_baseline_mean_count": metrics(np.full(len(test_y), train_y.mean()), test_y),
    }
    common.write_report(args.out / "report.json", report)
    f, q = report["files"]["float"]["bytes"], report["files"]["int8"]["bytes"]
    print(f"float {f} bytes, int8 {q} bytes ({q / f:.0%}); torch vs onnxruntime max |diff| {export_err:.2e}")
    print(f"labels: train {report['labels']['train_counts']}, held out {report['labels']['held_out_counts']} "
          f"(frames with 0, 1, 2, ... pedestrians)")
    for kind, m in (("train float", report["train"]["float"]), ("held-out float", report["held_out"]["float"]),
                    ("held-out int8", report["held_out"]["int8"]),
                    ("held-out, training mean", report["held_out_baseline_mean_count"])):
        print(f"{kind:<24} MAE {m['mae']:.3f}  bias {m['bias']:+.3f}  exact {m['exact']:.1%}  "
              f"within 1 {m['within_1']:.1%}  ({m['frames']} frames)")
    print(f"done in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
