"""Sampling text from a trained model, with the figures `revdeq generate` reports.

    stats = generate_sample(model, prompt_ids, max_new_tokens=64, temperature=0.8, top_k=50, streamer=s)

Sampling is Hugging Face `generate` (our model is a `GenerationMixin`): temperature 0 is greedy; top-k,
top-p and the repetition penalty are the standard logits processors. With `use_cache=True` the model's
key/value cache makes each new token cost one solve over one position; `use_cache=False` recomputes the
whole sequence for every token (the reference the cache must agree with). Unset options take `revdeq
generate`'s defaults (`revdeq_cli.sampling.SAMPLING`).

Past the context. The model has learned positions for `max_position_embeddings` (C) tokens, the length it
trained on, and `model.generate` refuses to go further (transformers crops nothing for absolute positions).
`generate_sample` goes on as nanoGPT's sampler does: the part that fits is one cached `generate` call; each
further token is predicted from the last C tokens, recomputed in full without the cache (one `generate`
call of one token on the cropped window, so the same logits processors apply, the repetition penalty to
the C tokens the model sees). `on_crop(C)` is called once, before the first such token; a prompt longer
than C is cropped the same way. The streamer gets the prompt once, every new token once, in order, and
one `end()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from revdeq_cli.sampling import SAMPLING, generation_config
from revdeq_cli.training.metrics import memory_kind, peak_memory_bytes, reset_peak_memory


@dataclass(frozen=True)
class SampleStats:
    """One generated sample: its new token ids and how it was produced."""

    token_ids: list[int]  # new tokens only (the prompt excluded), the end-of-text token included if sampled
    seconds: float
    tokens_per_sec: float
    forward_calls: int  # one per new token
    solver_steps_per_token: float  # mean over new tokens of the solver steps of the position that predicted it
    peak_memory_bytes: int
    memory_kind: str
    cropped_tokens: int = 0  # new tokens predicted from a window cropped to the context (no cache)
    max_solver_steps: int = 0  # the most steps one of them took (adaptive depth: fewer than the limit)


class _OneEnd:
    """Forwards `put` to `streamer` and swallows `end`, so a sample made of several `generate` calls ends
    the stream once (a `TextStreamer` prints a newline at each end)."""

    def __init__(self, streamer: Any) -> None:
        self.streamer = streamer

    def put(self, value: torch.Tensor) -> None:
        self.streamer.put(value)

    def end(self) -> None:
        pass


@torch.no_grad()
def generate_sample(model: Any, prompt_ids: list[int], *, max_new_tokens: int,
                    temperature: float = SAMPLING.temperature, top_k: int = SAMPLING.top_k,
                    top_p: float = SAMPLING.top_p, repetition_penalty: float = SAMPLING.repetition_penalty,
                    eos_token_id: int | None = None, use_cache: bool = True, streamer: Any = None,
                    on_crop: Callable[[int], None] | None = None) -> SampleStats:
    """Sample up to `max_new_tokens` after `prompt_ids` (non-empty), streaming to `streamer` if given
    (a transformers `BaseStreamer`). Past the model's context the window is cropped to its last
    `max_position_embeddings` tokens (see the module docstring; `on_crop` is told once). Randomness comes
    from torch's global RNG: seed it for repeatability."""
    if not prompt_ids:
        raise ValueError("prompt_ids must hold at least one token")
    device = next(model.parameters()).device
    model.eval()
    context = model.config.max_position_embeddings
    steps: list[int] = []

    def count_steps(_module: Any, _args: Any, output: Any) -> None:
        # the last position's steps: its logits pick the next token. Cached or not, that position's solve is
        # the same (adaptive depth included), so the figure does not depend on --no-cache.
        per_position = getattr(output, "solver_position_steps", None)
        if per_position is not None:
            steps.append(int(per_position[0, -1]))
        elif getattr(output, "solver_steps", None) is not None:
            steps.append(int(output.solver_steps))

    def config(new_tokens: int, cache: bool) -> Any:
        return generation_config(max_new_tokens=new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, use_cache=cache)

    hook = model.register_forward_hook(count_steps)
    sequence = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    fitting = max(0, min(max_new_tokens, context - len(prompt_ids)))  # new tokens the context holds
    cropped = 0
    reset_peak_memory(device)
    t0 = time.perf_counter()
    try:
        if fitting:
            sequence = model.generate(sequence, attention_mask=torch.ones_like(sequence),
                                      generation_config=config(fitting, use_cache),
                                      streamer=_OneEnd(streamer) if streamer is not None else None)
        elif streamer is not None:
            streamer.put(sequence.cpu())  # the prompt, as generate would send it
        ended = eos_token_id is not None and len(sequence[0]) > len(prompt_ids) \
            and int(sequence[0, -1]) == eos_token_id
        if not ended and max_new_tokens > len(sequence[0]) - len(prompt_ids):
            if on_crop is not None:
                on_crop(context)
            one_token = config(1, False)
            while len(sequence[0]) - len(prompt_ids) < max_new_tokens:
                window = sequence[:, -context:]
                token = model.generate(window, attention_mask=torch.ones_like(window),
                                       generation_config=one_token)[:, -1:]
                sequence = torch.cat([sequence, token], dim=1)
                cropped += 1
                if streamer is not None:
                    streamer.put(token.cpu())
                if eos_token_id is not None and int(token) == eos_token_id:
                    break
    finally:
        hook.remove()
    if streamer is not None:
        streamer.end()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    new = sequence[0, len(prompt_ids):].tolist()
    return SampleStats(
        token_ids=new, seconds=seconds, tokens_per_sec=len(new) / seconds if seconds > 0 else float("inf"),
        forward_calls=len(steps), solver_steps_per_token=sum(steps) / len(steps) if steps else float("nan"),
        max_solver_steps=max(steps, default=0),
        peak_memory_bytes=peak_memory_bytes(device), memory_kind=memory_kind(device), cropped_tokens=cropped,
    )
