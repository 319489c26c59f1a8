"""Generation through `model.generate`: the exact per-evaluation KV cache, the fixed-point cache,
sampling options and streaming."""

from __future__ import annotations

import pytest
import torch
from test_model_lm import _one_thread  # noqa: F401  (autouse fixture: one torch thread here too)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, TextStreamer

from revdeq_cli.model import RevDEQCache, RevDEQConfig, RevDEQForCausalLM

VOCAB = 48
PATTERN = [3, 7, 11, 19, 23, 5, 31, 2, 41, 13]  # a repeating sequence the "trained" model learns


def make_model(seed: int = 0, **overrides) -> RevDEQForCausalLM:
    torch.manual_seed(seed)
    fields = {"vocab_size": VOCAB, "hidden_size": 32, "num_attention_heads": 4, "max_position_embeddings": 64,
              "pad_token_id": 0, "eos_token_id": None}
    return RevDEQForCausalLM(RevDEQConfig(**{**fields, **overrides})).eval()


@pytest.fixture(scope="module")
def trained() -> RevDEQForCausalLM:
    """60 AdamW steps on a repeating sequence: a confident model (greedy continues the pattern)."""
    model = make_model(seed=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seq = torch.tensor(PATTERN * 3)
    batch = torch.stack([seq[i : i + 16] for i in range(4)])
    for _ in range(60):
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def greedy_scores_vs_full_forward(model: RevDEQForCausalLM, prompt: torch.Tensor, new: int) -> tuple[float, float]:
    """Max |cached greedy score - full-forward logit| over all generated steps, and the logit scale."""
    out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    assert isinstance(out.cache, RevDEQCache)
    scores = torch.stack(out.scores, dim=1)  # [B, new, V]
    with torch.no_grad():
        full = model(out.sequences).logits[:, prompt.shape[1] - 1 : -1]
    return float((scores - full).abs().max()), float(full.abs().max())


@pytest.mark.parametrize("which", ["untrained", "trained"])
def test_cached_greedy_scores_equal_a_full_forward(which, trained):
    model = make_model() if which == "untrained" else trained
    prompt = torch.tensor([PATTERN[:5], PATTERN[3:8]])
    diff, scale = greedy_scores_vs_full_forward(model, prompt, new=30)
    assert diff <= 1e-4 * scale, (diff, scale)
    if which == "trained":
        seq = model.generate(prompt[:1], max_new_tokens=10, do_sample=False)
        assert seq[0, 5:].tolist() == (PATTERN * 2)[5:15]


def test_cache_holds_one_layer_per_evaluation_and_matches_unconverged_solves():
    model = make_model(inference_max_steps=2)
    prompt = torch.tensor([[1, 2, 3, 4]])
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert len(out.cache.layers) == out.cache.num_evaluations == 1 + 2 * 2
    assert out.cache.get_seq_length() == 4 + 6 - 1  # the last token is never fed back
    assert model.last_solver_stats.residual > 1e-3  # not converged, and still exact:
    diff, scale = greedy_scores_vs_full_forward(model, prompt, new=6)
    assert diff <= 1e-4 * scale


def test_explicit_baseline_caches_one_layer_per_block():
    model = make_model(solver="explicit", num_hidden_layers=3)
    prompt = torch.tensor([[5, 6, 7]])
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert len(out.cache.layers) == 3
    diff, scale = greedy_scores_vs_full_forward(model, prompt, new=8)
    assert diff <= 1e-4 * scale


def test_no_cache_recomputes_the_same_tokens(trained):
    prompt = torch.tensor([PATTERN[:4]])
    cached = trained.generate(prompt, max_new_tokens=12, do_sample=False)
    recomputed = trained.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_left_padded_batch_matches_each_prompt_alone():
    model = make_model()
    a, b = torch.tensor([[9, 8, 7, 6, 5]]), torch.tensor([[4, 3]])
    batch = torch.tensor([[9, 8, 7, 6, 5], [0, 0, 0, 4, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    together = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(together[0], model.generate(a, max_new_tokens=8, do_sample=False)[0])
    assert torch.equal(together[1, 3:], model.generate(b, max_new_tokens=8, do_sample=False)[0])


def test_sampling_options_are_seeded_and_respected(trained):
    prompt = torch.tensor([PATTERN[:4]])
    kwargs = {"do_sample": True, "temperature": 0.8, "top_k": 5, "top_p": 0.9, "repetition_penalty": 1.3,
              "max_new_tokens": 12}
    torch.manual_seed(7)
    first = trained.generate(prompt, **kwargs)
    torch.manual_seed(7)
    again = trained.generate(prompt, **kwargs)
    assert torch.equal(first, again) and first.shape == (1, 16)
    torch.manual_seed(7)
    top1 = trained.generate(prompt, do_sample=True, top_k=1, max_new_tokens=12)
    assert torch.equal(top1, trained.generate(prompt, do_sample=False, max_new_tokens=12))


def test_text_streamer_prints_the_generation(capsys):
    vocab = {chr(ord("a") + i): i for i in range(26)} | {"[UNK]": 26, "[PAD]": 27}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    model = make_model(vocab_size=28, pad_token_id=27)
    prompt = tokenizer("abc", return_tensors="pt").input_ids
    assert prompt.tolist() == [[0, 1, 2]]
    out = model.generate(prompt, max_new_tokens=5, do_sample=False, streamer=TextStreamer(tokenizer))
    printed = capsys.readouterr().out
    assert printed.replace(" ", "").strip() == tokenizer.decode(out[0]).replace(" ", "")


def test_solver_change_during_generation_is_refused():
    model = make_model()
    out = model(torch.tensor([[1, 2, 3]]), use_cache=True)
    model.config.inference_max_steps = 2
    with pytest.raises(ValueError, match="cache: filled with solver settings"):
        model(torch.tensor([[4]]), cache=out.cache)


def test_foreign_filled_cache_is_refused():
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8), 0)
    with pytest.raises(ValueError, match="not made by this model"):
        make_model()(torch.tensor([[1]]), cache=cache)


def test_fixed_point_cache_keeps_final_states_only(trained):
    trained.config.cache_mode = "fixed_point"
    try:
        prompt = torch.tensor([PATTERN[:6]])
        out = trained.generate(prompt, max_new_tokens=8, do_sample=False, output_scores=True,
                               return_dict_in_generate=True)
        assert out.cache.mode == "fixed_point" and len(out.cache.layers) == 1
        # the prompt is solved in one piece, exactly like the full forward (same tolerance and steps)
        trained.config.inference_tol = trained.config.tol
        with torch.no_grad():
            full = trained(prompt).logits[:, -1]
        torch.testing.assert_close(out.scores[0], full)
    finally:
        trained.config.cache_mode = "exact"
        trained.config.inference_tol = None


@pytest.mark.parametrize("solver", ["anderson", "broyden", "picard"])
def test_classic_deq_generation_uses_the_exact_cache_too(solver):
    model = make_model(solver=solver, adjoint="implicit")
    prompt = torch.tensor([[1, 2, 3]])
    out = model.generate(prompt, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert out.cache.mode == "exact" and len(out.cache.layers) == 1 + model.config.eval_max_steps
    diff, scale = greedy_scores_vs_full_forward(model, prompt, new=5)
    assert diff <= 1e-4 * scale


def test_growing_cache_layer_equals_concatenation_through_crop_and_reorder():
    from transformers.cache_utils import DynamicLayer

    from revdeq_cli.model.cache import GrowingLayer

    torch.manual_seed(0)
    growing, reference = GrowingLayer(), DynamicLayer()
    for step, length in enumerate([5, 1, 1, 40, 1, 30]):
        k, v = torch.randn(2, 3, length, 4), torch.randn(2, 3, length, 4)
        got, want = growing.update(k, v), reference.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        if step == 2:
            growing.crop(-2)
            reference.crop(-2)
        if step == 4:
            growing.reorder_cache(torch.tensor([1, 0]))
            reference.reorder_cache(torch.tensor([1, 0]))
    assert growing.get_seq_length() == reference.get_seq_length() == 76


@pytest.mark.parametrize("cache_mode", ["exact", "fixed_point"])
def test_no_grad_forward_returns_ordinary_tensors_and_its_cache_works_with_autograd(cache_mode):
    # Without autograd the model solves in inference mode; what it hands back must still behave normally.
    model = make_model(cache_mode=cache_mode).train()
    ids = torch.randint(1, VOCAB, (2, 6))
    with torch.no_grad():
        out = model(ids, use_cache=True)
    assert not out.logits.is_inference()
    out.logits[0, 0, 0] = 1.0  # in-place edits of the returned logits are allowed
    step = model(ids[:, :1], cache=out.cache)  # continue the no-grad cache with autograd on
    step.logits.sum().backward()
    assert model.blocks[0].attn.c_attn.weight.grad.abs().sum() > 0
    out.cache.reorder_cache(torch.tensor([1, 0]))
    with torch.no_grad():
        again = model(ids[:, :1], cache=step.cache)
    assert again.cache.get_seq_length() == 8 and torch.isfinite(again.logits).all()
    with torch.no_grad():  # the cache's own update, called outside the model (no inference mode)
        keys = torch.randn(2, 4, 1, 8)
        got, _ = again.cache.update(keys, keys, 0)
    assert got.shape[-2] == 9 and torch.equal(got[:, :, -1:], keys)
