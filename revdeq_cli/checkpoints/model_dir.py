"""Writing a model directory: the files every directory revdeq writes holds (docs/DESIGN.md §4).

    save_model_dir(directory, model, tokenizer)

* `config.json` (with `auto_map`) and `model.safetensors`: `model.save_pretrained`;
* `generation_config.json`: `revdeq generate`'s sampling defaults and the model's special ids
  (`revdeq_cli.sampling.default_generation_config`);
* the modeling code, generated from the package's own modules (`revdeq_cli.model.remote_code`), so
  `AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)` works without revdeq installed;
* the tokenizer files, when a tokenizer is given.

Training checkpoints (and so `best/`, `final/`, which copy them) and `revdeq convert` output all go through here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def save_model_dir(directory: str | os.PathLike[str], model: Any, tokenizer: Any | None = None) -> Path:
    """Write `model` (an unwrapped `RevDEQForCausalLM`) and `tokenizer` into `directory` (existing, normally
    a temp dir of `atomic_dir`); return it."""
    from revdeq_cli.model.remote_code import write_remote_code
    from revdeq_cli.sampling import default_generation_config

    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    default_generation_config(model.config).save_pretrained(directory)
    write_remote_code(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory
