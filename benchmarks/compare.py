"""RevDEQ against a classic DEQ, a Jacobian-free DEQ and explicit transformers, trained on the same corpus for
the same wall-clock budget; plus peak memory against solver steps and perplexity against inference steps.

    python benchmarks/compare.py                                   # CPU: tiny preset, pydoc, 180 s per model
    python benchmarks/compare.py --budget 20 --name smoke          # a quick look
    python benchmarks/compare.py --device cuda --precision bf16 --preset small --name compare-cuda-small
    python benchmarks/compare.py --from-json benchmarks/results/compare.json   # redo table and plots only

Writes `<out-dir>/<name>.md` (tables, machine), `<name>.json` (everything, curves included) and, when
matplotlib is installed (`pip install -e ".[bench]"`), `<name>_val_ppl.png`, `<name>_memory.png` and
`<name>_inference_steps.png`.

The models (`--models`, each trained as `revdeq train` resolves --preset under the default recipe, at the
corpus's vocabulary):

    revdeq             the preset's RevDEQ as `revdeq train` builds it (tiny: beta 0.5, float64 states, z0 = x, the
                       equilibrium recipe: a graph-free Poisson-lognormal start, mean 6, then 2 differentiated steps,
                       the ramped fixed-point penalty, the cross-entropy also read at f(z_N); inference at its
                       training depth, 8 steps), exact gradient
    deq-implicit       classic DEQ: Anderson (m 5, 8 steps = 10 evaluations), implicit (IFT) gradient
    deq-phantom        Jacobian-free DEQ: Anderson as above, phantom gradient with 1 step
    explicit-1         a 1-layer transformer: the DEQs' parameters exactly
    explicit-9         9 layers (one per forward evaluation of the RevDEQ): same compute per token, 9x the block
    explicit-9-narrow  9 layers at the width whose non-embedding parameter count is closest to the DEQs'

Parameter matching: the three DEQs and `explicit-1` have identical parameters (one block). A 9-layer model
cannot match both compute and parameters, so it appears twice: `explicit-9` matches forward compute (and has
9x the block parameters), `explicit-9-narrow` matches non-embedding parameters by narrowing the width (same
heads, MLP 4x width). The table reports total and non-embedding counts for every model.

Training (same for every model) runs through `revdeq_cli.training.Trainer`, what `revdeq train` runs (settings
resolved by `revdeq_cli.settings`, `train_settings`): the same blocks in the same order (one seed), AdamW (weight
decay 0.1, betas 0.9/0.99), gradient clipping at 1.0, the preset's training depth. An observer of the trainer
(`BudgetRun`) keeps the budget and sets a learning rate that is a function of training *time*, not steps (models
take different numbers of steps per second): linear warmup over the first --warmup fraction of the budget, then a
cosine decay to 0.1x at its end; what follows the run's progress in `revdeq train` (the penalty ramp, a depth
curriculum) follows the same clock (`Trainer.set_progress`). The clock counts training steps only: validation
during training is excluded, so every model gets the same seconds of optimisation; the step that reaches the
budget is the last, and the run then ends as any trainer run does (validation on the whole split, which the table
reports unless --final-eval-batches caps it, and test). Validation perplexity is measured on the first --eval-
batches batches of the validation split every --budget/--eval-points seconds and at the end (the curve). Each
model runs in a fresh process (one after another) so that its peak memory is its own: the increase of CUDA max
allocated, or on CPU of the peak resident set size (RSS), over what the process held just before the first step
(gradients, optimiser state and activations; not the weights, the interpreter or libraries).

Memory vs solver steps: one forward+backward of the `--preset` language model (batch --memory-batch, random
tokens, Reversible solver for every method so the forward is identical; no early stop) with the reversible,
unrolled, implicit and phantom gradients at --memory-steps, each in a fresh process; measured as in
benchmarks/solver_memory.py (which does the same for a bare block), after one warm-up pass on 8 tokens so
that the first pass's one-off costs (library code pages, allocator pools) are not counted.

Perplexity vs inference steps: every trained DEQ is evaluated (validation prefix) with
`model.config.inference_max_steps` = each of --inference-steps (`training.evaluate.solver_steps_sweep`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from revdeq_cli.training.callbacks import Callback  # noqa: E402  (torch-free; the heavy imports stay lazy)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MEMORY_METHODS = ("reversible", "unrolled", "implicit", "phantom")


# ---------------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSpec:
    """One contender: a label for tables, the `RevDEQConfig` overrides on top of the preset and any further
    `revdeq train` settings (dotted keys, e.g. {"train.recipe": "paper"}) over the comparison's own."""

    label: str
    overrides: dict[str, Any]
    match_params_layers: int | None = None  # narrow the width to match the DEQ's non-embedding parameters
    settings: dict[str, Any] = field(default_factory=dict)


