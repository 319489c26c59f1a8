"""Conversions into a slim model directory that `AutoModelForCausalLM.from_pretrained` loads.

    convert_checkpoint(source, dest, dtype=None)        # a training checkpoint (or run dir) -> model dir
    convert_revdeq_pytorch(source, dest, dtype=None)    # the earlier port's model.pt -> model dir

A model directory holds `config.json` (with `auto_map`), `generation_config.json`, `model.safetensors`, the
modeling code generated from the package (so `trust_remote_code=True` loads it without revdeq) and the
tokenizer files, and nothing of training (no optimiser state); see `revdeq_cli.checkpoints.model_dir`.
DEST is never half-written: everything is written into a temporary sibling directory that is renamed onto
DEST at the end, and removed on any failure. DEST must not exist yet, or be an empty directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from revdeq_cli.errors import CheckpointError, UserError

DTYPES = ("float32", "bfloat16", "float16")

# The earlier port's tensor names -> ours (revdeq_cli.model: wte, wpe, blocks.0.{ln_1, attn.c_attn, ...}).
# Its nn.MultiheadAttention packs q, k, v as in_proj_weight [3H, H] in that order, heads contiguous inside
# each: exactly the layout of our attn.c_attn.weight, so the packed weight maps over unchanged.
REVDEQ_PYTORCH_NAMES: dict[str, str] = {
    "token_embedding.weight": "wte.weight",
    "position_embedding.weight": "wpe.weight",
    "layer.norm1.weight": "blocks.0.ln_1.weight",
    "layer.norm1.bias": "blocks.0.ln_1.bias",
    "layer.attention.in_proj_weight": "blocks.0.attn.c_attn.weight",
    "layer.attention.in_proj_bias": "blocks.0.attn.c_attn.bias",
    "layer.attention.out_proj.weight": "blocks.0.attn.c_proj.weight",
    "layer.attention.out_proj.bias": "blocks.0.attn.c_proj.bias",
    "layer.norm2.weight": "blocks.0.ln_2.weight",
    "layer.norm2.bias": "blocks.0.ln_2.bias",
    "layer.ffn.0.weight": "blocks.0.mlp.c_fc.weight",
    "layer.ffn.0.bias": "blocks.0.mlp.c_fc.bias",
    "layer.ffn.2.weight": "blocks.0.mlp.c_proj.weight",
    "layer.ffn.2.bias": "blocks.0.mlp.c_proj.bias",
    "ln_f.weight": "ln_f.weight",
    "ln_f.bias": "ln_f.bias",
    "lm_head.weight": "lm_head.weight",
}


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion wrote: the directory, its files with sizes, and what it contains."""

    dest: Path
    source: Path
    source_kind: str  # "checkpoint" | "revdeq-pytorch"
    dtype: str
    parameters: dict[str, int]  # total / embedding / non_embedding
    files: list[tuple[str, int]]  # (file name, bytes), sorted
    ignored: list[str] = field(default_factory=list)  # entries of the source deliberately left out
    notes: list[str] = field(default_factory=list)


def detect_source_kind(source: Path) -> str:
    """`--from auto`: a file is a RevDEQ-PyTorch `model.pt`; a directory is a checkpoint or run dir."""
    if source.is_dir():
        return "checkpoint"
    if source.is_file():
        return "revdeq-pytorch"
    raise CheckpointError(f"{source}: no such file or directory (expected a checkpoint directory, a run "
                          f"directory or a RevDEQ-PyTorch model.pt)")


def check_dest_free(dest: Path) -> None:
    """Refuse (before any work) a DEST that exists and is not an empty directory: never overwrite."""
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise UserError(f"{dest}: already exists; choose a new DEST directory (nothing was written)")


