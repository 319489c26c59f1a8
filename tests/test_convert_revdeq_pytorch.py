"""`revdeq convert --from revdeq-pytorch`: the earlier port's model.pt, read without executing its pickle."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from revdeq_cli.errors import CheckpointError, UserError
from revdeq_cli.interop.convert import REVDEQ_PYTORCH_NAMES, convert_revdeq_pytorch
from revdeq_cli.interop.revdeq_pytorch import legacy_config_to_revdeq, read_revdeq_pytorch

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "revdeq-pytorch"
MODEL_PT = FIXTURES / "model.pt"
needs_fixture = pytest.mark.skipif(
    not MODEL_PT.is_file(), reason=f"fixture {MODEL_PT} absent (CI clones shared/ beside the repo)"
)


class _Evil:
    """Pickles to `os.system("touch MARKER")`: what a hostile checkpoint from the internet looks like."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _legacy_state(hidden=8, heads=2, inter=16, positions=12, vocab=20, bias=False) -> dict:
    """A state dict with the port's names and shapes (seeded), for hand-made files."""
    g = torch.Generator().manual_seed(0)
    shapes = {
        "token_embedding.weight": (vocab, hidden), "position_embedding.weight": (positions, hidden),
        "layer.attention.in_proj_weight": (3 * hidden, hidden), "layer.attention.out_proj.weight": (hidden, hidden),
        "layer.ffn.0.weight": (inter, hidden), "layer.ffn.2.weight": (hidden, inter),
        "layer.norm1.weight": (hidden,), "layer.norm1.bias": (hidden,), "layer.norm2.weight": (hidden,),
        "layer.norm2.bias": (hidden,), "ln_f.weight": (hidden,), "ln_f.bias": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    if bias:
        shapes |= {"layer.attention.in_proj_bias": (3 * hidden,), "layer.attention.out_proj.bias": (hidden,),
                   "layer.ffn.0.bias": (inter,), "layer.ffn.2.bias": (hidden,)}
    return {k: torch.randn(s, generator=g) * 0.2 for k, s in shapes.items()}


def _legacy_config(hidden=8, heads=2, inter=16, positions=12, vocab=20, bias=False) -> dict:
    return {"hidden_size": hidden, "num_heads": heads, "intermediate_size": inter,
            "max_position_embeddings": positions, "vocab_size": vocab, "layer_norm_eps": 1e-5, "use_bias": bias,
            "num_fixed_point_iterations": 3, "fixed_point_tol": 1e-3, "use_reversible": True, "beta": 0.5}


# ------------------------------------------------------------------------------------------ the fixture
@needs_fixture
def test_fixture_reads_without_executing_and_matches_expected():
    expected = json.loads((FIXTURES / "model.expected.json").read_text())
    legacy = read_revdeq_pytorch(MODEL_PT)
    assert legacy.config == expected["config"]
    assert set(legacy.state_dict) == set(expected["tensors"])
    for name, info in expected["tensors"].items():
        t = legacy.state_dict[name]
        assert list(t.shape) == info["shape"] and str(t.dtype) == f"torch.{info['dtype']}"
        assert t.double().sum().item() == pytest.approx(info["sum"], rel=1e-6, abs=1e-6)
        assert t.flatten()[0].item() == pytest.approx(info["first"], rel=1e-7)
    # The allowance for the port's config class is scoped to the load: nothing leaks into torch's globals.
    assert not any("revdeq" in str(g) for g in torch.serialization.get_safe_globals())


@needs_fixture
def test_fixture_converts_to_a_model_automodel_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    import revdeq_cli  # noqa: F401  (registers the Auto classes)

    expected = json.loads((FIXTURES / "model.expected.json").read_text())
    dest = tmp_path / "converted"
    result = convert_revdeq_pytorch(MODEL_PT, dest)
    assert result.dest == dest and {"config.json", "model.safetensors"} <= {n for n, _ in result.files}
    assert not list(tmp_path.glob(".converted.tmp-*"))
    model = AutoModelForCausalLM.from_pretrained(dest)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.vocab_size) == (32, 4, 128, 96)
    assert (cfg.solver, cfg.adjoint, cfg.beta, cfg.max_steps, cfg.tol, cfg.bias) == (
        "reversible", "reversible", 0.5, 4, 1e-3, False)
    ours = model.state_dict()
    for theirs, info in expected["tensors"].items():
        t = ours[REVDEQ_PYTORCH_NAMES[theirs]]
        assert list(t.shape) == info["shape"]
        assert t.double().sum().item() == pytest.approx(info["sum"], rel=1e-6, abs=1e-6)
        assert t.flatten()[0].item() == pytest.approx(info["first"], rel=1e-7)
    with torch.no_grad():
        out = model(torch.randint(0, 96, (2, 10)))
    assert out.logits.shape == (2, 10, 96) and torch.isfinite(out.logits).all()


@needs_fixture
def test_fixture_dtype_conversion(tmp_path):
    from safetensors import safe_open

    result = convert_revdeq_pytorch(MODEL_PT, tmp_path / "bf16", dtype="bfloat16")
    assert result.dtype == "bfloat16"
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