_ANDERSON = {"solver": "anderson", "anderson_m": 5, "beta": 1.0, "max_steps": 8}

MODELS: dict[str, ModelSpec] = {
    # the default recipe's solver settings, as `revdeq train` resolves them (tiny: beta 0.5, 2 steps, z0 = x)
    "revdeq": ModelSpec("RevDEQ (reversible, exact grad)", {"solver": "reversible", "adjoint": "reversible"}),
    "deq-implicit": ModelSpec("DEQ (Anderson, implicit grad)", {**_ANDERSON, "adjoint": "implicit"}),
    "deq-phantom": ModelSpec("DEQ (Anderson, phantom 1 step)", {**_ANDERSON, "adjoint": "phantom",
                                                                "phantom_steps": 1}),
    "explicit-1": ModelSpec("Transformer, 1 layer", {"solver": "explicit", "num_hidden_layers": 1}),
    "explicit-9": ModelSpec("Transformer, 9 layers", {"solver": "explicit", "num_hidden_layers": 9}),
    "explicit-9-narrow": ModelSpec("Transformer, 9 layers, narrow", {"solver": "explicit", "num_hidden_layers": 9},
                                   match_params_layers=9),
}


def base_overrides(args: argparse.Namespace, vocab_size: int) -> dict[str, Any]:
    """Preset overrides every model shares: vocabulary, context, optional width for quick runs."""
    out: dict[str, Any] = {"vocab_size": vocab_size, "max_position_embeddings": max(args.seq_len, 8)}
    if args.hidden_size:
        out["hidden_size"] = args.hidden_size
        out["intermediate_size"] = 4 * args.hidden_size
    if args.heads:
        out["num_attention_heads"] = args.heads
    return out


def _count_non_embedding(config) -> int:
    import torch

    from revdeq_cli.model import RevDEQForCausalLM

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return RevDEQForCausalLM(config).num_parameters_split()["non_embedding"]


def _config_fields(overrides: dict[str, Any]) -> dict[str, Any]:
    """A spec's overrides (settings names) as `RevDEQConfig` fields: the baselines' solver settings are options."""
    fields = dict(overrides)
    if "anderson_m" in fields:
        fields["solver_options"] = {"m": fields.pop("anderson_m")}
    if "phantom_steps" in fields:
        fields["adjoint_options"] = {"steps": fields.pop("phantom_steps")}
    return fields


def build_config(name: str, args: argparse.Namespace, vocab_size: int, spec: ModelSpec | None = None):
    """The `RevDEQConfig` of model `name` (see MODELS), or of `spec` where given (another script's contender)."""
    from revdeq_cli.model import RevDEQConfig

    spec = spec or MODELS[name]
    shared = base_overrides(args, vocab_size)
    config = RevDEQConfig.from_preset(args.preset, **shared, **_config_fields(spec.overrides))
    if spec.match_params_layers:
        target = _count_non_embedding(RevDEQConfig.from_preset(args.preset, **shared,
                                                               **_config_fields(MODELS["revdeq"].overrides)))
        heads = config.num_attention_heads
        best = None
        for width in range(heads, config.hidden_size + 1, heads):
            candidate = RevDEQConfig.from_preset(args.preset, **{**shared, **_config_fields(spec.overrides),
                                                                 "hidden_size": width,
                                                                 "intermediate_size": 4 * width})
            gap = abs(_count_non_embedding(candidate) - target)
            if best is None or gap < best[0]:
                best = (gap, candidate)
        config = best[1]
    return config


# ---------------------------------------------------------------------------------------------------- machine
def machine_description(device: str) -> str:
    """CPU model, cores and torch version (and the GPU's name on CUDA)."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"
    if device.startswith("cuda"):
        text = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}); host {text}"
    return text


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _peak_rss_bytes() -> int:
    """The process's peak RSS: VmHWM (which `_reset_peak_rss` can reset), else the lifetime ru_maxrss."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux: writing 5 to /proc/self/clear_refs resets VmHWM), so a
    peak reached before the measurement (imports, warm-up) cannot hide it. False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class MemoryMeter:
    """Peak memory of what runs between `start()` and `peak_bytes()`, as an increase over what was in use at
    `start()`: CUDA max allocated, or on CPU peak RSS in a fresh process (`exact`; Linux resets the peak at
    `start()`, elsewhere it is the process's lifetime peak). `sample()` after each training step keeps the CUDA
    peak of that step, which the trainer resets at the start of the next."""

    def __init__(self, device, fresh_process: bool) -> None:
        self.device = device
        self.exact = device.type == "cuda" or fresh_process
        self.sampled = 0

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            if self.exact:
                _reset_peak_rss()  # a peak before start() (imports, the warm-up pass) must not count
            self.before = _rss_bytes()

    def sample(self) -> None:
        import torch

        if self.device.type == "cuda":
            self.sampled = max(self.sampled, int(torch.cuda.max_memory_allocated(self.device)))

    def peak_bytes(self) -> int | None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return max(self.sampled, int(torch.cuda.max_memory_allocated(self.device))) - self.before
        return _peak_rss_bytes() - self.before if self.exact else None