def _torch_dtype(name: str | None) -> Any:
    import torch

    if name is None:
        return None
    if name not in DTYPES:
        raise UserError(f"--dtype: must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def _listing(path: Path) -> list[tuple[str, int]]:
    return sorted((p.name, p.stat().st_size) for p in path.iterdir() if p.is_file())


def convert_checkpoint(source: str | Path, dest: str | Path, dtype: str | None = None) -> ConvertResult:
    """A training checkpoint (or a run directory: its newest checkpoint) -> a slim model directory.

    Weights are cast to `dtype` if given (float32, bfloat16, float16), else kept as stored. The tokenizer
    files and generation config are copied; `training_state.pt` is left out."""
    from revdeq_cli.checkpoints import atomic_dir, load_checkpoint
    from revdeq_cli.checkpoints.model_dir import save_model_dir

    source, dest = Path(source), Path(dest)
    torch_dtype = _torch_dtype(dtype)
    check_dest_free(dest)
    model, tokenizer, _, meta = load_checkpoint(source, dtype=torch_dtype)
    checkpoint = Path(meta["path"])
    with atomic_dir(dest) as tmp:
        save_model_dir(tmp, model, tokenizer)
    ignored = [p.name for p in checkpoint.iterdir() if p.name == "training_state.pt"]
    notes = [] if tokenizer is not None else [f"{checkpoint} has no tokenizer files; none were copied"]
    return ConvertResult(dest=dest, source=checkpoint, source_kind="checkpoint",
                         dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                         parameters=model.num_parameters_split(), files=_listing(dest), ignored=ignored,
                         notes=notes)


def map_revdeq_pytorch_state_dict(state_dict: dict[str, Any], source: Path) -> dict[str, Any]:
    """Rename the port's tensors to ours; raise `CheckpointError` on any name we cannot map."""
    unknown = sorted(k for k in state_dict if k not in REVDEQ_PYTORCH_NAMES)
    if unknown:
        raise CheckpointError(f"{source}: cannot map tensor(s) {', '.join(unknown)} to a revdeq model "
                              f"(known: the port's single-block DEQ); nothing was written")
    return {REVDEQ_PYTORCH_NAMES[k]: v for k, v in state_dict.items()}


def convert_revdeq_pytorch(source: str | Path, dest: str | Path, dtype: str | None = None,
                           tokenizer: str | None = None) -> ConvertResult:
    """The earlier port's `model.pt` -> a slim model directory, without executing its pickle.

    Every tensor must map onto our model and every parameter of our model must come from the file
    (shapes checked); otherwise `CheckpointError` and nothing is written. `tokenizer` (a spec as for
    `revdeq train --tokenizer`, e.g. a local directory) is saved beside the weights if given, with a pad
    token, and the config's eos_token_id / pad_token_id are set to its: the port's file holds no tokenizer."""
    from revdeq_cli.checkpoints import atomic_dir
    from revdeq_cli.checkpoints.model_dir import save_model_dir
    from revdeq_cli.interop.revdeq_pytorch import legacy_config_to_revdeq, read_revdeq_pytorch
    from revdeq_cli.model import RevDEQConfig, RevDEQForCausalLM

    source, dest = Path(source), Path(dest)
    torch_dtype = _torch_dtype(dtype)
    check_dest_free(dest)
    legacy = read_revdeq_pytorch(source)
    vocab_size = legacy.config["vocab_size"]
    tok = _tokenizer_for(tokenizer, vocab_size) if tokenizer is not None else None
    # The model's special ids are the tokenizer's (end-of-text, and the pad token every tokenizer has).
    special = {} if tok is None else {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    try:
        config = RevDEQConfig(**legacy_config_to_revdeq(legacy.config), **special)
    except UserError as err:
        raise CheckpointError(f"{source}: its config does not make a valid revdeq model ({err})") from None
    mapped = map_revdeq_pytorch_state_dict(legacy.state_dict, source)
    model = RevDEQForCausalLM(config)
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in mapped)
    if missing:
        raise CheckpointError(f"{source}: lacks tensors for {', '.join(missing)} (its config says "
                              f"use_bias={config.bias}); nothing was written")
    for name, tensor in mapped.items():
        if name not in expected:  # e.g. a bias tensor although the config says use_bias=false
            raise CheckpointError(f"{source}: tensor for {name} does not fit a model with this config "
                                  f"(use_bias={config.bias}); nothing was written")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{source}: tensor for {name} has shape {tuple(tensor.shape)}, the config "
                                  f"implies {tuple(expected[name].shape)}; nothing was written")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{source}: tensor for {name} has dtype {tensor.dtype}, expected floating point")
    model.load_state_dict(mapped, strict=True)
    stored = next(iter(mapped.values())).dtype
    model.to(torch_dtype or stored)
    model.config.dtype = torch_dtype or stored
    if tok is not None:  # the window an evaluation harness reads: the model's context
        tok.model_max_length = model.config.max_position_embeddings
    with atomic_dir(dest) as tmp:
        save_model_dir(tmp, model, tok)
    notes = [] if tok is not None else ["the port's file holds no tokenizer: pass --tokenizer to add the one "
                                        "the model was trained with (generate and eval need it)"]
    return ConvertResult(dest=dest, source=source, source_kind="revdeq-pytorch",
                         dtype=str(torch_dtype or stored).removeprefix("torch."),
                         parameters=model.num_parameters_split(), files=_listing(dest),
                         ignored=legacy.ignored, notes=notes)


def _tokenizer_for(spec: str, vocab_size: int) -> Any:
    """`byte`, a local tokenizer directory or a hub id; its ids must fit the model's vocabulary."""
    from revdeq_cli.data.hub import env_offline
    from revdeq_cli.data.tokenizer import byte_tokenizer, load_pretrained_tokenizer

    tok = byte_tokenizer() if spec == "byte" else load_pretrained_tokenizer(spec, local_only=env_offline())
    if len(tok) > vocab_size:
        raise UserError(f"--tokenizer {spec}: has {len(tok)} tokens but the model's vocabulary is {vocab_size}; "
                        "give the tokenizer the model was trained with")
    return tok
