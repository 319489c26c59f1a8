"""The training loop of `revdeq train`: one `Trainer` per process, driven by validated `Settings`.

    Trainer(settings, info=DistInfo(), device=torch.device("cpu"), callbacks=[...]).run()   # -> TrainSummary

One optimiser step (`_train_step`) = `grad_accum` micro-batches of `batch_size` blocks per process (blocks are
`seq_len + 1` tokens; the model reads block[:, :-1] and predicts block[:, 1:]); each micro-batch's loss is the
training objective's (training/objective.py); gradients are averaged over micro-batches and, under torchrun, over
processes by DistributedDataParallel. Then: unscale (fp16), clip the global grad norm, AdamW step, schedule step.
The loop (`_fit`) takes steps until the run's length, a stop signal or a callback's `request_finish()`, with
validation and checkpoints at their cadence.

The other jobs have modules of their own: setting up (setup.py: data, model and objective, the run's plan,
optimiser), the run directory (run_dir.py: lock, a used directory, a full disk), stop signals (signals.py),
checkpoints and resume (checkpointing.py: a resumed CPU run computes bit for bit the losses the uninterrupted run
would have; the block order is a pure function of (seed, epoch, rank), data_order.py), the header and summary
(report.py), precision (precision.py: `auto` is bf16 where the device multiplies it natively; evaluation runs in
float32) and callbacks (callbacks.py).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from revdeq_cli import checkpoints as ckpt
from revdeq_cli.checkpoints.layout import default_run_dir, find_resume_checkpoint
from revdeq_cli.checkpoints.verify import CheckpointFiles, open_checkpoint
from revdeq_cli.data import num_eval_batches
from revdeq_cli.errors import ConfigError
from revdeq_cli.settings import Settings
from revdeq_cli.training import checkpointing, run_dir, setup
from revdeq_cli.training.callbacks import Callback
from revdeq_cli.training.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
    shutdown_distributed,
)
from revdeq_cli.training.metrics import memory_kind, peak_memory_bytes, perplexity, reset_peak_memory
from revdeq_cli.training.precision import autocast_dtype, resolve_precision
from revdeq_cli.training.progress import Progress, StepStats, Throughput, make_progress
from revdeq_cli.training.remedies import TrainingDivergedError, diverged_error
from revdeq_cli.training.report import TrainSummary, header_lines
from revdeq_cli.training.rng import capture_rng_state
from revdeq_cli.training.signals import STOP_SIGNALS, StopSignals, TrainingStopped

__all__ = ["STOP_SIGNALS", "Trainer", "TrainSummary", "TrainingDivergedError", "TrainingStopped", "train"]

# Above this max-abs error in rebuilding z0, the reversed iteration has left the forward one and the "exact"
# gradient is no longer exact (rounding grows ~((1 + beta Lip f) / |1 - beta|) per step).
RECONSTRUCTION_WARNING = 1e-3


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
        self.callbacks = list(callbacks)
        tr = settings.train
        if resume is None and tr.resume is not None:
            found = find_resume_checkpoint(tr.resume, tr.out_dir, settings.data.dataset)
            resume = open_checkpoint(found, resume=True) if found is not None else None
        self.resume = resume
        resume_from = resume.path if resume is not None else None
        chosen = Path(tr.out_dir) if tr.out_dir else (
            resume_from.parent if resume_from is not None else default_run_dir(settings.data.dataset))
        self.run_dir = Path(broadcast_object(str(chosen), info))
        # Continuing the directory's own run (`--resume auto`, or a checkpoint inside it): its files are this
        # run's. Otherwise a directory holding another run is refused, or cleared with --overwrite (run_dir.py).
        self.continuing = tr.resume == "auto" or (
            resume_from is not None and resume_from.resolve().parent == self.run_dir.resolve())
        if tr.overwrite and self.continuing:
            raise ConfigError(f"train.overwrite: --overwrite would delete the run in {self.run_dir} that --resume "
                              "continues; give one of them")
        self.overwrite = tr.overwrite
        # The stored settings name the actual run dir (so `--resume auto --out-dir` finds it again) and the format
        # `auto` chose here (so a resume elsewhere continues in it); overwrite acts once, when the run starts.
        self.precision = resolve_precision(tr.precision, device)
        self.precision_was_auto = tr.precision == "auto"
        self.settings = settings.model_copy(update={"train": tr.model_copy(
            update={"out_dir": str(self.run_dir), "overwrite": False, "precision": self.precision})})
        self.resume_from = resume_from
        self.progress = progress or make_progress(settings.log.progress, log_every=settings.log.log_every,
                                                  is_main=info.is_main)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # save_pretrained's shard bar would break the progress display
        self._autocast_dtype = autocast_dtype(self.precision)
        # The run's state: set up here, continued by a resume (checkpointing.restore), advanced by the loop.
        self.step = self.epoch = self.micro_index = self.tokens_seen = 0  # micro_index: this epoch's micro-batches
        self._session_start_tokens = 0  # tokens_seen when this session started (after a resume)
        self.best_val_loss, self.best_val_step = None, None
        self.history: list[dict[str, float]] = []  # one record per optimiser step of this session
        self.final_val_loss = self.test_loss = None
        self.final_checkpoint: Path | None = None
        self.checkpoints: checkpointing.RunCheckpoints | None = None
        self.tb: Any = None  # TensorBoardLog on rank 0 with log.tensorboard
        self.data_seconds = 0.0
        self._warned_reversal = False
        self._stops = StopSignals(log=self.progress.log if info.is_main else None)
        self._finish_requested = False  # `request_finish()`: the step being taken is the last
        self._progress: float | None = None  # `set_progress()`: None = step / total_steps
        self._rng_at_boundary: dict[str, Any] | None = None  # RNG states after the last completed step
        self._t0 = time.perf_counter()
        self._peak = 0

    def log(self, message: str) -> None:
        """A line for the user, on rank 0."""
        if self.info.is_main:
            self.progress.log(message)

    # ------------------------------------------------------------------ the run
    def run(self) -> TrainSummary:
        """Train to the end (or until a stop signal / divergence). Everything that can refuse the inputs runs
        first (setup.py), then rank 0 locks and claims the run directory for the whole run (released however it
        ends) and writes config.yaml, logs and checkpoints. A full disk there is one `DiskFullError`."""
        lock = None
        try:
            self._set_up()
            lock = run_dir.claim(self.run_dir, self.info, continuing=self.continuing, overwrite=self.overwrite,
                                 log=self.log)
            return self._run()
        except Exception as err:
            if run_dir.fills_run_dir(self.run_dir, err):
                tr = self.settings.train
                raise run_dir.disk_full_error(self.run_dir, err, save_every=tr.save_every,
                                              keep_last=tr.keep_last) from None
            raise
        finally:
            if lock is not None:
                lock.release()

    def _set_up(self) -> None:
        data = setup.prepare_data(self.settings, self.info)
        self.corpus, self.blocks = data.corpus, data.blocks
        self.unigram_val_loss, self.data_seconds = data.unigram_val_loss, data.seconds
        built = setup.build_model(self.settings, self.corpus, self.device, self.info,
                                  warn=lambda m: self.log(f"warning: {m}"))
        self.model, self.ddp, self.objective, self.saved_tokenizer = built.model, built.ddp, built.objective, \
            built.tokenizer
        plan = setup.plan_run(self.settings, len(self.blocks), self.info)
        self.order, self.steps_per_epoch, self.tokens_per_step = plan.order, plan.steps_per_epoch, plan.tokens_per_step
        self.total_steps, self.settings = plan.total_steps, plan.settings
        self.optimizer, self.schedule, self.scaler = setup.build_optimisation(
            self.model, self.settings, self.total_steps, self.precision, self.device)
        self.checkpoints = checkpointing.RunCheckpoints(self.run_dir, self.model, self.saved_tokenizer,
                                                        self.settings.train.keep_last)

    def _run(self) -> TrainSummary:
        s = self.settings
        if self.info.is_main:
            ckpt.remove_stale_temp_dirs(self.run_dir)
            ckpt.atomic_write_text(self.run_dir / "config.yaml", s.to_yaml())
        if self.resume is not None:
            checkpointing.restore(self, self.resume)
            newest = ckpt.list_checkpoints(self.run_dir)[-1:] if self.info.is_main else []
            if newest and newest[0][1].resolve() == self.resume_from.resolve():
                ckpt.prune_checkpoints(self.run_dir, s.train.keep_last)  # a lowered keep_last frees space first
        if self.info.is_main and s.log.tensorboard:
            from revdeq_cli.training.tensorboard_log import TensorBoardLog

            self.tb = TensorBoardLog(self.run_dir / "logs")
        for line in header_lines(self):
            self.log(line)
        self._session_start_tokens = self.tokens_seen
        self._t0 = time.perf_counter()
        try:
            with self._stops.installed():
                self._fit()
                self._stops.check(self.info, self.device)  # asked in the last step: save it; a resume does the rest
                self._finish()
        except KeyboardInterrupt as stop:
            self._interrupted(stop)
            raise
        finally:
            self.progress.close()
            if self.tb is not None:
                self.tb.close()
        return self.summary()

    def _fit(self) -> None:
        """Optimiser steps until the run's length (or a finish request), with validation and checkpoints."""
        tr = self.settings.train
        self.progress.start(self.total_steps, self.step)
        self._notify("on_start")
        throughput = Throughput()
        throughput.mark(self.tokens_seen)
        epoch_indices = self.order.epoch_indices(self.epoch)
        self._rng_at_boundary = capture_rng_state()
        last = self.step >= self.total_steps
        while not last:
            self._stops.check(self.info, self.device)
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
            stats = StepStats(step=self.step, total_steps=self.total_steps, tokens_per_sec=throughput.tokens_per_sec(),
                              memory_bytes=memory, tokens_seen=self.tokens_seen,
                              elapsed=time.perf_counter() - self._t0,
                              eta=(self.total_steps - self.step) * throughput.seconds_per_step(), **figures)
            self.history.append({"step": self.step, **figures})
            self._notify("on_step", self.history[-1])
            last = self._last_step()
            if self.info.is_main:
                self.progress.update(stats)
                if self.tb is not None and (self.step % self.settings.log.log_every == 0 or self.step == 1 or last):
                    self.tb.train_step(stats)
            side_start = time.perf_counter()
            if tr.eval_every and self.step % tr.eval_every == 0 and not last:
                self._validate(tr.eval_batches)
            if tr.save_every and self.step % tr.save_every == 0 and not last and self.info.is_main:
                self.checkpoints.save_step(self.step, self._state)
                if self.best_val_step == self.step:
                    self.checkpoints.save_best(self.step, self._state)
            throughput.exclude(time.perf_counter() - side_start)

    def _train_step(self, indices) -> dict[str, float]:
        """One optimiser step on the blocks `indices` (grad_accum micro-batches); returns the step's figures."""
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
        loss, residual = (float(v) for v in all_reduce_sum(stats, self.info) / self.info.world_size)
        if not math.isfinite(loss):
            raise self._diverged("the training loss", loss)
        if self.model.config.is_deq and not math.isfinite(residual):
            raise self._diverged("the forward solver residual", residual)
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                         tr.grad_clip if tr.grad_clip > 0 else math.inf))
        if not math.isfinite(grad_norm) and self.precision != "fp16":  # fp16: the scaler skips such steps
            raise self._diverged("the gradient norm", grad_norm)
        lr = self.schedule.lr
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        backward = out.solver_backward
        reconstruction = float(getattr(backward, "reconstruction_error", math.nan))
        if reconstruction > RECONSTRUCTION_WARNING and not self._warned_reversal:
            self._warned_reversal = True
            self.log(f"warning: step {self.step + 1}: the reversible backward rebuilt z0 with error "
                     f"{reconstruction:.1e}, so its gradients are no longer exact; use beta 0.5, float64 solver "
                     "states or fewer solver steps")
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "solver_steps": int(out.solver_steps or 0),
                "solver_residual": residual, "backward_nfe": int(getattr(backward, "nfe", 0) or 0),
                "reconstruction_error": reconstruction}

    def _autocast(self):
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def _diverged(self, what: str, value: float, *, backward: bool = False) -> TrainingDivergedError:
        saved = self.checkpoints.last_saved if self.checkpoints is not None else None
        return diverged_error(self.settings, self.step + 1, what, value, saved=saved,
                              is_deq=self.model.config.is_deq, backward=backward)

    def _state(self) -> dict[str, Any]:
        """The training state at the last completed step (checkpointing.training_state)."""
        return checkpointing.training_state(self, self._rng_at_boundary)

    # ------------------------------------------------------------------ evaluation
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

    def _prefix(self, max_batches: int | None) -> int | None:
        """`max_batches` if it is fewer batches than the validation split has, else None (the whole split)."""
        tr, seq_len = self.settings.train, self.settings.data.seq_len
        n = num_eval_batches(self.corpus.splits["validation"], seq_len, tr.eval_batch_size or tr.batch_size)
        return max_batches if max_batches is not None and max_batches < n else None

    def _validate(self, max_batches: int | None, *, save_best: bool = True) -> float:
        max_batches = self._prefix(max_batches)
        loss = self.evaluate("validation", max_batches)
        self._notify("on_evaluation", "validation" if max_batches is None else "validation-prefix", loss)
        improved = self.best_val_loss is None or loss < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_val_step = loss, self.step
        self.schedule.observe(loss)
        if self.info.is_main:
            self.log(f"step {self.step}: validation loss {loss:.4f} | ppl {perplexity(loss):.2f}"
                     + (" (best)" if improved else ""))
            if self.tb is not None:
                self.tb.evaluation("validation", self.step, loss, perplexity(loss))
            save_now = self.settings.train.save_every and self.step % self.settings.train.save_every == 0
            if improved and save_best and not save_now:  # on save steps best/ links the step checkpoint
                self.checkpoints.save_best(self.step, self._state)
        return loss

    def _finish(self) -> None:
        prefix = self._prefix(self.settings.train.eval_batches)
        loss = self._validate(prefix, save_best=False)  # competes for best/ as the validations before it did
        self.final_val_loss = loss
        if prefix is not None:  # they read a prefix; the figure reported reads the whole split
            self.final_val_loss = self.evaluate("validation")
            self._notify("on_evaluation", "validation", self.final_val_loss)
            if self.info.is_main:
                self.log(f"validation loss {self.final_val_loss:.4f} | ppl {perplexity(self.final_val_loss):.2f} "
                         "(the whole split)")
        self.test_loss = self.evaluate("test")
        self._notify("on_evaluation", "test", self.test_loss)
        if self.info.is_main:
            self.log(f"test loss {self.test_loss:.4f} | ppl {perplexity(self.test_loss):.2f}")
            if self.tb is not None:
                self.tb.evaluation("test", self.step, self.test_loss, perplexity(self.test_loss))
            step_dir = self.checkpoints.save_step(self.step, self._state)
            if self.best_val_step == self.step:
                self.checkpoints.save_best(self.step, self._state)
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
        saved = self.checkpoints.saved(self.step)
        if self.step > 0 and saved is None:
            path = self.checkpoints.save(ckpt.checkpoint_name(self.step), self.step, self._state())
            self.progress.log(f"interrupted: saved {path} (step {self.step}, {why}); {go_on}")
        elif self.step > 0:
            self.progress.log(f"interrupted {why}: step {self.step} is saved in {saved}; {go_on}")
        else:
            self.progress.log(f"interrupted {why} before the first step: nothing to save")

    # ------------------------------------------------------------------ what callbacks may ask
    def request_finish(self) -> None:
        """End the loop after the optimiser step being taken (from `on_step`: the one just taken) as if it were
        the last of `total_steps`: the run then finishes as at its planned end (final validation and test, the
        final checkpoint). Under torchrun a request on any rank ends every rank at the same step."""
        self._finish_requested = True

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next optimiser step, in place of the schedule's (which sets its own again
        after that step): for a callback with a schedule of its own, e.g. one in training time."""
        for group in self.optimizer.param_groups:
            group["lr"] = float(lr)

    def set_progress(self, fraction: float) -> None:
        """How far through the run the next optimiser steps are, in [0, 1], in place of step / total_steps, for
        what follows the run's progress (the penalty ramp, a depth curriculum): for a callback that ends the run
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

    def summary(self) -> TrainSummary:
        seconds = time.perf_counter() - self._t0
        return TrainSummary(
            run_dir=self.run_dir, steps=self.step, total_steps=self.total_steps, tokens_seen=self.tokens_seen,
            seconds=seconds, tokens_per_sec=(self.tokens_seen - self._session_start_tokens) / max(seconds, 1e-9),
            peak_memory_bytes=self._peak, memory_kind=memory_kind(self.device),
            best_val_loss=self.best_val_loss, best_val_step=self.best_val_step,
            final_val_loss=self.final_val_loss, test_loss=self.test_loss, unigram_val_loss=self.unigram_val_loss,
            final_checkpoint=self.final_checkpoint, history=self.history, data_seconds=self.data_seconds,
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
