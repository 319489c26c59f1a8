"""Sampling text from a trained model, with the figures `revdeq generate` reports.

    stats = generate_sample(model, prompt_ids, max_new_tokens=64, temperature=0.8, top_k=50, streamer=s)

Sampling is Hugging Face `generate` (our model is a `GenerationMixin`): temperature 0 is greedy; top-k,
top-p and the repetition penalty are the standard logits processors. With `use_cache=True` the model's
key/value cache makes each new token cost one solve over one position; `use_cache=False` recomputes the
whole sequence for every token (the reference the cache must agree with).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from revdeq_cli.training.metrics import memory_kind, peak_memory_bytes, reset_peak_memory


@dataclass(frozen=True)
class SampleStats:
    """One generated sample: its new token ids and how it was produced."""

    token_ids: list[int]  # new tokens only (the prompt excluded), the end-of-text token included if sampled
    seconds: float
    tokens_per_sec: float
    forward_calls: int  # one per new token
    solver_steps_per_token: float  # mean solver steps of those calls (nan for the explicit model)
    peak_memory_bytes: int
    memory_kind: str


def generation_config(*, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                      repetition_penalty: float, eos_token_id: int | None, use_cache: bool) -> Any:
    """A complete `GenerationConfig` (nothing inherited from the checkpoint's generation_config.json)."""
    from transformers import GenerationConfig

    sampling = temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sampling,
        temperature=temperature if sampling else None, top_k=top_k if sampling and top_k > 0 else None,
        top_p=top_p if sampling and top_p < 1.0 else None,
        repetition_penalty=repetition_penalty if repetition_penalty != 1.0 else None,
        eos_token_id=eos_token_id, pad_token_id=eos_token_id, use_cache=use_cache,
    )


@torch.no_grad()
def generate_sample(model: Any, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 0.8,
                    top_k: int = 50, top_p: float = 1.0, repetition_penalty: float = 1.0,
                    eos_token_id: int | None = None, use_cache: bool = True, streamer: Any = None) -> SampleStats:
    """Sample up to `max_new_tokens` after `prompt_ids` (non-empty), streaming to `streamer` if given
    (a transformers `BaseStreamer`). Randomness comes from torch's global RNG: seed it for repeatability."""
    if not prompt_ids:
        raise ValueError("prompt_ids must hold at least one token")
    device = next(model.parameters()).device
    model.eval()
    steps: list[int] = []

    def count_steps(_module: Any, _args: Any, output: Any) -> None:
        if getattr(output, "solver_steps", None) is not None:
            steps.append(int(output.solver_steps))

    hook = model.register_forward_hook(count_steps)
    config = generation_config(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
                               use_cache=use_cache)
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    reset_peak_memory(device)
    t0 = time.perf_counter()
    try:
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
                             streamer=streamer)
    finally:
        hook.remove()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    new = out[0, len(prompt_ids):].tolist()
    return SampleStats(
        token_ids=new, seconds=seconds, tokens_per_sec=len(new) / seconds if seconds > 0 else float("inf"),
        forward_calls=len(steps), solver_steps_per_token=sum(steps) / len(steps) if steps else float("nan"),
        peak_memory_bytes=peak_memory_bytes(device), memory_kind=memory_kind(device),
    )
