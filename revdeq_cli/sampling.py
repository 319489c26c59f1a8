"""The sampling defaults of `revdeq generate`, in one place.

`revdeq generate` uses them when no option is given (importing this module is cheap: no torch), and every
saved model directory writes them into `generation_config.json`, so `model.generate(**inputs)` and
`pipeline("text-generation", ...)` sample the same way by default. Chosen by `studies/sample_words.py` on
the default run's checkpoint (docs/recipe-study.md §Sampling defaults). `max_new_tokens` is the command line's alone: a
saved model sets no length, so its callers' `max_length` / `max_new_tokens` are honoured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class SamplingDefaults:
    """temperature 0 = greedy; top_k 0 = no cap; top_p 1 = no nucleus truncation; repetition_penalty 1 = off."""

    # llama.cpp's temperature 0.8 / top-k 40 / top-p 0.95, one notch cooler: a small byte-level model writes more
    # real words at 0.7 (docs/recipe-study.md §Sampling defaults: 69% vs 60% on a half-trained default run)
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    max_new_tokens: int = 100

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


SAMPLING = SamplingDefaults()


def generation_config(*, max_new_tokens: int | None, temperature: float, top_k: int, top_p: float,
                      repetition_penalty: float, eos_token_id: int | None, use_cache: bool) -> Any:
    """A complete `GenerationConfig` (nothing inherited from the checkpoint's generation_config.json);
    `max_new_tokens=None` sets no length, so a caller's `max_length` or `max_new_tokens` decides."""
    from transformers import GenerationConfig

    sampling = temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sampling,
        temperature=temperature if sampling else None, top_k=top_k if sampling and top_k > 0 else None,
        top_p=top_p if sampling and top_p < 1.0 else None,
        repetition_penalty=repetition_penalty if repetition_penalty != 1.0 else None,
        eos_token_id=eos_token_id, pad_token_id=eos_token_id, use_cache=use_cache,
    )


def default_generation_config(model_config: Any) -> Any:
    """The `GenerationConfig` a saved model directory carries: `revdeq generate`'s sampling defaults
    (`revdeq_cli.sampling.SAMPLING`, through `generation_config` above, so both sample alike) with the model's
    end-of-text, pad and beginning-of-text ids. `model.generate(**inputs)` and `pipeline("text-generation")`
    then sample like the command line by default.

    It sets no length: transformers lets a model's `max_new_tokens` override a caller's `max_length`, so the
    CLI's 100-token default stays in the CLI and the caller's `max_length` or `max_new_tokens` decides (with
    neither, transformers' own default applies)."""
    eos = model_config.eos_token_id
    config = generation_config(**{**SAMPLING.as_dict(), "max_new_tokens": None}, eos_token_id=eos, use_cache=True)
    if model_config.pad_token_id is not None:
        config.pad_token_id = model_config.pad_token_id
    if model_config.bos_token_id is not None:
        config.bos_token_id = model_config.bos_token_id
    return config