def _autocast(device, precision: str):
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _prepare_corpus(args: argparse.Namespace):
    from revdeq_cli.data import prepare_corpus

    return prepare_corpus(args.dataset, dataset_config=args.dataset_config, tokenizer=args.tokenizer)


# ---------------------------------------------------------------------------------------------------- training
def train_settings(name: str, args: argparse.Namespace, vocab_size: int, out_dir: Path,
                   spec: ModelSpec | None = None):
    """The `revdeq train` settings of model `name` (or `spec`): its `build_config` fields, the comparison's training
    settings and the spec's own settings over them. The schedule in training time and the budget are
    `BudgetRun`'s, so the trainer's own schedule is a constant rate and its step limit out of reach."""
    from revdeq_cli.settings import ModelSettings, resolve_settings

    spec = spec or MODELS[name]
    fields = {**base_overrides(args, vocab_size), **spec.overrides}
    if spec.match_params_layers:
        config = build_config(name, args, vocab_size, spec)
        fields.update(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size)
    values = {f"{'model' if k in ModelSettings.model_fields else 'solver'}.{k}": v for k, v in fields.items()}
    values.update({
        "model.preset": args.preset, "data.dataset": args.dataset, "data.dataset_config": args.dataset_config,
        "data.tokenizer": args.tokenizer, "data.seq_len": args.seq_len, "train.batch_size": args.batch_size,
        "train.eval_batch_size": args.eval_batch_size, "train.lr": args.lr, "train.weight_decay": 0.1,
        "train.adam_beta1": 0.9, "train.adam_beta2": 0.99, "train.adam_eps": 1e-8, "train.grad_clip": 1.0,
        "train.schedule": "constant", "train.warmup_steps": 0, "train.max_steps": 10**9,
        "train.precision": args.precision, "train.device": args.device, "train.seed": args.seed,
        "train.eval_every": 0, "train.eval_batches": None,  # the run's one validation, at its end: the whole split
        "train.save_every": 0, "train.keep_last": 1, "train.out_dir": str(out_dir), "log.progress": "plain",
        "log.tensorboard": False,
    })
    values.update(spec.settings)
    return resolve_settings(sets=[f"{k}={json.dumps(v)}" for k, v in values.items()], environ={})


