"""`generate_sample` past the model's context: it crops the window to the last `max_position_embeddings`
tokens (a full recomputation per token, as nanoGPT's sampler does), honours `max_new_tokens`, streams every
token once, and the cached and uncached paths agree."""

from __future__ import annotations

import pytest
import torch

from revdeq_cli.model import RevDEQConfig, RevDEQForCausalLM
from revdeq_cli.training.generation import generate_sample

CONTEXT = 16
VOCAB = 40


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model() -> RevDEQForCausalLM:
    torch.manual_seed(0)
    config = RevDEQConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, max_position_embeddings=CONTEXT,
                          pad_token_id=0, eos_token_id=None)
    return RevDEQForCausalLM(config).eval()


def cropped_greedy_reference(model: RevDEQForCausalLM, prompt: list[int], new: int) -> list[int]:
    """nanoGPT's sampler at temperature 0: argmax of the last logits over the last CONTEXT tokens."""
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(new):
            logits = model(input_ids=seq[:, -CONTEXT:]).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(prompt):].tolist()


class Recorder:
    """A streamer that records what it is given."""

    def __init__(self) -> None:
        self.puts: list[list[int]] = []
        self.ends = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ends += 1


@pytest.mark.parametrize("prompt_len", [5, CONTEXT, CONTEXT + 7])
def test_greedy_past_the_context_crops_continues_and_the_cache_agrees(model, prompt_len):
    prompt = [(3 * i + 1) % VOCAB for i in range(prompt_len)]
    new = 2 * CONTEXT + 3
    crops: list[int] = []
    cached = generate_sample(model, prompt, max_new_tokens=new, temperature=0, use_cache=True, on_crop=crops.append)
    uncached = generate_sample(model, prompt, max_new_tokens=new, temperature=0, use_cache=False)
    assert len(cached.token_ids) == new  # max_new_tokens is honoured, not cut at the context
    assert cached.token_ids == uncached.token_ids == cropped_greedy_reference(model, prompt, new)
    assert crops == [CONTEXT]  # told once
    assert cached.cropped_tokens == uncached.cropped_tokens == new - max(0, CONTEXT - prompt_len)


def test_within_the_context_nothing_is_cropped(model):
    crops: list[int] = []
    stats = generate_sample(model, [1, 2, 3], max_new_tokens=CONTEXT - 3, temperature=0, on_crop=crops.append)
    assert len(stats.token_ids) == CONTEXT - 3 and stats.cropped_tokens == 0 and crops == []


def test_the_streamer_gets_the_prompt_and_every_new_token_once_in_order_and_one_end(model):
    prompt = [4, 5, 6, 7]
    recorder = Recorder()
    stats = generate_sample(model, prompt, max_new_tokens=CONTEXT + 5, temperature=0, streamer=recorder)
    assert recorder.puts[0] == prompt
    assert [t for put in recorder.puts[1:] for t in put] == stats.token_ids
    assert recorder.ends == 1


def test_a_long_prompt_streams_once_too(model):
    prompt = list(range(1, CONTEXT + 4))
    recorder = Recorder()
    stats = generate_sample(model, prompt, max_new_tokens=3, temperature=0, streamer=recorder)
    assert recorder.puts[0] == prompt and [t for p in recorder.puts[1:] for t in p] == stats.token_ids
    assert recorder.ends == 1


def test_sampling_past_the_context_is_repeatable_and_stops_at_end_of_text(model):
    prompt = [1, 2, 3]
    options = {"temperature": 1.2, "top_k": 10, "top_p": 0.9, "repetition_penalty": 1.3}
    torch.manual_seed(5)
    first = generate_sample(model, prompt, max_new_tokens=2 * CONTEXT, **options)
    torch.manual_seed(5)
    again = generate_sample(model, prompt, max_new_tokens=2 * CONTEXT, **options)
    assert first.token_ids == again.token_ids and len(first.token_ids) == 2 * CONTEXT
    # End-of-text sampled past the context ends the sample there.
    greedy = generate_sample(model, prompt, max_new_tokens=2 * CONTEXT, temperature=0).token_ids
    fitting = CONTEXT - len(prompt)
    late = next((i for i in range(fitting, len(greedy)) if greedy[i] not in greedy[:i]), None)
    if late is None:
        pytest.skip("greedy output repeats itself: no token first appears past the context")
    stopped = generate_sample(model, prompt, max_new_tokens=2 * CONTEXT, temperature=0, eos_token_id=greedy[late])
    assert stopped.token_ids == greedy[: late + 1]
