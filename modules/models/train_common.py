"""What both training scripts share: determinism, ONNX export, int8 quantization, onnxruntime scoring."""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np

OPSET = 13
THREADS = 1          # one thread: the same float summation order on every run and every machine size


def deterministic(seed: int) -> None:
    import torch
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(THREADS)
    torch.set_num_interop_threads(THREADS)
    torch.use_deterministic_algorithms(True)


def export(model, example: np.ndarray, path: Path, input_name: str, output_name: str) -> None:
    """Static shapes, batch 1, constants folded; the TorchScript exporter writes plain ONNX ops
    (Conv, Relu, MaxPool, GlobalAveragePool, Flatten, Gemm, Softmax) without a runtime library."""
    import onnx
    import torch
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (torch.from_numpy(example),), str(path), dynamo=False, opset_version=OPSET,
                      input_names=[input_name], output_names=[output_name], do_constant_folding=True)
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    m.producer_name, m.producer_version = "modules/models", "1"     # not the torch build: same bytes everywhere
    onnx.save(m, str(path))


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over an array of inputs (one per call)."""

    def __init__(self, input_name: str, samples: np.ndarray) -> None:
        self._name = input_name
        self._samples = samples
        self._i = 0

    def get_next(self):
        if self._i >= len(self._samples):
            return None
        x = self._samples[self._i:self._i + 1]
        self._i += 1
        return {self._name: x}

    def rewind(self) -> None:
        self._i = 0


def quantize(float_path: Path, int8_path: Path, input_name: str, calibration: np.ndarray,
             quant_format: str = "QOperator") -> None:
    """Static int8 quantization with onnxruntime: int8 weights per output channel, int8
    activations, ranges from the calibration inputs (training split only)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    quantize_static(str(float_path), str(int8_path), _Calibration(input_name, calibration),
                    quant_format=QuantFormat.QOperator if quant_format == "QOperator" else QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=None)
    import onnx
    m = onnx.load(str(int8_path))
    m.producer_name, m.producer_version = "modules/models", "1"
    onnx.save(m, str(int8_path))


def ort_session(path: Path):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_outputs(path: Path, inputs: np.ndarray) -> np.ndarray:
    """The model's (only) output for each input, batch 1 at a time: (n, ...)."""
    sess = ort_session(path)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[None]})[0] for x in inputs])


def versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def file_info(path: Path) -> dict:
    data = path.read_bytes()
    return {"file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_report(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")