class BudgetRun(Callback):
    """A Trainer observer that holds a model to the comparison's protocol (module docstring): `args.budget`
    seconds of training-step wall time (its own evaluations excluded), then `request_finish()`; the lr a function
    of that time (`lr_at`); the validation-prefix curve; each step's solver figures; the peak memory of the steps.

    With `args.budget_steps` set (an attribute other scripts may add) the budget is that many optimiser steps
    instead, and the schedule, the progress and the curve's points follow the step count; the time is still
    measured the same way."""

    def __init__(self, args: argparse.Namespace, meter: MemoryMeter) -> None:
        self.args, self.meter = args, meter
        self.curve, self.fwd_nfe, self.bwd_nfe, self.residuals = [], [], [], []
        self.seconds = self.cpu_seconds = 0.0
        self.budget_steps: int | None = getattr(args, "budget_steps", None)
        self.total = float(self.budget_steps or args.budget)  # the budget, in steps or in seconds
        self.next_eval = self.interval = self.total / max(args.eval_points, 1)
        self.final_loss: float | None = None  # the trainer's final validation (whole split)
        self.peak: int | None = None
        self.load_before = self.load_after = os.getloadavg()
        self._mark = (0.0, 0.0)

    def lr_at(self, elapsed: float) -> float:
        """Warmup then cosine, both in training time (models take different numbers of steps per second), or in
        steps under a step budget; `elapsed` is in the budget's unit."""
        args = self.args
        warmup = args.warmup * self.total
        if elapsed < warmup:
            return args.lr * max(elapsed / warmup, 0.02)
        progress = min(1.0, (elapsed - warmup) / max(self.total - warmup, 1e-9))
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def spent(self, trainer) -> float:
        """How much of the budget the steps so far used: optimiser steps under a step budget, else seconds."""
        return float(trainer.step) if self.budget_steps else self.seconds

    def _clock(self, trainer) -> tuple[float, float]:
        import torch

        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        return time.perf_counter(), time.process_time()

    def _point(self, trainer) -> None:
        from revdeq_cli.training.metrics import perplexity

        loss = trainer.evaluate("validation", self.args.eval_batches)
        self.curve.append({"seconds": self.seconds, "step": trainer.step, "tokens": trainer.tokens_seen,
                           "ppl": perplexity(loss)})

    def stop_measuring(self) -> None:
        if self.peak is None:
            self.peak, self.load_after = self.meter.peak_bytes(), os.getloadavg()

    def on_start(self, trainer) -> None:
        self._point(trainer)
        trainer.set_lr(self.lr_at(0.0))
        # the penalty ramp and a depth curriculum follow the budget's clock (the step limit is out of reach)
        trainer.set_progress(0.0)
        self.load_before = os.getloadavg()
        self.meter.start()
        self._mark = self._clock(trainer)

    def on_step(self, trainer, record: dict[str, float]) -> None:
        wall, cpu = self._clock(trainer)
        self.seconds += wall - self._mark[0]
        self.cpu_seconds += cpu - self._mark[1]
        self.meter.sample()
        forward = trainer.model.last_solver_stats  # the step's (last micro-batch's) forward
        self.fwd_nfe.append(int(forward.nfe or 0))
        if forward.backward is not None:
            self.bwd_nfe.append(int(record["backward_nfe"]))
        if trainer.model.config.is_deq:
            self.residuals.append(float(record["solver_residual"]))
        spent = self.spent(trainer)
        if spent >= self.total:
            self.stop_measuring()
            self._point(trainer)
            trainer.request_finish()
            return
        if spent >= self.next_eval:
            self._point(trainer)
            self.next_eval += self.interval
        trainer.set_lr(self.lr_at(spent))
        trainer.set_progress(spent / self.total)
        self._mark = self._clock(trainer)

    def on_evaluation(self, trainer, split: str, loss: float) -> None:
        if split == "validation":
            self.final_loss = loss


KEEP_ENV = "REVDEQ_COMPARE_KEEP"  # a folder: each trained run's directory is copied into it


