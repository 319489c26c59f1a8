"""Moved to `revdeq_cli.checkpoints.safetensors_header` (issue 19); re-exported here for older imports."""

from revdeq_cli.checkpoints.safetensors_header import (  # noqa: F401
    DTYPE_BYTES,
    DTYPE_NAMES,
    SafetensorsHeader,
    TensorInfo,
    read_safetensors_header,
)
