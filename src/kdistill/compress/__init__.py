"""Take the student the last mile: ONNX export (checked against PyTorch), INT8 quantization with ONNX Runtime,
structured pruning with Torch-Pruning + KD fine-tuning, and the pipeline that chains them and measures every stage.

Needs the extras: ``pip install 'kdistill[onnx,prune,report]'``.
"""

from __future__ import annotations

from kdistill.compress.export import OnnxExport, OnnxPredictor, check_onnx, export_onnx
from kdistill.compress.pipeline import CompressResult, compress
from kdistill.compress.prune import PrunedStudent, finetune_with_teacher, prune_and_finetune, prune_structured
from kdistill.compress.quantize import QuantizedModel, quantize_onnx

__all__ = [
    "CompressResult",
    "OnnxExport",
    "OnnxPredictor",
    "PrunedStudent",
    "QuantizedModel",
    "check_onnx",
    "compress",
    "export_onnx",
    "finetune_with_teacher",
    "prune_and_finetune",
    "prune_structured",
    "quantize_onnx",
]