def train_one(name: str, args: argparse.Namespace, *, fresh_process: bool = False,
              spec: ModelSpec | None = None) -> dict[str, Any]:
    """Train model `name` (or `spec`, under that name) with `revdeq_cli.training.Trainer` for `args.budget`
    seconds of training-step wall time, or `args.budget_steps` steps (`BudgetRun`); return its record (see module
    docstring). Divergence ends the run early and is recorded, not raised. With $REVDEQ_COMPARE_KEEP=DIR the run's
    directory (final checkpoint, settings) is copied to DIR/<name>-lr<lr>-seed<seed>-<steps>steps."""
    import tempfile

    import numpy as np
    import torch

    from revdeq_cli.training.distributed import DistInfo
    from revdeq_cli.training.evaluate import evaluate_split, solver_steps_sweep
    from revdeq_cli.training.loop import Trainer, TrainingDivergedError
    from revdeq_cli.training.metrics import perplexity
    from revdeq_cli.training.progress import NullProgress

    device = torch.device(args.device)
    budget = BudgetRun(args, MemoryMeter(device, fresh_process))
    diverged: str | None = None
    with tempfile.TemporaryDirectory(prefix="revdeq-compare-") as tmp:
        settings = train_settings(name, args, _prepare_corpus(args).vocab_size, Path(tmp) / "run", spec)
        trainer = Trainer(settings, info=DistInfo(), device=device, progress=NullProgress(), callbacks=[budget])
        try:
            trainer.run()
        except TrainingDivergedError as err:
            diverged = str(err).split("; ")[0]  # "training diverged at step N: <what> is nan"
        budget.stop_measuring()
        if os.environ.get(KEEP_ENV) and diverged is None:  # the run directory, for checkpoint benchmarks
            kept = Path(os.environ[KEEP_ENV]) / f"{name}-lr{args.lr:g}-seed{args.seed}-{trainer.step}steps"
            shutil.copytree(Path(tmp) / "run", kept, symlinks=True, dirs_exist_ok=True)
    model, corpus = trainer.model, trainer.corpus
    val, config = corpus.splits["validation"], model.config
    eval_kwargs = {"split_bytes": corpus.split_bytes["validation"], "seq_len": args.seq_len,
                   "batch_size": args.eval_batch_size or args.batch_size, "device": device}
    final = None  # (ppl, bits/byte, targets): the trainer's final validation scored every target once
    if diverged is None and args.final_eval_batches is None:
        final = (perplexity(budget.final_loss), budget.final_loss * (len(val) - 1) / (
            math.log(2) * max(eval_kwargs["split_bytes"], 1)), len(val) - 1)
    elif diverged is None:
        with _autocast(device, args.precision):
            r = evaluate_split(model, val, max_batches=args.final_eval_batches, **eval_kwargs)
        final = (r.perplexity, r.bits_per_byte, r.tokens)
    sweep = []
    if config.is_deq and diverged is None and args.inference_steps:
        with _autocast(device, args.precision):
            rows = solver_steps_sweep(model, val, args.inference_steps, max_batches=args.eval_batches,
                                      **eval_kwargs)
        sweep = [{"steps": r.solver_steps, "ppl": r.perplexity, "max_residual": r.max_residual} for r in rows]

    counts = model.num_parameters_split()
    seconds, tokens, curve = budget.seconds, trainer.tokens_seen, budget.curve
    return {
        "name": name, "label": (spec or MODELS[name]).label,
        "config": {k: getattr(config, k) for k in ("hidden_size", "num_attention_heads", "intermediate_size",
                                                  "num_hidden_layers", "solver", "adjoint", "beta", "tol",
                                                  "max_steps", "state_dtype", "solver_options", "adjoint_options")},
        "params_total": counts["total"], "params_non_embedding": counts["non_embedding"],
        "steps": trainer.step, "tokens": tokens, "train_seconds": seconds, "train_cpu_seconds": budget.cpu_seconds,
        "tokens_per_sec": tokens / seconds if seconds > 0 else math.nan,
        "fwd_nfe": float(np.mean(budget.fwd_nfe)) if budget.fwd_nfe else math.nan,
        "bwd_nfe": float(np.mean(budget.bwd_nfe)) if budget.bwd_nfe else None,
        "explicit_layers": config.num_hidden_layers if not config.is_deq else None,
        "inference_nfe": inference_nfe(model, val, args.seq_len, device),
        "mean_train_residual": float(np.mean(budget.residuals)) if budget.residuals else None,
        "peak_memory_bytes": budget.peak,
        "memory_kind": ("CUDA max allocated increase over the allocation before the first step" if device.type == "cuda"
                        else "peak RSS increase over the RSS before the first step"),
        "curve": curve,
        "final_val_ppl": final[0] if final else math.nan,
        "final_val_bits_per_byte": final[1] if final else math.nan,
        "final_val_tokens": final[2] if final else 0,
        "best_curve_ppl": min(p["ppl"] for p in curve),
        "unigram_ppl": perplexity(trainer.unigram_val_loss),
        "inference_sweep": sweep,
        "diverged": diverged,
        "load_average": {"before": budget.load_before, "after": budget.load_after},
    }


def inference_nfe(model, tokens, seq_len: int, device) -> int:
    """Evaluations of the block per token at inference: one eval-mode forward of the first `seq_len` tokens of
    `tokens` at the model's own inference settings (`out.solver_nfe`); an explicit model's layers."""
    import numpy as np
    import torch

    if not model.config.is_deq:
        return int(model.config.num_hidden_layers)
    was_training = model.training
    model.eval()
    ids = torch.from_numpy(np.asarray(tokens[:seq_len], dtype=np.int64)).to(device)[None]
    with torch.no_grad():
        out = model(input_ids=ids)
    model.train(was_training)
    return int(out.solver_nfe)


# ---------------------------------------------------------------------------------------------------- memory
def memory_one(method: str, steps: int, args: argparse.Namespace, *, fresh_process: bool = False) -> dict[str, Any]:
    """One forward+backward of the language model with gradient `method` and exactly `steps` Reversible steps."""
    import torch

    from revdeq_cli.model import RevDEQConfig, RevDEQForCausalLM

    device = torch.device(args.device)
    shared = base_overrides(args, args.memory_vocab)
    config = RevDEQConfig.from_preset(args.preset, **shared, solver="reversible", adjoint=method, beta=0.5,
                                      tol=None, max_steps=steps)
    torch.manual_seed(args.seed)
    model = RevDEQForCausalLM(config).to(device).train()
    tokens = torch.randint(0, args.memory_vocab, (args.memory_batch, args.seq_len + 1), device=device)
    # Warm-up on 8 tokens: the first pass maps libtorch code pages and allocator pools into the process
    # (tens of MiB of RSS that do not depend on the method or N); the measurement should not include them.
    with _autocast(device, args.precision):
        model(input_ids=tokens[:1, :8], shift_labels=tokens[:1, 1:9]).loss.backward()
    model.zero_grad(set_to_none=True)
    meter = MemoryMeter(device, fresh_process)
    meter.start()
    wall = time.perf_counter()
    with _autocast(device, args.precision):
        out = model(input_ids=tokens[:, :-1], shift_labels=tokens[:, 1:])
    out.loss.backward()
    peak = meter.peak_bytes()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"method": method, "steps": steps, "peak_memory_bytes": peak, "seconds": time.perf_counter() - wall,
            "fwd_nfe": int(out.solver_nfe), "bwd_nfe": int(out.solver_backward.nfe)}


