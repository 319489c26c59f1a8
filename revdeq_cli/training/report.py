"""What a run tells the user: the header before the first step and the summary at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from revdeq_cli.training.metrics import perplexity
from revdeq_cli.training.precision import emulated_precision_warning
from revdeq_cli.training.progress import format_bytes, format_duration


def header_lines(trainer: Any) -> list[str]:
    """The run's header (rank 0 prints it once set up): the run directory, the data, the model, its context,
    the plan of the run and the unigram baseline, from a set-up `Trainer`."""
    s, c, model = trainer.settings, trainer.corpus, trainer.model
    counts = model.num_parameters_split()
    tr = s.train
    if model.config.is_deq:
        body = (f"solver {s.solver.solver} / adjoint {s.solver.adjoint}, beta {s.solver.beta}, max "
                f"{s.solver.max_steps} steps, tol {s.solver.tol}, states {s.solver.state_dtype}, start "
                f"{'z0 = x' if model.config.init_state == 'input' else 'z0 = 0'}")
    else:
        body = f"explicit, {model.config.num_hidden_layers} layer(s)"
    lines = [
        f"run: {trainer.run_dir}",
        f"data: {c.source}; tokens train {len(c.splits['train']):,} / validation {len(c.splits['validation']):,} / "
        f"test {len(c.splits['test']):,}; vocab {c.vocab_size} ({s.data.tokenizer}); prepared in "
        f"{format_duration(trainer.data_seconds)}",
        f"model: preset {s.model.preset}, recipe {tr.recipe}, {counts['total']:,} parameters "
        f"({counts['non_embedding']:,} non-embedding); {body}",
        context_line(s.data.seq_len, model.config.max_position_embeddings),
        f"train: {trainer.total_steps} steps ({trainer.steps_per_epoch} per epoch), batch {tr.batch_size} x accum "
        f"{tr.grad_accum} x {trainer.info.world_size} process(es) x {s.data.seq_len} tokens = "
        f"{trainer.tokens_per_step:,} tokens/step; lr {tr.lr:g} ({tr.schedule}, warmup {tr.warmup_steps}); "
        f"device {trainer.device}, {trainer.precision}{' (auto)' if trainer.precision_was_auto else ''}",
    ]
    if (warning := emulated_precision_warning(trainer.precision, trainer.device)) is not None:
        lines.append(warning)
    lines.append(f"unigram baseline: validation perplexity {perplexity(trainer.unigram_val_loss):.2f}")
    return lines


def context_line(seq_len: int, context: int) -> str:
    """The header's word on the context the saved model declares (its max_position_embeddings): the
    trained sequence length, or a warning when an explicitly given context is longer than it."""
    if seq_len >= context:
        return f"context: the saved model declares {context} positions, the sequence length it trains on"
    return (f"warning: the saved model declares {context} positions (model.max_position_embeddings) but trains "
            f"on {seq_len}-token sequences, so positions {seq_len}..{context - 1} get no training; leave "
            f"model.max_position_embeddings unset to declare {seq_len}, or raise data.seq_len to {context}")


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


