"""The training loop of `revdeq train`: one `Trainer` per process, driven by validated `Settings`.

One optimiser step = `grad_accum` micro-batches of `batch_size` blocks per process (blocks are
`seq_len + 1` tokens; the model reads block[:, :-1] and predicts block[:, 1:]); gradients are averaged over
micro-batches and, under torchrun, over processes by DistributedDataParallel. Then: unscale (fp16), clip the
global grad norm, AdamW step, schedule step.

Exact resume: checkpoints are taken only at optimiser-step boundaries and record the step, epoch,
micro-batch index within the epoch, optimiser / schedule / scaler state and every RNG state at that boundary.
The block order is a pure function of (seed, epoch, rank) (see `data_order`), so a resumed CPU run computes
bit-for-bit the losses the uninterrupted run would have. (On GPUs, nondeterministic kernels can make
runs differ in the last bits, resumed or not.)

Stopping: Ctrl-C, SIGTERM and SIGUSR1 (`STOP_SIGNALS`) finish the step, save it and raise `TrainingStopped`
(`revdeq train` exits 128 + the signal); under torchrun every rank stops at the same step. An observer (see
`Trainer`) may instead end the run early as a finished one, with `request_finish()` (a wall-clock budget). The run
directory is locked while training and never takes a second run's files (`run_dir`).

Mixed precision: `bf16` / `fp16` autocast the model's matrix products (`auto`, the default: bf16 where the device
multiplies bfloat16 natively, else fp32; `resolve_precision`); the solver keeps its iterates in
`solver.state_dtype` (float64 by default) regardless, because the model casts f's input and output.
`fp16` adds a gradient scaler; a step whose gradients overflow is skipped by the scaler, as usual.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from revdeq_cli import checkpoints as ckpt
from revdeq_cli.checkpoints import atomic
from revdeq_cli.checkpoints.layout import default_run_dir, find_resume_checkpoint
from revdeq_cli.checkpoints.verify import CheckpointFiles, open_checkpoint
from revdeq_cli.errors import CheckpointError, ConfigError, UserError
from revdeq_cli.settings import Settings, auto_warmup_steps
from revdeq_cli.training.callbacks import Callback
from revdeq_cli.training.data_order import BlockOrder
from revdeq_cli.training.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
    shutdown_distributed,
)
from revdeq_cli.training.metrics import (
    memory_kind,
    peak_memory_bytes,
    perplexity,
    reset_peak_memory,
    unigram_cross_entropy,
)
from revdeq_cli.training.objective import TrainingObjective
from revdeq_cli.training.optim import LRSchedule, build_optimizer
from revdeq_cli.training.precision import autocast_dtype, emulated_precision_warning, resolve_precision
from revdeq_cli.training.progress import Progress, StepStats, Throughput, format_bytes, format_duration, make_progress
from revdeq_cli.training.remedies import backward_divergence_remedies, divergence_remedies, join_or
from revdeq_cli.training.rng import capture_rng_state, restore_rng_state, seed_everything
from revdeq_cli.training.run_dir import RunLock, claim_run_dir, disk_full_message

STATE_FORMAT = 1


# Signals that stop a run at the next step boundary with a checkpoint (Ctrl-C; SIGTERM: what SLURM, Kubernetes and
# torchrun send before SIGKILL; SIGUSR1: what SLURM can send ahead of the time limit, `--signal=USR1@120`).
STOP_SIGNALS: tuple[int, ...] = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1")
                                      if hasattr(signal, name))


class TrainingStopped(KeyboardInterrupt):
    """The run stopped at a step boundary on a stop signal and saved that step; `revdeq train` exits with
    `exit_code`, 128 + the signal number (130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1), as a process killed by it would."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.name = signal.Signals(self.signum).name
        super().__init__(self.name)

    def __reduce__(self):  # noqa: ANN204
        return (type(self), (self.signum,))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class TrainingDivergedError(UserError):
    """The loss, gradient norm or solver residual became NaN/inf; the message names the step and remedies."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


@dataclass
class TrainSummary:
    """What a finished (or interrupted) run reports. Losses are nats/token; None = not measured."""

    run_dir: Path
    steps: int
    total_steps: int
    tokens_seen: int  # by all processes, this run and the runs it resumed
    seconds: float  # training time of this process (data preparation excluded)
    tokens_per_sec: float  # tokens trained in this process's session / seconds
    peak_memory_bytes: int
    memory_kind: str  # "cuda max allocated" or "process RSS"
    best_val_loss: float | None
    best_val_step: int | None
    final_val_loss: float | None
    test_loss: float | None
    unigram_val_loss: float  # the context-free baseline (see metrics.unigram_cross_entropy)
    final_checkpoint: Path | None
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per step of this session
    data_seconds: float = 0.0

    def lines(self) -> list[str]:
        """Human-readable summary (what `revdeq train` prints at the end)."""
        def ppl(loss: float | None) -> str:
            return "n/a" if loss is None else f"{perplexity(loss):.2f} (loss {loss:.4f})"

        out = [
            f"done: {self.steps}/{self.total_steps} steps, {self.tokens_seen:,} tokens seen; this session "
            f"{format_duration(self.seconds)} training + {format_duration(self.data_seconds)} data, "
            f"{self.tokens_per_sec:,.0f} tokens/s",
            f"peak memory: {format_bytes(self.peak_memory_bytes)} ({self.memory_kind})",
            f"validation perplexity: final {ppl(self.final_val_loss)}, best {ppl(self.best_val_loss)}"
            + (f" at step {self.best_val_step}" if self.best_val_step is not None else ""),
            f"unigram baseline perplexity (validation): {ppl(self.unigram_val_loss)}",
            f"test perplexity: {ppl(self.test_loss)}",
        ]
        if self.final_checkpoint is not None:
            out.append(f"checkpoint: {self.final_checkpoint}")
        return out


# --------------------------------------------------------------------------- the trainer
class Trainer:
    """Trains one model in this process (one rank of `info`) on `device`; `run()` trains and returns the
    summary. `train()` below builds it from the environment (torchrun or a single process)."""

    def __init__(self, settings: Settings, *, info: DistInfo, device: torch.device,
                 progress: Progress | None = None, callbacks: Sequence[Callback] = (),
                 resume: CheckpointFiles | None = None) -> None:
        """`resume`: the checkpoint `settings.train.resume` names, already opened with
        `open_checkpoint(path, resume=True)` (as `revdeq train` does to read its settings); without it the
        trainer finds and opens it itself. Either way it is opened once."""
        self.info, self.device = info, device
        self.callbacks = list(callbacks)  # training/callbacks.py
        tr = settings.train
        if resume is None and tr.resume is not None:
            found = find_resume_checkpoint(tr.resume, tr.out_dir, settings.data.dataset)
            resume = open_checkpoint(found, resume=True) if found is not None else None
        self.resume = resume
        resume_from = resume.path if resume is not None else None
        run_dir = Path(tr.out_dir) if tr.out_dir else (
            resume_from.parent if resume_from is not None else default_run_dir(settings.data.dataset))
        self.run_dir = Path(broadcast_object(str(run_dir), info))
        # Continuing the directory's own run (`--resume auto`, or a checkpoint inside it): its files are this
        # run's. Otherwise a directory holding another run is refused, or cleared with --overwrite (run()).
        self.continuing = tr.resume == "auto" or (
            resume_from is not None and resume_from.resolve().parent == self.run_dir.resolve())
        self.overwrite = tr.overwrite
        if self.overwrite and self.continuing:
            raise ConfigError(f"train.overwrite: --overwrite would delete the run in {self.run_dir} that --resume "
                              "continues; give one of them")
        # The stored settings name the actual run dir, so `--resume auto --out-dir` finds it again; overwrite
        # acts once, when the run starts, so it is not kept.
        # `precision: auto` is stored as what it chose here, so a resume elsewhere continues in the same format.
        self.precision = resolve_precision(tr.precision, device)
        self._precision_was_auto = tr.precision == "auto"  # the header says so
        self.settings = settings.model_copy(update={"train": tr.model_copy(
            update={"out_dir": str(self.run_dir), "overwrite": False, "precision": self.precision})})
        self.resume_from = resume_from
        self.progress = progress or make_progress(settings.log.progress, log_every=settings.log.log_every,
                                                  is_main=info.is_main)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # save_pretrained's shard bar would break the progress display
        self._autocast_dtype = autocast_dtype(self.precision)
        # The run's state, all of it set up here; `_restore` continues it, the loop advances it.
        self.step = 0
        self.epoch = 0
        self.micro_index = 0  # micro-batches of this epoch already consumed (at a step boundary)
        self.tokens_seen = 0
        self._session_start_tokens = 0  # tokens_seen when this session started (after a resume)
        self.best_val_loss: float | None = None
        self.best_val_step: int | None = None
        self.last_saved: tuple[int, Path] | None = None
        self.history: list[dict[str, float]] = []  # one record per optimiser step of this session
        self.final_val_loss: float | None = None
        self.test_loss: float | None = None
        self.final_checkpoint: Path | None = None
        self.tb: Any = None  # TensorBoardLog on rank 0 with log.tensorboard
        self.data_seconds = 0.0
        self._warned_reversal = False
        self._stop_signal: int | None = None  # the first stop signal received (`_graceful_interrupt`)
        self._finish_requested = False  # `request_finish()`: the step being taken is the last
        self._progress: float | None = None  # `set_progress()`: None = step / total_steps
        self._rng_at_boundary: dict[str, Any] | None = None  # RNG states after the last completed step
        self._t0 = time.perf_counter()
        self._peak = 0

    # ------------------------------------------------------------------ setup
    def _log(self, message: str) -> None:
        if self.info.is_main:
            self.progress.log(message)

    def _prepare_data(self) -> None:
        from revdeq_cli.data import pack_blocks, prepare_corpus

        d = self.settings.data
        t0 = time.perf_counter()

        def prepare():
            return prepare_corpus(d.dataset, dataset_config=d.dataset_config, tokenizer=d.tokenizer,
                                  offline=d.offline, cache_dir=d.cache_dir, max_vocab_size=d.max_vocab_size)

        # Rank 0 builds the token cache first; the others then read it instead of racing to build it.
        if self.info.is_main:
            self.corpus = prepare()
        barrier(self.info)
        if not self.info.is_main:
            self.corpus = prepare()
        self.data_seconds = time.perf_counter() - t0
        for split in ("train", "validation", "test"):
            if split not in self.corpus.splits:
                raise ConfigError(f"data.dataset: {d.dataset} has no {split} split")
        self.blocks = pack_blocks(self.corpus.splits["train"], d.seq_len, name=f"{d.dataset} train split")
        self.unigram_val_loss = unigram_cross_entropy(self.corpus.splits["train"], self.corpus.splits["validation"],
                                                      self.corpus.vocab_size)

    def _build_model(self) -> None:
        from revdeq_cli.data.tokenizer import with_context
        from revdeq_cli.model import RevDEQConfig, RevDEQForCausalLM

        s = self.settings
        vocab = s.model.vocab_size or self.corpus.vocab_size
        if vocab < self.corpus.vocab_size:
            raise ConfigError(f"model.vocab_size: {vocab} is smaller than the tokenizer's vocabulary "
                              f"({self.corpus.vocab_size}); remove it or raise it")
        tok = self.corpus.tokenizer
        special = {k: getattr(tok, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        config = RevDEQConfig.from_preset(s.model.preset, vocab_size=vocab, **s.model_config_overrides(),
                                          **{k: v for k, v in special.items() if v is not None})
        self.objective = TrainingObjective(s.objective, config, seed=s.train.seed)
        if config.is_deq and config.inference_max_steps is None:
            config.inference_max_steps = self.objective.training_depth  # the saved model runs the depth it trained at
        seed_everything(s.train.seed)  # same initial weights on every rank and every run with this seed
        self.model = RevDEQForCausalLM(config).to(self.device)
        self.model.train()
        if s.train.compile:  # before DDP wraps it; the block's forward is compiled in place (model/compile.py)
            from revdeq_cli.model.compile import compile_blocks

            compile_blocks(self.model, self.device.type, warn=lambda m: self._log(f"warning: {m}"))
        # Saved beside the model, the tokenizer's model_max_length is the context the model declares.
        self.saved_tokenizer = with_context(tok, config.max_position_embeddings)
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        else:
            self.ddp = None

    def _build_optimisation(self) -> None:
        tr = self.settings.train
        self.optimizer = build_optimizer(self.model, lr=tr.lr, weight_decay=tr.weight_decay,
                                         betas=(tr.adam_beta1, tr.adam_beta2), eps=tr.adam_eps)
        self.order = BlockOrder(len(self.blocks), tr.batch_size, tr.seed, self.info.rank, self.info.world_size)
        self.steps_per_epoch = self.order.batches_per_epoch // tr.grad_accum
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"train.batch_size: {len(self.blocks)} training blocks of {self.settings.data.seq_len} tokens "
                f"cannot fill one step of {tr.batch_size} x {tr.grad_accum} (grad_accum) x "
                f"{self.info.world_size} (processes) blocks; lower train.batch_size, train.grad_accum or data.seq_len"
            )
        self.tokens_per_step = tr.batch_size * tr.grad_accum * self.info.world_size * self.settings.data.seq_len
        limits = [tr.max_steps] if tr.max_steps else []
        if tr.epochs:
            limits.append(max(1, math.ceil(tr.epochs * self.steps_per_epoch)))
        if tr.max_tokens:
            limits.append(max(1, math.ceil(tr.max_tokens / self.tokens_per_step)))
        self.total_steps = min(limits)
        if tr.warmup_steps is None:  # unset: follows the run's length, now known (settings.auto_warmup_steps)
            tr = tr.model_copy(update={"warmup_steps": auto_warmup_steps(self.total_steps)})
            self.settings = self.settings.model_copy(update={"train": tr})
        self.schedule = LRSchedule(self.optimizer, kind=tr.schedule, lr=tr.lr, warmup_steps=tr.warmup_steps,
                                   total_steps=self.total_steps, min_lr_ratio=tr.min_lr_ratio,
                                   plateau_factor=tr.plateau_factor, plateau_patience=tr.plateau_patience)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def _restore(self, files: CheckpointFiles) -> None:
        """Continue the run of `files` (opened with `resume=True`: its training state is complete)."""
        from safetensors.torch import load_model

        path, state = files.path, files.training_state
        try:
            load_model(self.model, str(path / "model.safetensors"), strict=True, device=str(self.device))
        except (RuntimeError, KeyError) as err:
            raise CheckpointError(
                f"{path}: its weights do not fit the model these settings build ({str(err).splitlines()[0][:160]}); "
                "resume with the run's own settings"
            ) from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if state["scaler"] and self.scaler.is_enabled():  # empty unless the run used fp16
            self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        self.step, self.epoch, self.micro_index = int(state["step"]), int(state["epoch"]), int(state["micro_index"])
        self.tokens_seen = int(state["tokens_seen"])
        self.best_val_loss = state.get("best_val_loss")
        self.best_val_step = state.get("best_val_step")
        self.last_saved = (self.step, path) if path.parent == self.run_dir else None
        same = (state.get("world_size") == self.info.world_size and state.get("corpus") == self.corpus.fingerprint)
        if not same:
            self._log("warning: the process count or corpus differs from the checkpoint's run, "
                      "so the data order will not continue exactly")
        self._log(f"resumed from {path} at step {self.step} (epoch {self.epoch})")

    def _training_state(self, rng: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT, "step": self.step, "epoch": self.epoch, "micro_index": self.micro_index,
            "tokens_seen": self.tokens_seen, "total_steps": self.total_steps,
            "best_val_loss": self.best_val_loss, "best_val_step": self.best_val_step,
            "world_size": self.info.world_size, "corpus": self.corpus.fingerprint,
            "settings": self.settings.model_dump(),
            "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": rng,
        }

    # ------------------------------------------------------------------ checkpoints (rank 0)
    def _save(self, name: str, rng: dict[str, Any]) -> Path:
        path = ckpt.save_checkpoint(self.run_dir / name, self.model, self.saved_tokenizer,
                                   self._training_state(rng))
        if name.startswith(ckpt.CHECKPOINT_PREFIX):
            self.last_saved = (self.step, path)
            ckpt.prune_checkpoints(self.run_dir, self.settings.train.keep_last)
        return path

    def _save_step(self, rng: dict[str, Any]) -> Path:
        """checkpoint-NNNNNN for the current step (written once per step)."""
        if self.last_saved is not None and self.last_saved[0] == self.step and self.last_saved[1].exists():
            return self.last_saved[1]
        return self._save(ckpt.checkpoint_name(self.step), rng)

    def _save_best(self, rng: dict[str, Any]) -> None:
        if self.last_saved is not None and self.last_saved[0] == self.step and self.last_saved[1].exists():
            ckpt.link_checkpoint(self.last_saved[1], self.run_dir / "best")
        else:
            self._save("best", rng)

    # ------------------------------------------------------------------ evaluation
    def _autocast(self):
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def evaluate(self, split: str, max_batches: int | None = None) -> float:
        """Mean loss (nats/token) over `split` (every target once; the first `max_batches` batches only if
        given). Batches are shared out over ranks and the sums all-reduced. In float32 whatever the training
        precision: the saved weights as `revdeq eval` and generation run them, so the two agree."""
        from revdeq_cli.training.evaluate import evaluate_split

        result = evaluate_split(
            self.model, self.corpus.splits[split], split_bytes=self.corpus.split_bytes[split],
            seq_len=self.settings.data.seq_len,
            batch_size=self.settings.train.eval_batch_size or self.settings.train.batch_size, split=split,
            device=self.device, max_batches=max_batches, shard=(self.info.rank, self.info.world_size),
        )
        sums = torch.tensor([result.nll, result.tokens], dtype=torch.float64, device=self.device)
        all_reduce_sum(sums, self.info)
        return float(sums[0] / sums[1].clamp(min=1))

    # ------------------------------------------------------------------ one optimiser step
    def _diverged(self, what: str, value: float, *, backward: bool = False) -> TrainingDivergedError:
        if self.last_saved is not None:
            kept = f"the last good checkpoint is {self.last_saved[1]} (step {self.last_saved[0]})"
        else:
            kept = "no checkpoint had been saved yet"
        return TrainingDivergedError(
            f"training diverged at step {self.step + 1}: {what} is {value}; {kept}. Try "
            + join_or(backward_divergence_remedies(self.settings) if backward
                       else divergence_remedies(self.settings, is_deq=self.model.config.is_deq)),
            step=self.step + 1,
        )

    def _train_step(self, indices) -> dict[str, float]:
        from revdeq_cli import deq

        tr = self.settings.train
        net = self.ddp if self.ddp is not None else self.model
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        terms = None
        try:
            for k in range(tr.grad_accum):
                block = self.blocks[indices[k]].to(self.device, non_blocking=True)
                last = k == tr.grad_accum - 1
                # DDP all-reduces gradients on the last micro-batch only.
                with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                    with self._autocast():
                        terms = self.objective(net, block[:, :-1], block[:, 1:], step=self.step,
                                               total_steps=self.total_steps, progress=self._progress)
                    self.scaler.scale(terms.loss / tr.grad_accum).backward()
                loss_sum += terms.cross_entropy.detach().double()  # reported: the cross-entropy alone
        except deq.SolverDivergedError as err:
            if getattr(err, "where", "forward") == "backward":
                raise self._diverged(f"the residual of the implicit gradient's backward solve (step {err.step})",
                                     math.nan, backward=True) from None
            raise self._diverged(f"the forward solver residual (solver step {err.step})", math.nan) from None
        out = terms.output
        residual = float(out.solver_residual) if out.solver_residual is not None else math.nan
        stats = torch.tensor([float(loss_sum) / tr.grad_accum, residual], dtype=torch.float64, device=self.device)
        stats = all_reduce_sum(stats, self.info) / self.info.world_size
        loss, residual = float(stats[0]), float(stats[1])
        if not math.isfinite(loss):
            raise self._diverged("the training loss", loss)
        if self.model.config.is_deq and not math.isfinite(residual):
            raise self._diverged("the forward solver residual", residual)
        self.scaler.unscale_(self.optimizer)
        max_norm = tr.grad_clip if tr.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        if not math.isfinite(grad_norm) and self.precision != "fp16":  # fp16: the scaler skips such steps
            raise self._diverged("the gradient norm", grad_norm)
        lr = self.schedule.lr
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        backward = out.solver_backward
        reconstruction = float(getattr(backward, "reconstruction_error", math.nan))
        self._check_reversal(reconstruction)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "solver_steps": int(out.solver_steps or 0),
                "solver_residual": residual, "backward_nfe": int(getattr(backward, "nfe", 0) or 0),
                "reconstruction_error": reconstruction}

    # Above this max-abs error in rebuilding z0, the reversed iteration has left the forward one and the
    # "exact" gradient is no longer exact (rounding grows ~((1 + beta Lip f) / |1 - beta|) per step).
    RECONSTRUCTION_WARNING = 1e-3

    def _check_reversal(self, error: float) -> None:
        if error > self.RECONSTRUCTION_WARNING and not self._warned_reversal:
            self._warned_reversal = True
            self._log(f"warning: step {self.step + 1}: the reversible backward rebuilt z0 with error {error:.1e}, so "
                      "its gradients are no longer exact; use beta 0.5, float64 solver states or fewer solver steps")

    # ------------------------------------------------------------------ what callbacks may ask
    def request_finish(self) -> None:
        """End the loop after the optimiser step being taken (from `on_step`: the one just taken) as if it were
        the last of `total_steps`: the run then finishes as at its planned end (final validation and test, the
        final checkpoint). Under torchrun a request on any rank ends every rank at the same step."""
        self._finish_requested = True

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next optimiser step, in place of the schedule's (which sets its own again
        after that step): for an observer with a schedule of its own, e.g. one in training time."""
        for group in self.optimizer.param_groups:
            group["lr"] = float(lr)

    def set_progress(self, fraction: float) -> None:
        """How far through the run the next optimiser steps are, in [0, 1], in place of step / total_steps, for
        what follows the run's progress (the penalty ramp, a depth curriculum): for an observer that ends the run
        on a clock of its own (`request_finish`), e.g. a time budget, where the planned steps mean nothing."""
        self._progress = min(max(float(fraction), 0.0), 1.0)

    def _notify(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _last_step(self) -> bool:
        """Whether the step just taken ends the loop: the run's length, or a finish request on any rank."""
        if self.step >= self.total_steps:
            return True
        requested = self._finish_requested
        # Only callbacks ask to finish; without any, `revdeq train` under torchrun pays no collective per step.
        # (Every rank is given the same callbacks, so every rank takes part in the reduction or none does.)
        if self.info.world_size > 1 and self.callbacks:
            flag = torch.tensor([1.0 if requested else 0.0], dtype=torch.float64, device=self.device)
            requested = float(all_reduce_sum(flag, self.info)[0]) > 0
        return requested

    # ------------------------------------------------------------------ the loop
    def _header(self) -> None:
        s, c = self.settings, self.corpus
        counts = self.model.num_parameters_split()
        tr = s.train
        self._log(f"run: {self.run_dir}")
        self._log(f"data: {c.source}; tokens train {len(c.splits['train']):,} / validation "
                  f"{len(c.splits['validation']):,} / test {len(c.splits['test']):,}; vocab {c.vocab_size} "
                  f"({s.data.tokenizer}); prepared in {format_duration(self.data_seconds)}")
        if self.model.config.is_deq:
            body = (f"solver {s.solver.solver} / adjoint {s.solver.adjoint}, beta {s.solver.beta}, max "
                    f"{s.solver.max_steps} steps, tol {s.solver.tol}, states {s.solver.state_dtype}, start "
                    f"{'z0 = x' if self.model.config.init_state == 'input' else 'z0 = 0'}")
        else:
            body = f"explicit, {self.model.config.num_hidden_layers} layer(s)"
        self._log(f"model: preset {s.model.preset}, {counts['total']:,} parameters "
                  f"({counts['non_embedding']:,} non-embedding); {body}")
        self._log(self._context_line())
        self._log(f"train: {self.total_steps} steps ({self.steps_per_epoch} per epoch), batch {tr.batch_size} x "
                  f"accum {tr.grad_accum} x {self.info.world_size} process(es) x {s.data.seq_len} tokens = "
                  f"{self.tokens_per_step:,} tokens/step; lr {tr.lr:g} ({tr.schedule}, warmup {tr.warmup_steps}); "
                  f"device {self.device}, {self.precision}{' (auto)' if self._precision_was_auto else ''}")
        if (warning := emulated_precision_warning(self.precision, self.device)) is not None:
            self._log(warning)
        self._log(f"unigram baseline: validation perplexity {perplexity(self.unigram_val_loss):.2f}")

    def _context_line(self) -> str:
        """The header's word on the context the saved model declares (its max_position_embeddings): the
        trained sequence length, or a warning when an explicitly given context is longer than it."""
        seq_len, context = self.settings.data.seq_len, self.model.config.max_position_embeddings
        if seq_len >= context:
            return f"context: the saved model declares {context} positions, the sequence length it trains on"
        return (f"warning: the saved model declares {context} positions (model.max_position_embeddings) but trains "
                f"on {seq_len}-token sequences, so positions {seq_len}..{context - 1} get no training; leave "
                f"model.max_position_embeddings unset to declare {seq_len}, or raise data.seq_len to {context}")

    def run(self) -> TrainSummary:
        """Train to the end (or until a stop signal / divergence). Rank 0 holds the run directory's lock for the
        whole run (released however it ends), refuses a directory that holds another run (clears it with
        --overwrite) and writes config.yaml, logs and checkpoints. A full disk there is one `DiskFullError`."""
        lock = None
        try:
            self._prepare_data()  # everything that can refuse the inputs runs before anything is written
            self._build_model()
            self._build_optimisation()  # resolves the settings that follow the run's length (warmup)
            lock = self._claim_run_dir()
            return self._run()
        except Exception as err:
            if self._fills_run_dir(err):
                raise self._disk_full(err) from None
            raise
        finally:
            if lock is not None:
                lock.release()

    def _claim_run_dir(self) -> RunLock | None:
        """Rank 0 locks and claims the run directory (run_dir.py); if that fails every rank raises its error."""
        lock, removed, error = None, "", None
        if self.info.is_main:
            try:
                lock = RunLock(self.run_dir).acquire()
                removed = claim_run_dir(self.run_dir, continuing=self.continuing, overwrite=self.overwrite)
            except Exception as err:  # noqa: BLE001  (every rank raises it below)
                if lock is not None:
                    lock.release()
                error = err
        error = broadcast_object(error, self.info)
        if error is not None:
            raise error
        if lock is not None and lock.took_over is not None:
            self._log(f"note: {self.run_dir}: took over the lock of {lock.took_over.describe()}, no longer running")
        if removed:
            self._log(f"overwrite: deleted the earlier run in {self.run_dir} ({removed})")
        return lock

    def _fills_run_dir(self, err: Exception) -> bool:
        """Whether `err` is a write into the run directory that found the disk full."""
        if isinstance(err, ckpt.DiskFullError) and err.directory is not None:
            return Path(err.directory).resolve().is_relative_to(self.run_dir.resolve())
        if not atomic.is_disk_full(err):
            return False
        name = getattr(err, "filename", None)
        if name:
            return Path(name).resolve().is_relative_to(self.run_dir.resolve())
        return 0 <= atomic.free_bytes(self.run_dir) < atomic.LOW_SPACE_BYTES

    def _disk_full(self, err: Exception) -> ckpt.DiskFullError:
        tr = self.settings.train
        what = getattr(err, "what", None)
        return ckpt.DiskFullError(disk_full_message(self.run_dir, writing=what, save_every=tr.save_every,
                                                    keep_last=tr.keep_last), directory=self.run_dir, what=what)

    def _run(self) -> TrainSummary:
        if self.info.is_main:
            ckpt.remove_stale_temp_dirs(self.run_dir)
        s = self.settings
        if self.info.is_main:
            ckpt.atomic_write_text(self.run_dir / "config.yaml", s.to_yaml())
        if self.resume is not None:
            self._restore(self.resume)
            newest = ckpt.list_checkpoints(self.run_dir)[-1:] if self.info.is_main else []
            if newest and newest[0][1].resolve() == self.resume_from.resolve():
                ckpt.prune_checkpoints(self.run_dir, s.train.keep_last)  # a lowered keep_last frees space first
        if self.info.is_main and s.log.tensorboard:
            from revdeq_cli.training.tensorboard_log import TensorBoardLog

            self.tb = TensorBoardLog(self.run_dir / "logs")
        self._header()
        self._session_start_tokens = self.tokens_seen
        self._t0 = time.perf_counter()
        try:
            with self._graceful_interrupt():
                self._loop()
                self._check_stop()  # asked during the last step: save it; --resume auto then does the rest
                self._finish()
        except KeyboardInterrupt as stop:
            self._interrupted(stop)
            raise
        finally:
            self.progress.close()
            if self.tb is not None:
                self.tb.close()
        return self.summary()

    @contextlib.contextmanager
    def _graceful_interrupt(self):  # noqa: ANN202
        """The first of Ctrl-C, SIGTERM or SIGUSR1 (`STOP_SIGNALS`: what schedulers send before they kill a job)
        asks the loop to stop at the next step boundary, so the checkpoint it saves is a consistent state and no
        library is interrupted half-way (e.g. TensorBoard's writer queue). A second Ctrl-C interrupts at once; a
        second SIGTERM / SIGUSR1 changes nothing (a scheduler and torchrun may both deliver one)."""
        self._stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:
                if signum == signal.SIGINT:
                    raise TrainingStopped(signum)
                return
            self._stop_signal = signum
            if self.info.is_main:  # a failed write (re-entered stdout) must not turn into an exception here
                with contextlib.suppress(RuntimeError, OSError):
                    self.progress.log(f"{signal.Signals(signum).name}: stopping after this step and saving a "
                                      "checkpoint" + (" (Ctrl-C again to stop now)" if signum == signal.SIGINT else ""))

        previous = {s: signal.signal(s, request_stop) for s in STOP_SIGNALS}
        for s in STOP_SIGNALS:  # restart the system calls it lands in (e.g. in gloo's threads), do not fail them
            if hasattr(signal, "siginterrupt"):
                signal.siginterrupt(s, False)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def _check_stop(self) -> None:
        """Raise `TrainingStopped` at a step boundary if any process got a stop signal. All ranks agree (on the
        step and on the signal: the first of `STOP_SIGNALS` any rank got), so no rank is left waiting in a
        collective and rank 0 saves the one checkpoint."""
        got = self._stop_signal
        flags = torch.tensor([1.0 if got == s else 0.0 for s in STOP_SIGNALS], dtype=torch.float64,
                             device=self.device)
        if self.info.world_size > 1:
            flags = all_reduce_sum(flags, self.info)
        signalled = [s for s, count in zip(STOP_SIGNALS, flags.tolist(), strict=True) if count > 0]
        if signalled:
            raise TrainingStopped(signalled[0])

    def _loop(self) -> None:
        tr = self.settings.train
        self.progress.start(self.total_steps, self.step)
        self._notify("on_start")
        throughput = Throughput()
        throughput.mark(self.tokens_seen)
        epoch_indices = self.order.epoch_indices(self.epoch)
        self._rng_at_boundary = capture_rng_state()
        last = self.step >= self.total_steps
        while not last:
            self._check_stop()
            if self.micro_index + tr.grad_accum > self.steps_per_epoch * tr.grad_accum:
                self.epoch, self.micro_index = self.epoch + 1, 0
                epoch_indices = self.order.epoch_indices(self.epoch)
            reset_peak_memory(self.device)
            figures = self._train_step(epoch_indices[self.micro_index : self.micro_index + tr.grad_accum])
            self.step += 1
            self.micro_index += tr.grad_accum
            self.tokens_seen += self.tokens_per_step
            self._rng_at_boundary = capture_rng_state()
            memory = peak_memory_bytes(self.device)
            self._peak = max(self._peak, memory)
            throughput.mark(self.tokens_seen)
            remaining = (self.total_steps - self.step) * throughput.seconds_per_step()
            stats = StepStats(step=self.step, total_steps=self.total_steps, tokens_per_sec=throughput.tokens_per_sec(),
                              memory_bytes=memory, tokens_seen=self.tokens_seen,
                              elapsed=time.perf_counter() - self._t0, eta=remaining, **figures)
            self.history.append({"step": self.step, **figures})
            self._notify("on_step", self.history[-1])
            last = self._last_step()
            if self.info.is_main:
                self.progress.update(stats)
                log_now = self.step % self.settings.log.log_every == 0 or self.step == 1 or last
                if self.tb is not None and log_now:
                    self.tb.train_step(stats)
            side_start = time.perf_counter()
            if tr.eval_every and self.step % tr.eval_every == 0 and not last:
                self._validate(tr.eval_batches)
            if tr.save_every and self.step % tr.save_every == 0 and not last and self.info.is_main:
                self._save_step(self._rng_at_boundary)
                if self.best_val_step == self.step:
                    self._save_best(self._rng_at_boundary)
            throughput.exclude(time.perf_counter() - side_start)

    def _validate(self, max_batches: int | None, *, save_best: bool = True) -> float:
        loss = self.evaluate("validation", max_batches)
        self._notify("on_evaluation", "validation" if max_batches is None else "validation-prefix", loss)
        improved = self.best_val_loss is None or loss < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_val_step = loss, self.step
        self.schedule.observe(loss)
        if self.info.is_main:
            self._log(f"step {self.step}: validation loss {loss:.4f} | ppl {perplexity(loss):.2f}"
                      + (" (best)" if improved else ""))
            if self.tb is not None:
                self.tb.evaluation("validation", self.step, loss, perplexity(loss))
            save_now = self.settings.train.save_every and self.step % self.settings.train.save_every == 0
            if improved and save_best and not save_now:  # on save steps best/ links the step checkpoint
                self._save_best(self._rng_at_boundary)
        return loss

    def _finish(self) -> None:
        self.final_val_loss = self._validate(None, save_best=False)
        self.test_loss = self.evaluate("test")
        if self.info.is_main:
            self._log(f"test loss {self.test_loss:.4f} | ppl {perplexity(self.test_loss):.2f}")
            if self.tb is not None:
                self.tb.evaluation("test", self.step, self.test_loss, perplexity(self.test_loss))
            step_dir = self._save_step(self._rng_at_boundary)
            if self.best_val_step == self.step:
                self._save_best(self._rng_at_boundary)
            self.final_checkpoint = ckpt.link_checkpoint(step_dir, self.run_dir / "final")
            if self.tb is not None:
                flat = {f"{sec}.{k}": v for sec, vals in self.settings.model_dump().items() for k, v in vals.items()}
                self.tb.hparams(flat, {"best_val_ppl": perplexity(self.best_val_loss or math.inf),
                                       "final_val_ppl": perplexity(self.final_val_loss)})
        barrier(self.info)

    def _interrupted(self, stop: KeyboardInterrupt) -> None:
        """Rank 0 saves the step the run stopped at (unless it is saved already) and says how to continue."""
        if not self.info.is_main or self._rng_at_boundary is None:
            return
        why = f"on {stop.name}" if isinstance(stop, TrainingStopped) else "on Ctrl-C"
        go_on = f"continue with --resume auto --out-dir {self.run_dir}"
        if self.step > 0 and (self.last_saved is None or self.last_saved[0] != self.step):
            path = self._save(ckpt.checkpoint_name(self.step), self._rng_at_boundary)
            self.progress.log(f"interrupted: saved {path} (step {self.step}, {why}); {go_on}")
        elif self.step > 0:
            self.progress.log(f"interrupted {why}: step {self.step} is saved in {self.last_saved[1]}; {go_on}")
        else:
            self.progress.log(f"interrupted {why} before the first step: nothing to save")

    def summary(self) -> TrainSummary:
        seconds = time.perf_counter() - self._t0
        return TrainSummary(
            run_dir=self.run_dir, steps=self.step, total_steps=self.total_steps, tokens_seen=self.tokens_seen,
            seconds=seconds, tokens_per_sec=(self.tokens_seen - self._session_start_tokens) / max(seconds, 1e-9),
            peak_memory_bytes=self._peak, memory_kind=memory_kind(self.device),
            best_val_loss=self.best_val_loss, best_val_step=self.best_val_step,
            final_val_loss=self.final_val_loss, test_loss=self.test_loss, unigram_val_loss=self.unigram_val_loss,
            final_checkpoint=self.final_checkpoint, history=self.history,
            data_seconds=self.data_seconds,
        )


def train(settings: Settings, *, progress: Progress | None = None, callbacks: Sequence[Callback] = (),
          resume: CheckpointFiles | None = None) -> TrainSummary:
    """Run `revdeq train` with resolved `settings` in this process (joins the torchrun group if launched by
    torchrun). Prints progress and the summary on rank 0; returns the summary on every rank."""
    info, device = init_distributed(settings.train.device)
    try:
        trainer = Trainer(settings, info=info, device=device, progress=progress, callbacks=callbacks, resume=resume)
        summary = trainer.run()
        if info.is_main:
            for line in summary.lines():
                trainer.progress.log(line)
        return summary
    finally:
        shutdown_distributed()