# ---------------------------------------------------------------------------------------------------- processes
def _in_child(task: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Run `task` in a fresh Python process (clean peak memory) and return its JSON result."""
    payload = json.dumps({"task": task, "args": vars(args)})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", payload]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{task} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_task(task: dict[str, Any], args: argparse.Namespace, fresh_process: bool) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    if task["kind"] == "train":
        spec = ModelSpec(**task["spec"]) if task.get("spec") else None  # another script's contender
        return train_one(task["name"], args, fresh_process=fresh_process, spec=spec)
    return memory_one(task["method"], task["steps"], args, fresh_process=fresh_process)


def run_task(task: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    return _run_task(task, args, fresh_process=False) if args.in_process else _in_child(task, args)


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train every model, sweep memory, write the results; returns the record written to JSON."""
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _prepare_corpus(args)  # build the token cache once, before any timing
    record: dict[str, Any] = {
        "command": "python benchmarks/compare.py " + shlex.join(args.argv) if args.argv is not None else None,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(args.device),
        "settings": {k: v for k, v in vars(args).items() if k not in ("argv", "child", "from_json")},
        "load_average_start": os.getloadavg(),
        "models": [], "memory": [],
    }
    for name in args.models:
        log(f"training {name} for {args.budget:g} s ...")
        result = run_task({"kind": "train", "name": name}, args)
        record["models"].append(result)
        log(f"  {result['steps']} steps, {result['tokens_per_sec']:.0f} tokens/s, final val ppl "
            f"{result['final_val_ppl']:.2f}" + (f"; DIVERGED: {result['diverged']}" if result["diverged"] else ""))
    for steps in args.memory_steps:
        for method in args.memory_methods:
            row = run_task({"kind": "memory", "method": method, "steps": steps}, args)
            record["memory"].append(row)
            mib = "n/a" if row["peak_memory_bytes"] is None else f"{row['peak_memory_bytes'] / 2**20:.1f} MiB"
            log(f"memory: {method:<10} {steps:>3} steps: {mib}")
    record["load_average_end"] = os.getloadavg()
    write_outputs(record, out_dir, args.name, log)
    return record


# ---------------------------------------------------------------------------------------------------- output
def _fmt_mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _load(values) -> str:
    return " / ".join(f"{v:.1f}" for v in values)


def _preset_width(preset: str) -> int:
    from revdeq_cli.model import PRESETS

    return PRESETS[preset]["hidden_size"]


def markdown(record: dict[str, Any], name: str) -> str:
    s = record["settings"]
    lines = [
        f"# {name}: RevDEQ vs classic DEQs vs explicit transformers",
        "",
        f"- Machine: {record['machine']}; torch threads per model: {s['threads']}; device `{s['device']}`, "
        f"precision {s['precision']}.",
        f"- Date: {record['date']}. Load average (1/5/15 min) at start {_load(record['load_average_start'])}, "
        f"at end {_load(record.get('load_average_end', record['load_average_start']))}.",
        f"- Command: `{record['command']}`" if record.get("command") else "- Command: (run from Python)",
    ]
    if record["models"]:
        lines += [
            f"- Data: `{s['dataset']}`, tokenizer `{s['tokenizer']}`, sequence length {s['seq_len']}, batch "
            f"{s['batch_size']}; preset `{s['preset']}`; AdamW lr {s['lr']:g} (linear warmup over the first "
            f"{s['warmup']:.0%} of the time budget, then cosine to 0.1x at its end), grad clip 1.0, seed {s['seed']}.",
            f"- Budget: {s['budget']:g} s of training-step wall time per model, models run one after another, each "
            "in a fresh process. Validation during training is not counted.",
            "",
            "## Comparison at equal training time",
            "",
            "| model | params total | non-emb. | fwd evals/step | bwd evals/step | steps | tokens/s | "
            f"peak mem MiB | val ppl (curve, first {s['eval_batches']} batches) | final val ppl (full split) | "
            "bits/byte |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for m in record["models"]:
        if m["explicit_layers"] is not None:
            bwd = f"{m['explicit_layers']} (autograd)"
        else:
            bwd = "—" if m["bwd_nfe"] is None else f"{m['bwd_nfe']:.1f}"
        final = f"{m['final_val_ppl']:.2f}" if not m["diverged"] else "diverged"
        bpb = f"{m['final_val_bits_per_byte']:.3f}" if not m["diverged"] else "—"
        width = m["config"]["hidden_size"]
        lines.append(
            f"| {m['label']} (`{m['name']}`, width {width}) | {_fmt_count(m['params_total'])} | "
            f"{_fmt_count(m['params_non_embedding'])} | {m['fwd_nfe']:.1f} | {bwd} | {m['steps']} | "
            f"{m['tokens_per_sec']:.0f} | {_fmt_mib(m['peak_memory_bytes'])} | {m['curve'][-1]['ppl']:.2f} | "
            f"{final} | {bpb} |"
        )
    if record["models"]:
        mem_kind = record["models"][0]["memory_kind"]
        lines += [
            "",
            f"Peak memory: {mem_kind}. Evaluations of the block f per training step: forward as reported by the "
            "model (`out.solver_nfe`; Anderson evaluates f once more than its step count), backward from "
            "`out.solver_backward.nfe` (reversible: 2 per step; implicit: its backward fixed-point iterations; "
            "phantom: its steps). The explicit models evaluate each layer once forward and autograd backpropagates "
            "through each once. Unigram (context-free) validation perplexity: "
            f"{record['models'][0]['unigram_ppl']:.2f}.",
        ]
        diverged = [m for m in record["models"] if m["diverged"]]
        for m in diverged:
            lines.append(f"\n`{m['name']}` diverged: {m['diverged']}.")
        lines += ["", "Load average around each model (1 min, before / after): " + "; ".join(
            f"`{m['name']}` {m['load_average']['before'][0]:.1f} / {m['load_average']['after'][0]:.1f}"
            for m in record["models"]) + "."]
        lines += ["", f"![validation perplexity vs time]({name}_val_ppl.png)"]

    sweeps = [m for m in record["models"] if m["inference_sweep"]]
    if sweeps:
        steps = [r["steps"] for r in sweeps[0]["inference_sweep"]]
        lines += ["", "## Validation perplexity vs inference solver steps", "",
                  f"Trained DEQs evaluated on the first {s['eval_batches']} validation batches with "
                  "`inference_max_steps` set to each value (no early stop).", "",
                  "| model | " + " | ".join(f"{k} steps" for k in steps) + " |",
                  "|---|" + "---:|" * len(steps)]
        for m in sweeps:
            lines.append(f"| {m['label']} | " + " | ".join(f"{r['ppl']:.2f}" for r in m["inference_sweep"]) + " |")
        lines += ["", f"![perplexity vs inference solver steps]({name}_inference_steps.png)"]

    if record["memory"]:
        steps = sorted({r["steps"] for r in record["memory"]})
        methods = list(dict.fromkeys(r["method"] for r in record["memory"]))
        table = {(r["method"], r["steps"]): r for r in record["memory"]}
        cuda = s["device"].startswith("cuda")
        kind = "CUDA max allocated increase" if cuda else "peak RSS increase (fresh process each)"
        lines += ["", "## Peak memory of one forward+backward vs solver steps", "",
                  f"The `{s['preset']}` language model (width {s['hidden_size'] or _preset_width(s['preset'])}), batch "
                  f"{s['memory_batch']} x {s['seq_len']} tokens, Reversible solver (beta 0.5, float64 states) for "
                  f"exactly N steps; only the gradient method differs. Memory: {kind}, MiB. In brackets: "
                  "forward / backward evaluations of f.", "",
                  "| gradient | " + " | ".join(f"{k} steps" for k in steps) + " |",
                  "|---|" + "---:|" * len(steps)]
        for method in methods:
            cells = []
            for k in steps:
                r = table.get((method, k))
                bwd = r and (r["bwd_nfe"] or "autograd")
                cells.append("—" if r is None else f"{_fmt_mib(r['peak_memory_bytes'])} ({r['fwd_nfe']}/{bwd})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        if any(r["peak_memory_bytes"] is not None for r in record["memory"]):
            lines += ["", f"![peak memory vs solver steps]({name}_memory.png)"]
        else:
            lines += ["", "(Memory not measured: CPU peak memory needs a fresh process per point; run without "
                      "--in-process.)"]
    return "\n".join(lines) + "\n"


def write_plots(record: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    """The three PNGs; needs matplotlib (the `bench` extra). Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    machine = record["machine"].split(",")[0]
    if record["models"]:
        fig, ax = plt.subplots(figsize=(9.5, 4.5))
        for m in record["models"]:
            xs = [p["seconds"] for p in m["curve"]]
            ys = [p["ppl"] for p in m["curve"]]
            ax.plot(xs, ys, marker="o", markersize=3, label=f"{m['label']} ({m['steps']} steps)")
        ax.axhline(record["models"][0]["unigram_ppl"], color="grey", linestyle="--", linewidth=1,
                   label="unigram (no context)")
        ax.set_yscale("log")
        written.append(_save(fig, ax, out_dir / f"{name}_val_ppl.png", "training wall time, s (validation excluded)",
                             "validation perplexity",
                             f"Validation perplexity vs time ({record['settings']['preset']}, {machine})"))
    sweeps = [m for m in record["models"] if m["inference_sweep"]]
    if sweeps:
        fig, ax = plt.subplots(figsize=(9.5, 4.5))
        for m in sweeps:
            ax.plot([r["steps"] for r in m["inference_sweep"]], [r["ppl"] for r in m["inference_sweep"]],
                    marker="o", label=m["label"])
            ax.axvline(m["config"]["max_steps"], color=ax.lines[-1].get_color(), linestyle=":", alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        written.append(_save(fig, ax, out_dir / f"{name}_inference_steps.png",
                             "inference solver steps (dotted: training steps)", "validation perplexity",
                             "Perplexity vs inference solver steps"))
    rows = [r for r in record["memory"] if r["peak_memory_bytes"] is not None]
    if rows:
        fig, ax = plt.subplots(figsize=(9.5, 4.5))
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["steps"], r["peak_memory_bytes"] / 2**20) for r in rows if r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_xscale("log", base=2)
        written.append(_save(fig, ax, out_dir / f"{name}_memory.png",
                             "solver steps N (Reversible solver, 1 + 2N forward evaluations)", "peak memory, MiB",
                             f"Memory of one forward+backward vs solver steps ({machine})"))
    return written


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Label, grid and legend `ax`, then write `fig` to `path` (atomically) and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a curve
    tmp = path.with_name(path.name + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_outputs(record: dict[str, Any], out_dir: Path, name: str, log: Callable[[str], None] = print) -> None:
    _write_text(out_dir / f"{name}.json", json.dumps(record, indent=1) + "\n")
    _write_text(out_dir / f"{name}.md", markdown(record, name))
    log(f"wrote {out_dir / (name + '.md')} and {name}.json")
    try:
        paths = write_plots(record, out_dir, name)
    except ImportError:
        log('plots skipped: matplotlib is not installed (pip install -e ".[bench]")')
    else:
        log("wrote " + ", ".join(p.name for p in paths))


# ---------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS),
                        help="models to train (none: only the memory sweep)")
    parser.add_argument("--budget", type=float, default=180.0, help="seconds of training per model")
    parser.add_argument("--dataset", default="pydoc")
    parser.add_argument("--dataset-config", default=None)
    parser.add_argument("--tokenizer", default="byte")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "base", "paper"])
    parser.add_argument("--hidden-size", type=int, default=None, help="override the preset's width (MLP 4x)")
    parser.add_argument("--heads", type=int, default=None, help="override the preset's attention heads")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=float, default=0.05, help="linear warmup, as a fraction of --budget")
    parser.add_argument("--eval-points", type=int, default=6, help="validations during the budget")
    parser.add_argument("--eval-batches", type=int, default=4, help="validation batches for the curve and sweep")
    parser.add_argument("--final-eval-batches", type=int, default=None, help="default: the whole split")
    parser.add_argument("--inference-steps", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    parser.add_argument("--memory-steps", type=int, nargs="*", default=[2, 4, 8, 16])
    parser.add_argument("--memory-methods", nargs="+", default=list(MEMORY_METHODS), choices=list(MEMORY_METHODS))
    parser.add_argument("--memory-batch", type=int, default=2)
    parser.add_argument("--memory-vocab", type=int, default=257, help="vocabulary of the memory sweep's model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per model (1: on a shared machine, multi-threaded kernels stall)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--name", default="compare", help="file stem of the outputs")
    parser.add_argument("--in-process", action="store_true",
                        help="run every model in this process (quick; CPU peak memory is then not measured)")
    parser.add_argument("--from-json", default=None, help="rewrite the table and plots from a results JSON")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        payload = json.loads(args.child)
        child_args = argparse.Namespace(**payload["args"])
        print(json.dumps(_run_task(payload["task"], child_args, fresh_process=True)))
        return 0
    if args.from_json:
        path = Path(args.from_json)
        write_outputs(json.loads(path.read_text()), path.parent, path.stem)
        return 0
    if args.in_process:
        import torch

        torch.set_num_threads(args.threads)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
