"""The sampling defaults of `revdeq generate`, in one place.

`revdeq generate` uses them when no option is given (importing this module is cheap: no torch), and every
saved model directory writes them into `generation_config.json`, so `model.generate(**inputs)` and
`pipeline("text-generation", ...)` sample the same way by default. Chosen by `benchmarks/sample_words.py` on
the default run's checkpoint (README, "Sampling defaults"). `max_new_tokens` is the command line's alone: a
saved model sets no length, so its callers' `max_length` / `max_new_tokens` are honoured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class SamplingDefaults:
    """temperature 0 = greedy; top_k 0 = no cap; top_p 1 = no nucleus truncation; repetition_penalty 1 = off."""

    # llama.cpp's temperature 0.8 / top-k 40 / top-p 0.95, one notch cooler: a small byte-level model writes more
    # real words at 0.7 (benchmarks/sample_words.py: 69% vs 60% on a half-trained default run, 3 seeds)
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    max_new_tokens: int = 100

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


SAMPLING = SamplingDefaults()
