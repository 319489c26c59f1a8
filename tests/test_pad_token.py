"""Every saved tokenizer has a pad token (the end-of-text token), the model config agrees, and left-padded
batched generation from Python equals generating each prompt alone."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_helpers import trained_run, write_revdeq_pytorch_model

PROMPTS = ["def main(argv):", "x ="]  # different lengths: the shorter one is left-padded


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)[0]


def test_built_tokenizers_pad_with_end_of_text_on_the_left():
    from revdeq_cli.data.tokenizer import EOS_TOKEN, byte_tokenizer, train_bpe_tokenizer

    for tok in (byte_tokenizer(), train_bpe_tokenizer(["some text, some more text"] * 20, 300)):
        assert tok.pad_token == EOS_TOKEN and tok.pad_token_id == tok.eos_token_id
        assert tok.padding_side == "left"


def test_a_loaded_tokenizer_without_a_pad_token_gets_one(tmp_path):
    from revdeq_cli.data.tokenizer import byte_tokenizer, load_pretrained_tokenizer

    byte_tokenizer().save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)  # as saved before pad tokens were given, or a hub tokenizer such as gpt2
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_pretrained_tokenizer(str(tmp_path), local_only=True)
    assert tok.pad_token_id == tok.eos_token_id == 256


def test_trained_checkpoint_saves_a_pad_token_the_config_agrees_with(run):
    from transformers import AutoTokenizer

    ckpt = run / "checkpoint-000002"
    tok = AutoTokenizer.from_pretrained(ckpt)  # plain transformers, no revdeq code
    assert tok.pad_token is not None and tok.pad_token_id == tok.eos_token_id
    config = json.loads((ckpt / "config.json").read_text())
    assert config["pad_token_id"] == tok.pad_token_id and config["eos_token_id"] == tok.eos_token_id
    assert json.loads((ckpt / "generation_config.json").read_text())["pad_token_id"] == tok.pad_token_id


def test_load_checkpoint_gives_an_older_checkpoints_tokenizer_a_pad_token(run, tmp_path):
    from revdeq_cli.checkpoints import load_checkpoint

    ckpt = shutil.copytree(run / "checkpoint-000002", tmp_path / "old")
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_checkpoint(ckpt).tokenizer
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batched_generation_equals_per_prompt_generation(tmp_path, use_cache):
    from transformers import AutoTokenizer

    from revdeq_cli.checkpoints import save_checkpoint
    from revdeq_cli.data.tokenizer import byte_tokenizer
    from revdeq_cli.model import RevDEQConfig, RevDEQForCausalLM

    built = byte_tokenizer()
    config = RevDEQConfig.from_preset("tiny", vocab_size=len(built), hidden_size=32, num_attention_heads=2,
                                      intermediate_size=64, max_steps=3, eos_token_id=built.eos_token_id,
                                      pad_token_id=built.pad_token_id)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m", RevDEQForCausalLM(config), built, None)
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")  # as a user would, from the saved files
    model = RevDEQForCausalLM.from_pretrained(tmp_path / "m").eval()
    tok.padding_side = "left"
    batch = tok(PROMPTS, padding=True, return_tensors="pt")
    assert batch["attention_mask"][1, 0] == 0  # the shorter prompt really is left-padded
    kwargs = {"max_new_tokens": 6, "do_sample": False, "use_cache": use_cache}
    together = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1]:]
    for i, prompt in enumerate(PROMPTS):
        alone = tok(prompt, return_tensors="pt")
        expected = model.generate(**alone, **kwargs)[0, alone["input_ids"].shape[1]:]
        assert together[i].tolist() == expected.tolist(), prompt


def test_converted_models_config_agrees_with_their_tokenizers_pad_token(run, tmp_path):
    from transformers import AutoTokenizer

    from revdeq_cli.interop.convert import convert_checkpoint, convert_revdeq_pytorch

    # A checkpoint saved before pad tokens: neither its tokenizer nor its config has one.
    old = shutil.copytree(run / "checkpoint-000002", tmp_path / "old")
    for name, key in (("tokenizer_config.json", "pad_token"), ("config.json", "pad_token_id")):
        data = json.loads((old / name).read_text())
        data.pop(key, None)
        (old / name).write_text(json.dumps(data))
    # The earlier port's model.pt with a tokenizer given at conversion.
    write_revdeq_pytorch_model(tmp_path / "model.pt")
    convert_checkpoint(old, tmp_path / "a")
    convert_revdeq_pytorch(tmp_path / "model.pt", tmp_path / "b", tokenizer="byte")
    for dest in (tmp_path / "a", tmp_path / "b"):
        tok = AutoTokenizer.from_pretrained(dest)
        config = json.loads((dest / "config.json").read_text())
        assert tok.pad_token_id == tok.eos_token_id == config["pad_token_id"] == 256, dest
        assert json.loads((dest / "generation_config.json").read_text()).get("pad_token_id") == 256, dest
