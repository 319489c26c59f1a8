"""Model directories that travel: generated remote code (trust_remote_code without revdeq) and the
generation_config.json that makes `generate` sample like `revdeq generate`."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from revdeq_cli.checkpoints import link_checkpoint, save_checkpoint
from revdeq_cli.data.tokenizer import byte_tokenizer
from revdeq_cli.model import RevDEQConfig, RevDEQForCausalLM
from revdeq_cli.model.remote_code import AUTO_MAP, SELF_NAME, generate_remote_code
from revdeq_cli.sampling import SAMPLING

PROMPT = [[5, 17, 42, 99, 3, 250], [7, 7, 8, 1, 0, 64]]
NEW_TOKENS = 6

# Runs in a fresh interpreter: `import revdeq_cli` raises ImportError (a meta-path blocker installed before
# anything else is imported, the working directory away from the repository), then loads the directory with
# the Auto classes and trust_remote_code, and saves what it computed for the test to compare.
_NO_REVDEQ = """
import sys

class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name == "revdeq_cli" or name.startswith("revdeq_cli."):
            raise ImportError("revdeq_cli is blocked in this test")
        return None

sys.meta_path.insert(0, _Blocker())
try:
    import revdeq_cli  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("revdeq_cli is importable: the test would prove nothing")
"""
_REMOTE_SCRIPT = _NO_REVDEQ + """
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

directory, out_path = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
prompt = torch.tensor(PROMPT)
with torch.no_grad():
    out = model(prompt, use_cache=True)
    cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                            max_new_tokens=NEW_TOKENS, use_cache=True)
    uncached = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=NEW_TOKENS, use_cache=False)
    step = model(cached[:, -1:], cache=out.cache, use_cache=True).logits
