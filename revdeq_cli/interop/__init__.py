"""Interoperability: files made elsewhere, read safely, and conversions into our model directories.

    from revdeq_cli.interop import read_safetensors_header, convert_checkpoint, convert_revdeq_pytorch

Floor: beside training/ (imports model, data and checkpoints below; never training or cli; docs/DESIGN.md
§2). Nothing here unpickles
an untrusted file: safetensors headers are parsed as JSON, torch files go through the weights-only
unpickler.
"""

from revdeq_cli.checkpoints.safetensors_header import SafetensorsHeader, TensorInfo, read_safetensors_header
from revdeq_cli.interop.convert import ConvertResult, convert_checkpoint, convert_revdeq_pytorch, detect_source_kind
from revdeq_cli.interop.revdeq_pytorch import LegacyCheckpoint, read_revdeq_pytorch

__all__ = [
    "ConvertResult",
    "LegacyCheckpoint",
    "SafetensorsHeader",
    "TensorInfo",
    "convert_checkpoint",
    "convert_revdeq_pytorch",
    "detect_source_kind",
    "read_revdeq_pytorch",
    "read_safetensors_header",
]