# ------------------------------------------------------------------------------- numerics of the mapping
class _LegacyBlock(nn.Module):
    """The port's block as its README describes it: z + Attn(LN1(z + x)), then + FFN(LN2(z)); torch's
    nn.MultiheadAttention with the packed in_proj weight."""

    def __init__(self, hidden, heads, inter, bias):
        super().__init__()
        self.attention = nn.MultiheadAttention(hidden, heads, bias=bias, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(hidden, inter, bias=bias), nn.GELU(), nn.Linear(inter, hidden, bias=bias))
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)

    def forward(self, z, x, mask):
        u = self.norm1(z + x)
        z = z + self.attention(u, u, u, attn_mask=mask, need_weights=False)[0]
        return z + self.ffn(self.norm2(z))


@pytest.mark.parametrize("bias", [False, True])
def test_converted_model_computes_what_the_port_computed(tmp_path, bias):
    """Same logits as an independent re-implementation of the port's forward (Picard from zero, N steps):
    a wrong split of the packed q/k/v weights or a swapped norm would not pass."""
    from revdeq_cli.model import RevDEQForCausalLM

    cfg, sd = _legacy_config(bias=bias), _legacy_state(bias=bias)
    cfg["use_reversible"] = False  # the port's plain iteration; ours: relaxed/unrolled, set to picard below
    path = tmp_path / "model.pt"
    torch.save({"model_state_dict": sd, "config": cfg}, path)
    convert_revdeq_pytorch(path, tmp_path / "out")
    ours = RevDEQForCausalLM.from_pretrained(tmp_path / "out").eval()
    ours.config.solver, ours.config.adjoint, ours.config.inference_tol = "picard", "unrolled", None
    ours.config.max_steps = ours.config.inference_max_steps = 3

    block = _LegacyBlock(8, 2, 16, bias).eval()
    block.load_state_dict({k.removeprefix("layer."): v for k, v in sd.items() if k.startswith("layer.")})
    ids = torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = sd["token_embedding.weight"][ids] + sd["position_embedding.weight"][torch.arange(7)]
        mask = torch.triu(torch.full((7, 7), float("-inf")), diagonal=1)
        z = torch.zeros_like(x)
        for _ in range(3):
            z = block(z, x, mask)
        z = nn.functional.layer_norm(z, (8,), sd["ln_f.weight"], sd["ln_f.bias"], 1e-5)
        reference = z @ sd["lm_head.weight"].T
        got = ours(ids).logits
    torch.testing.assert_close(got, reference, atol=2e-5, rtol=1e-4)


def test_config_mapping_matches_the_settings_aliases():
    mapped = legacy_config_to_revdeq(_legacy_config() | {"use_reversible": False})
    assert (mapped["solver"], mapped["adjoint"]) == ("relaxed", "unrolled")
    assert (mapped["max_steps"], mapped["tol"], mapped["num_attention_heads"]) == (3, 1e-3, 2)


# -------------------------------------------------------------------------------------- refusals
def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"model_state_dict": _legacy_state(), "config": _Evil(marker)}, path)  # saving runs nothing
    with pytest.raises(CheckpointError, match="posix.system|os.system") as err:
        read_revdeq_pytorch(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    with pytest.raises(CheckpointError):
        convert_revdeq_pytorch(path, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_plain_pickle_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(CheckpointError, match="not a zip-format torch file"):
        read_revdeq_pytorch(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda obj: obj["model_state_dict"].update({"layer.extra.weight": torch.zeros(2)}), "cannot map tensor"),
        (lambda obj: obj["model_state_dict"].pop("lm_head.weight"), "lacks tensors for lm_head.weight"),
        (lambda obj: obj["model_state_dict"].update({"lm_head.weight": torch.zeros(3, 3)}), "has shape"),
        (lambda obj: obj["config"].update({"rotary": True}), "unknown config field 'rotary'"),
        (lambda obj: obj["config"].update({"hidden_size": "8"}), "wrong type"),
        (lambda obj: obj.update({"surprise": 1}), "unknown top-level entries"),
        (lambda obj: obj["config"].update({"num_heads": 3}), "does not make a valid revdeq model"),
    ],
)
def test_unmappable_files_are_refused_and_nothing_is_written(tmp_path, edit, match):
    obj = {"model_state_dict": _legacy_state(), "config": _legacy_config()}
    edit(obj)
    path = tmp_path / "model.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=match) as err:
        convert_revdeq_pytorch(path, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_optimizer_state_is_ignored_not_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"model_state_dict": _legacy_state(), "config": _legacy_config(),
                "optimizer_state_dict": {"state": {}, "param_groups": []}, "epoch": 2}, path)
    result = convert_revdeq_pytorch(path, tmp_path / "out")
    assert result.ignored == ["optimizer_state_dict", "epoch"]


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"model_state_dict": _legacy_state(), "config": _legacy_config()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        read_revdeq_pytorch(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_existing_dest_is_never_overwritten(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"model_state_dict": _legacy_state(), "config": _legacy_config()}, path)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        convert_revdeq_pytorch(path, dest)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]


def test_zip_without_pickle_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/readme.txt", "hello")
    with pytest.raises(CheckpointError, match=str(path)):
        read_revdeq_pytorch(path)