assert "revdeq_cli" not in " ".join(sys.modules), sorted(m for m in sys.modules if "revdeq_cli" in m)
torch.save({
    "config_class": type(config).__module__ + "." + type(config).__name__,
    "model_class": type(model).__module__ + "." + type(model).__name__,
    "logits": out.logits, "cache_keys": [layer.keys.clone() for layer in out.cache.layers],
    "cache_values": [layer.values.clone() for layer in out.cache.layers], "step_logits": step,
    "cached": cached, "uncached": uncached, "encoded": tokenizer("hello")["input_ids"],
    "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
    "generation_config": model.generation_config.to_dict(),
}, out_path)
"""


def _remote_env(tmp_path: Path) -> dict[str, str]:
    """The environment of the fresh interpreter: its own dynamic-module cache, nothing of the repository."""
    env = dict(os.environ)
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf-modules")
    empty = tmp_path / "empty-path"
    empty.mkdir(exist_ok=True)
    env["PYTHONPATH"] = str(empty)
    return env


def _run_remote(directory: Path, tmp_path: Path, source: str = _REMOTE_SCRIPT) -> dict:
    script = tmp_path / "remote_load.py"
    script.write_text(f"PROMPT = {PROMPT!r}\nNEW_TOKENS = {NEW_TOKENS}\n" + textwrap.dedent(source))
    out = tmp_path / "remote_out.pt"
    run = subprocess.run([sys.executable, str(script), str(directory), str(out)], cwd=tmp_path / "empty-path",
                         env=_remote_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return torch.load(out, weights_only=True)


def _package_outputs(model: RevDEQForCausalLM) -> dict:
    model.eval()
    prompt = torch.tensor(PROMPT)
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=NEW_TOKENS)
        cached = model.generate(prompt, use_cache=True, **kwargs)
        uncached = model.generate(prompt, use_cache=False, **kwargs)
        step = model(cached[:, -1:], cache=out.cache, use_cache=True).logits
    return {"logits": out.logits, "cache_keys": [layer.keys.clone() for layer in out.cache.layers],
            "cache_values": [layer.values.clone() for layer in out.cache.layers], "step_logits": step,
            "cached": cached, "uncached": uncached}


def _tiny_model(solver: str = "reversible", positions: int = 32) -> RevDEQForCausalLM:
    torch.manual_seed(0)
    tok = byte_tokenizer()
    extra = {"num_hidden_layers": 2} if solver == "explicit" else {}
    config = RevDEQConfig(vocab_size=260, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                          max_position_embeddings=positions, solver=solver, adjoint="unrolled" if solver != "reversible"
                          else "reversible", max_steps=3, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, **extra)
    return RevDEQForCausalLM(config)


def _assert_same(remote: dict, package: dict) -> None:
    for key in ("logits", "step_logits", "cached", "uncached"):
        assert torch.equal(remote[key], package[key]), key
    assert len(remote["cache_keys"]) == len(package["cache_keys"]) > 1
    for a, b in zip(remote["cache_keys"] + remote["cache_values"], package["cache_keys"] + package["cache_values"],
                    strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ the generator
def test_generated_files_are_the_package_modules_with_relative_imports():
    """No hand-kept copy: each file is its source module, line for line, except its revdeq_cli imports; every
    relative import names a generated file; no import of revdeq_cli remains."""
    def read(module: str) -> str:
        return Path(importlib.util.find_spec(module).origin).read_text()

    files = generate_remote_code()
    names = {f.name for f in files}
    assert {"configuration_revdeq.py", "modeling_revdeq.py", "revdeq_deq.py", "revdeq_errors.py",
            "revdeq_model_block.py", "revdeq_model_cache.py", "revdeq_deq_adjoints.py"} <= names
    for f in files:
        source = read(f.module)
        if generate_remote_code()[[g.name for g in files].index(f.name)].text != f.text and read(f.module) != source:
            continue  # edited while the test ran (a shared working tree): nothing to compare against
        kept = [line for number, line in enumerate(source.splitlines(), 1)
                if number not in _package_import_lines(source)]
        remaining = iter(f.text.splitlines())
        for line in kept:  # every other line of the source, in order
            assert any(line == g for g in remaining), (f.name, line)
        for node in ast.walk(ast.parse(f.text)):
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("revdeq_cli") for a in node.names), f.name
            elif isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("revdeq_cli"), (f.name, node.module)
                if node.level:
                    assert node.level == 1 and f"{node.module}.py" in names, (f.name, node.module)


def _package_import_lines(source: str) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        module = node.module if isinstance(node, ast.ImportFrom) else (
            node.names[0].name if isinstance(node, ast.Import) else None)
        if module and module.startswith("revdeq_cli"):
            lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return lines


def test_generated_code_follows_the_live_modules(monkeypatch, tmp_path):
    """The generator reads the modules at save time: a change to a source module shows up in the files."""
    from revdeq_cli.model import remote_code

    real = remote_code._source_path
    edited = tmp_path / "block.py"
    edited.write_text(Path(real("revdeq_cli.model.block")).read_text() + "\nMARKER = 'changed at save time'\n")
    monkeypatch.setattr(remote_code, "_source_path",
                        lambda m: edited if m == "revdeq_cli.model.block" else real(m))
    block = {f.name: f.text for f in generate_remote_code()}["revdeq_model_block.py"]
    assert "MARKER = 'changed at save time'" in block
    assert importlib.util.find_spec("revdeq_cli.model.block") is not None


def test_module_bound_to_a_name_gets_the_self_line():
    files = {f.name: f.text for f in generate_remote_code()}
    assert f"from .revdeq_deq import {SELF_NAME} as deq" in files["modeling_revdeq.py"]
    assert f"{SELF_NAME} = _sys.modules[__name__]" in files["revdeq_deq.py"]


# ------------------------------------------------------------------------------------------ saved directories
@pytest.mark.parametrize("solver", ["reversible", "explicit"])
def test_checkpoint_loads_with_trust_remote_code_without_revdeq(tmp_path, solver):
    """Bit-for-bit logits, exact KV cache and greedy generations (cached and uncached) in a Python where
    revdeq_cli cannot be imported; best/ (a copy of a checkpoint) carries the same files."""
    model = _tiny_model(solver)
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoint-000001", model, byte_tokenizer(), {"step": 1})
    best = link_checkpoint(ckpt, tmp_path / "run" / "best")
    config = json.loads((best / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    remote = _run_remote(best, tmp_path)
    assert remote["config_class"].startswith("transformers_modules.") and remote["config_class"].endswith(
        "configuration_revdeq.RevDEQConfig")
    assert remote["model_class"].endswith("modeling_revdeq.RevDEQForCausalLM")
    _assert_same(remote, _package_outputs(model))
    tok = byte_tokenizer()
    assert remote["encoded"] == tok("hello")["input_ids"]
    assert (remote["eos"], remote["pad"]) == (tok.eos_token_id, tok.pad_token_id)
    assert remote["generation_config"]["do_sample"] is True
    assert remote["generation_config"]["temperature"] == SAMPLING.temperature


def test_adaptive_depth_acts_in_a_model_loaded_with_trust_remote_code(tmp_path):
    """config.json's inference_tol / inference_max_steps: each position stops at its own residual in
    forward and generate, in a Python without revdeq as with it (same logits, cache and generations)."""
    model = _tiny_model()
    model.config.update({"inference_max_steps": 12, "inference_tol": 0.3})
    model.eval()
    with torch.no_grad():
        steps = model(torch.tensor(PROMPT)).solver_position_steps
    assert 1 <= int(steps.min()) < int(steps.max()) < 12  # positions stop at different steps
    ckpt = save_checkpoint(tmp_path / "checkpoint-000001", model, byte_tokenizer(), None)
    assert json.loads((ckpt / "config.json").read_text())["inference_tol"] == 0.3
    remote = _run_remote(ckpt, tmp_path)
    _assert_same(remote, _package_outputs(model))
    assert torch.equal(remote["cached"], remote["uncached"])


def test_convert_from_revdeq_pytorch_output_loads_with_trust_remote_code(tmp_path):
    from revdeq_cli.interop.convert import convert_revdeq_pytorch

    torch.manual_seed(1)
    hidden, inter, vocab = 16, 32, 260
    shapes = {
        "token_embedding.weight": (vocab, hidden), "position_embedding.weight": (32, hidden),
        "layer.attention.in_proj_weight": (3 * hidden, hidden), "layer.attention.out_proj.weight": (hidden, hidden),
        "layer.ffn.0.weight": (inter, hidden), "layer.ffn.2.weight": (hidden, inter),
        "layer.norm1.weight": (hidden,), "layer.norm1.bias": (hidden,), "layer.norm2.weight": (hidden,),
        "layer.norm2.bias": (hidden,), "ln_f.weight": (hidden,), "ln_f.bias": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    state = {k: torch.randn(s) * 0.2 for k, s in shapes.items()}
    legacy = {"hidden_size": hidden, "num_heads": 2, "intermediate_size": inter, "max_position_embeddings": 32,
              "vocab_size": vocab, "layer_norm_eps": 1e-5, "use_bias": False, "num_fixed_point_iterations": 3,
              "fixed_point_tol": 1e-3, "use_reversible": True, "beta": 0.5}
    torch.save({"model_state_dict": state, "config": legacy}, tmp_path / "model.pt")
    dest = tmp_path / "converted"
    convert_revdeq_pytorch(tmp_path / "model.pt", dest, tokenizer="byte")
    assert json.loads((dest / "config.json").read_text())["auto_map"] == AUTO_MAP
    package = RevDEQForCausalLM.from_pretrained(dest)
    _assert_same(_run_remote(dest, tmp_path), _package_outputs(package))


def test_convert_checkpoint_output_carries_the_code(tmp_path):
    from revdeq_cli.interop.convert import convert_checkpoint

    model = _tiny_model()
    ckpt = save_checkpoint(tmp_path / "checkpoint-000001", model, byte_tokenizer(), {"step": 1})
    result = convert_checkpoint(ckpt, tmp_path / "out")
    names = {name for name, _ in result.files}
    assert {f.name for f in generate_remote_code()} <= names
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert json.loads((tmp_path / "out" / "config.json").read_text())["auto_map"] == AUTO_MAP


def test_with_the_package_both_loading_paths_agree(tmp_path):
    """With revdeq imported, loading without trust_remote_code keeps working (the registered model type), and
    with it transformers still picks the registered class (it prefers classes registered explicitly over a
    directory's code), so both give the package's model and the same logits. Without revdeq the generated code
    gives the same numbers bit for bit (test_checkpoint_loads_with_trust_remote_code_without_revdeq)."""
    model = _tiny_model()
    ckpt = save_checkpoint(tmp_path / "checkpoint-000001", model, byte_tokenizer(), {"step": 1})
    script = textwrap.dedent("""
        import sys, torch
        import revdeq_cli
        from transformers import AutoConfig, AutoModelForCausalLM
        assert type(AutoConfig.from_pretrained(sys.argv[1])).__module__ == "revdeq_cli.model.config"
        local = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
        remote = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        assert type(local).__module__ == "revdeq_cli.model.modeling", type(local).__module__
        assert type(remote) is type(local), type(remote).__module__
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        with torch.no_grad():
            a, b = local(ids).logits, remote(ids).logits
        assert torch.equal(a, b)
        torch.save(a, sys.argv[2])
    """)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf-modules"))
    run = subprocess.run([sys.executable, "-c", script, str(ckpt), str(tmp_path / "logits.pt")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with torch.no_grad():
        expected = model.eval()(torch.tensor([[1, 2, 3, 4, 5]])).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt", weights_only=True), expected)


# ------------------------------------------------------------------------------------------ generation config
def test_generation_config_carries_the_cli_sampling_defaults_and_special_ids(tmp_path):
    from transformers import GenerationConfig

    model = _tiny_model()
    tok = byte_tokenizer()
    ckpt = save_checkpoint(tmp_path / "checkpoint-000001", model, tok, None)
    saved = GenerationConfig.from_pretrained(ckpt)
    assert saved.do_sample is True
    assert (saved.temperature, saved.top_k, saved.top_p) == (SAMPLING.temperature, SAMPLING.top_k, SAMPLING.top_p)
    written = json.loads((ckpt / "generation_config.json").read_text())
    assert "max_new_tokens" not in written and "max_length" not in written  # the caller's length decides
    assert saved.repetition_penalty in (None, SAMPLING.repetition_penalty, 1.0)
    assert (saved.eos_token_id, saved.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)


def test_generate_and_pipeline_default_to_the_cli_sampling(tmp_path, monkeypatch):
    """`model.generate(**inputs)` with no sampling options samples exactly as `revdeq generate`'s defaults do
    (same seed, same tokens), and `pipeline("text-generation")` too; the length is the caller's to give."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from revdeq_cli.training.generation import generate_sample

    model = _tiny_model(positions=SAMPLING.max_new_tokens + 8)
    ckpt = save_checkpoint(tmp_path / "checkpoint-000001", model, byte_tokenizer(), None)
    loaded = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    prompt = [5, 17, 42]
    torch.manual_seed(123)
    cli = generate_sample(loaded, prompt, max_new_tokens=SAMPLING.max_new_tokens, temperature=SAMPLING.temperature,
                          top_k=SAMPLING.top_k, top_p=SAMPLING.top_p,
                          repetition_penalty=SAMPLING.repetition_penalty, eos_token_id=tok.eos_token_id)
    inputs = {"input_ids": torch.tensor([prompt]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    torch.manual_seed(123)
    with torch.no_grad():
        default = loaded.generate(**inputs, max_new_tokens=SAMPLING.max_new_tokens)
    assert default[0, 3:].tolist() == cli.token_ids
    torch.manual_seed(0)
    greedy = loaded.generate(**inputs, do_sample=False, max_new_tokens=20)
    torch.manual_seed(0)
    assert not torch.equal(loaded.generate(**inputs, max_new_tokens=20), greedy)  # sampling, not greedy
    text = tok.decode(prompt)
    pipe = pipeline("text-generation", model=loaded, tokenizer=tok)
    torch.manual_seed(123)
    generated = pipe(text, return_full_text=False, max_new_tokens=SAMPLING.max_new_tokens)[0]["generated_text"]
    assert generated == tok.decode(cli.token_ids, skip_special_tokens=True)


# Generated lengths after a 10-token prompt for a caller's max_length (a total) or max_new_tokens, cached and
# uncached; run in this interpreter and, through trust_remote_code, in one that cannot import revdeq.
_LENGTHS = """
def generated_lengths(model):
    import torch
    prompt = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 1, 64]])
    lengths = {}
    with torch.no_grad():
        for cache in (True, False):
            for key, value in (("max_length", 20), ("max_new_tokens", 5)):
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     use_cache=cache, **{key: value})
                assert model.generation_config.eos_token_id not in out[0, 10:].tolist()
                lengths[f"{key}={value}, cache {cache}"] = out.shape[1]
    return lengths
"""


@pytest.mark.parametrize("remote", [False, True], ids=["revdeq-installed", "trust-remote-code-without-revdeq"])
def test_a_saved_model_honours_the_callers_max_length_or_max_new_tokens(tmp_path, remote):
    """A saved generation_config.json once carried max_new_tokens=100, which transformers lets override a
    caller's max_length (evaluation harnesses pass max_length): generate(max_length=20) returned 110 tokens."""
    ckpt = save_checkpoint(tmp_path / "checkpoint-000001", _tiny_model(positions=128), byte_tokenizer(), None)
    if remote:
        lengths = _run_remote(ckpt, tmp_path, _NO_REVDEQ + _LENGTHS + """
from transformers import AutoModelForCausalLM
import torch
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
torch.save(generated_lengths(model), sys.argv[2])
""")
    else:
        from transformers import AutoModelForCausalLM

        namespace: dict = {}
        exec(_LENGTHS, namespace)
        model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
        assert type(model) is RevDEQForCausalLM
        lengths = namespace["generated_lengths"](model)
    assert lengths == {f"{key}, cache {cache}": total for cache in (True, False)
                       for key, total in (("max_length=20", 20), ("max_new_tokens=5", 15))}
