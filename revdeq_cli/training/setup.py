"""Setting a run up, before anything is written: the data, the model with its training objective, the plan of
the run (its length, data order and warm-up) and the optimiser. Every check that needs the data runs here, so a
run refused for its inputs leaves the disk as it was (docs/DESIGN.md §8)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from revdeq_cli.errors import ConfigError
from revdeq_cli.settings import Settings, auto_warmup_steps
from revdeq_cli.training.data_order import BlockOrder
from revdeq_cli.training.distributed import DistInfo, barrier
from revdeq_cli.training.metrics import unigram_cross_entropy
from revdeq_cli.training.objective import TrainingObjective
from revdeq_cli.training.optim import LRSchedule, build_optimizer
from revdeq_cli.training.rng import seed_everything


@dataclass
class RunData:
    """The prepared corpus, its training split packed into blocks [N, seq_len + 1], the context-free baseline
    (nats/token on validation) and the seconds preparing took."""

    corpus: Any
    blocks: torch.Tensor
    unigram_val_loss: float
    seconds: float


def prepare_data(settings: Settings, info: DistInfo) -> RunData:
    """Prepare the dataset (rank 0 builds the token cache first; the others then read it instead of racing to
    build it) and check it has the three splits."""
    from revdeq_cli.data import pack_blocks, prepare_corpus

    d = settings.data
    t0 = time.perf_counter()

    def prepare():
        return prepare_corpus(d.dataset, dataset_config=d.dataset_config, tokenizer=d.tokenizer,
                              offline=d.offline, cache_dir=d.cache_dir, max_vocab_size=d.max_vocab_size)

    corpus = prepare() if info.is_main else None
    barrier(info)
    if not info.is_main:
        corpus = prepare()
    seconds = time.perf_counter() - t0
    for split in ("train", "validation", "test"):
        if split not in corpus.splits:
            raise ConfigError(f"data.dataset: {d.dataset} has no {split} split")
    blocks = pack_blocks(corpus.splits["train"], d.seq_len, name=f"{d.dataset} train split")
    unigram = unigram_cross_entropy(corpus.splits["train"], corpus.splits["validation"], corpus.vocab_size)
    return RunData(corpus=corpus, blocks=blocks, unigram_val_loss=unigram, seconds=seconds)


@dataclass
class RunModel:
    """The model (on the device, in training mode), its DDP wrapper (None in one process), the training objective
    and the tokenizer saved beside it (declaring the model's context)."""

    model: Any
    ddp: Any
    objective: TrainingObjective
    tokenizer: Any


def build_model(settings: Settings, corpus: Any, device: torch.device, info: DistInfo,
                warn: Callable[[str], None]) -> RunModel:
    """The model the settings describe at the corpus's vocabulary, initialised from `train.seed` (the same weights
    on every rank), and its objective. A DEQ's saved config runs the depth it trained at: `inference_max_steps`,
    unless given, is the objective's training depth."""
    from revdeq_cli.data.tokenizer import with_context
    from revdeq_cli.model import RevDEQConfig, RevDEQForCausalLM

    s = settings
    vocab = s.model.vocab_size or corpus.vocab_size
    if vocab < corpus.vocab_size:
        raise ConfigError(f"model.vocab_size: {vocab} is smaller than the tokenizer's vocabulary "
                          f"({corpus.vocab_size}); remove it or raise it")
    tok = corpus.tokenizer
    special = {k: getattr(tok, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = RevDEQConfig.from_preset(s.model.preset, vocab_size=vocab, **s.model_config_overrides(),
                                      **{k: v for k, v in special.items() if v is not None})
    objective = TrainingObjective(s.objective, config, seed=s.train.seed)
    if config.is_deq and config.inference_max_steps is None:
        config.inference_max_steps = objective.training_depth
    seed_everything(s.train.seed)
    model = RevDEQForCausalLM(config).to(device)
    model.train()
    if s.train.compile:  # before DDP wraps it; the block's forward is compiled in place (model/compile.py)
        from revdeq_cli.model.compile import compile_blocks

        compile_blocks(model, device.type, warn=warn)
    ddp = None
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return RunModel(model=model, ddp=ddp, objective=objective,
                    tokenizer=with_context(tok, config.max_position_embeddings))


@dataclass
class RunPlan:
    """The run's length and data order: `total_steps` optimiser steps of `tokens_per_step` tokens,
    `steps_per_epoch` of them per pass over the blocks in `order`; `settings` with the warm-up resolved."""

    order: BlockOrder
    steps_per_epoch: int
    tokens_per_step: int
    total_steps: int
    settings: Settings


def plan_run(settings: Settings, n_blocks: int, info: DistInfo) -> RunPlan:
    """The step that ends the run (the first of max_steps, epochs, max_tokens) and a warm-up that follows it."""
    tr = settings.train
    order = BlockOrder(n_blocks, tr.batch_size, tr.seed, info.rank, info.world_size)
    steps_per_epoch = order.batches_per_epoch // tr.grad_accum
    if steps_per_epoch < 1:
        raise ConfigError(
            f"train.batch_size: {n_blocks} training blocks of {settings.data.seq_len} tokens cannot fill one step "
            f"of {tr.batch_size} x {tr.grad_accum} (grad_accum) x {info.world_size} (processes) blocks; lower "
            "train.batch_size, train.grad_accum or data.seq_len"
        )
    tokens_per_step = tr.batch_size * tr.grad_accum * info.world_size * settings.data.seq_len
    limits = [tr.max_steps] if tr.max_steps else []
    if tr.epochs:
        limits.append(max(1, math.ceil(tr.epochs * steps_per_epoch)))
    if tr.max_tokens:
        limits.append(max(1, math.ceil(tr.max_tokens / tokens_per_step)))
    total_steps = min(limits)
    if tr.warmup_steps is None:  # unset: follows the run's length, now known (settings.auto_warmup_steps)
        settings = settings.model_copy(update={"train": tr.model_copy(
            update={"warmup_steps": auto_warmup_steps(total_steps)})})
    return RunPlan(order=order, steps_per_epoch=steps_per_epoch, tokens_per_step=tokens_per_step,
                   total_steps=total_steps, settings=settings)


def build_optimisation(model: Any, settings: Settings, total_steps: int, precision: str,
                       device: torch.device) -> tuple[torch.optim.Optimizer, LRSchedule, torch.amp.GradScaler]:
    """AdamW, the learning-rate schedule over `total_steps`, and the gradient scaler (enabled for fp16 only)."""
    tr = settings.train
    optimizer = build_optimizer(model, lr=tr.lr, weight_decay=tr.weight_decay, betas=(tr.adam_beta1, tr.adam_beta2),
                                eps=tr.adam_eps)
    schedule = LRSchedule(optimizer, kind=tr.schedule, lr=tr.lr, warmup_steps=tr.warmup_steps,
                          total_steps=total_steps, min_lr_ratio=tr.min_lr_ratio, plateau_factor=tr.plateau_factor,
                          plateau_patience=tr.plateau_patience)
    return optimizer, schedule, torch.amp.GradScaler(device.type, enabled=precision == "fp16")
