"""The training loop on a tiny model over the offline pydoc corpus: exact resume, divergence, checkpoints,
TensorBoard, schedule and data order."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from revdeq_cli.errors import CheckpointError
from revdeq_cli.settings import Settings, resolve_settings
from revdeq_cli.training import checkpoint as ckpt
from revdeq_cli.training.callbacks import Callback
from revdeq_cli.training.data_order import BlockOrder
from revdeq_cli.training.loop import Trainer, TrainingDivergedError
from revdeq_cli.training.optim import LRSchedule
from revdeq_cli.training.progress import PlainProgress, StepStats
from revdeq_cli.training.tensorboard_log import TRAIN_TAGS, VAL_TAGS

TINY = [
    "model.hidden_size=32", "model.num_attention_heads=2", "model.intermediate_size=64",
    "solver.max_steps=2", "data.seq_len=32", "train.batch_size=4", "train.eval_batch_size=64", "train.lr=1e-2",
    "train.warmup_steps=2", "train.eval_batches=1", "train.keep_last=2", "log.progress=plain", "log.log_every=1",
]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A local corpus with its own small validation/test files (pydoc topics), and a token cache shared by
    the tests of this session, so each run prepares data in a fraction of a second."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("corpus")
    texts = [topics[k] for k in sorted(topics)]
    for name, part in (("train", texts[:40]), ("validation", texts[40:42]), ("test", texts[42:44])):
        (root / f"{name}.txt").write_text("\n\n".join(part), encoding="utf-8")
    return str(root), str(tmp_path_factory.mktemp("token-cache"))


@pytest.fixture(autouse=True)
def _use_small_corpus(small_corpus, monkeypatch):
    monkeypatch.setattr(__import__(__name__), "CORPUS", small_corpus, raising=False)


CORPUS: tuple[str, str] | None = None


def tiny_settings(out_dir, *sets: str, **flags) -> Settings:
    assert CORPUS is not None, "use the small_corpus fixture"
    base = {"train.out_dir": str(out_dir), "train.max_steps": 6, "train.eval_every": 3, "train.save_every": 2,
            "train.device": "cpu", "data.dataset": CORPUS[0], "data.cache_dir": CORPUS[1], "data.offline": True}
    base.update({k.replace("__", "."): v for k, v in flags.items()})
    return resolve_settings(sets=[*TINY, *sets], flags=base, environ={})


def run(settings: Settings, progress=None):
    trainer = Trainer(settings, info=_single(), device=torch.device("cpu"), progress=progress)
    return trainer.run()


def _single():
    from revdeq_cli.training.distributed import DistInfo

    return DistInfo()


class InterruptAt(PlainProgress):
    """Raises KeyboardInterrupt right after step `at` completes, like Ctrl-C between steps."""

    def __init__(self, at: int) -> None:
        super().__init__(log_every=1)
        self.at = at

    def update(self, stats: StepStats) -> None:
        super().update(stats)
        if stats.step == self.at:
            raise KeyboardInterrupt


def test_interrupted_and_resumed_run_reproduces_the_uninterrupted_losses(tmp_path):
    full = run(tiny_settings(tmp_path / "full"))
    assert [h["step"] for h in full.history] == [1, 2, 3, 4, 5, 6]

    with pytest.raises(KeyboardInterrupt):
        run(tiny_settings(tmp_path / "cut"), progress=InterruptAt(5))
    assert (tmp_path / "cut" / "checkpoint-000005").is_dir()  # saved on Ctrl-C, not a save_every step
    resumed = run(tiny_settings(tmp_path / "cut", train__resume="auto"))

    assert [h["step"] for h in resumed.history] == [6]
    for key in ("loss", "grad_norm", "lr"):
        assert resumed.history[-1][key] == full.history[-1][key], key  # bit-for-bit, not approximately
    assert resumed.final_val_loss == full.final_val_loss
    assert resumed.test_loss == full.test_loss
    a = ckpt.load_checkpoint(tmp_path / "full").model.state_dict()
    b = ckpt.load_checkpoint(tmp_path / "cut").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_directory_layout_and_load_checkpoint(tmp_path):
    summary = run(tiny_settings(tmp_path / "run"))
    run_dir = tmp_path / "run"
    names = sorted(p.name for p in run_dir.iterdir())
    # keep_last=2 of checkpoints 2, 4, 6; best/ and final/ stay; no temp dirs remain.
    assert names == ["best", "checkpoint-000004", "checkpoint-000006", "config.yaml", "final", "logs"]
    for d in ("checkpoint-000006", "best", "final"):
        files = {p.name for p in (run_dir / d).iterdir()}
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "training_state.pt"} <= files
    assert summary.final_checkpoint == run_dir / "final"
    assert ckpt.resolve_checkpoint(run_dir) == run_dir / "checkpoint-000006"

    model, tokenizer, settings, meta = ckpt.load_checkpoint(run_dir)
    assert meta["step"] == 6 and meta["path"] == str(run_dir / "checkpoint-000006")
    assert "optimizer" not in meta and "rng" not in meta
    assert settings.model.hidden_size == 32 and settings.train.out_dir == str(run_dir)
    assert not model.training and tokenizer("ab")["input_ids"]
    state = torch.load(run_dir / "final" / "training_state.pt", weights_only=True)
    assert state["step"] == 6 and "optimizer" in state and "rng" in state
    assert Settings.model_validate(__import__("yaml").safe_load((run_dir / "config.yaml").read_text())) == settings

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    # The run learned something: final validation loss well under the untrained ln(vocab).
    assert summary.final_val_loss < math.log(257) - 1.0
    # best/ is chosen among the validations on the split's prefix (train.eval_batches=1), like with like; the
    # final figure reads the whole split (test_validation_reads_a_prefix_during_training_and_the_whole_at_the_end)
    assert summary.best_val_step in (3, 6) and math.isfinite(summary.best_val_loss)
    assert summary.unigram_val_loss > 0


def test_tensorboard_event_files_hold_the_listed_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tiny_settings(tmp_path / "run"))
    acc = EventAccumulator(str(tmp_path / "run" / "logs"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert set(TRAIN_TAGS) | set(VAL_TAGS) | {"test/loss", "test/ppl"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in acc.Scalars("val/ppl")] == [3, 6]
    assert all(e.value > 0 for e in acc.Scalars("solver/backward_nfe"))  # 2 steps -> 4 backward evaluations


def test_non_finite_loss_stops_with_step_and_remedies_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from revdeq_cli.model import RevDEQForCausalLM

    real_forward = RevDEQForCausalLM.forward
    calls = {"train": 0}

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training:
            calls["train"] += 1
            if calls["train"] == 3:  # step 3's forward
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(RevDEQForCausalLM, "forward", forward)
    with pytest.raises(TrainingDivergedError) as err:
        run(tiny_settings(tmp_path / "run"))
    msg = str(err.value)
    assert "step 3" in msg and "checkpoint-000002" in msg
    assert "--lr 0.005" in msg and "--beta 0.25" in msg and "train.grad_clip=0.5" in msg
    assert "float64" not in msg  # the states already are float64: no advice that changes nothing
    assert err.value.step == 3
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path / "run")] == ["checkpoint-000002"]
    assert ckpt.load_checkpoint(tmp_path / "run").meta["step"] == 2


def test_checkpoint_written_during_a_crash_never_replaces_the_previous_good_one(tmp_path):
    from revdeq_cli.data import byte_tokenizer
    from revdeq_cli.model import RevDEQConfig, RevDEQForCausalLM

    model = RevDEQForCausalLM(RevDEQConfig.from_preset("tiny", vocab_size=257, hidden_size=32,
                                                       num_attention_heads=2, intermediate_size=64))
    tok = byte_tokenizer()
    run_dir = tmp_path / "run"
    good = ckpt.save_checkpoint(run_dir / "checkpoint-000002", model, tok, {"step": 2})
    ckpt.save_checkpoint(run_dir / "best", model, tok, {"step": 2})
    good_bytes = (good / "model.safetensors").read_bytes()

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    class Crash(Exception):
        pass

    real_save = model.save_pretrained

    def crashing_save(path, **kw):
        real_save(path, **kw)  # the weights are written ...
        raise Crash  # ... and the process dies before the checkpoint is complete

    model.save_pretrained = crashing_save
    for name in ("checkpoint-000004", "best"):
        with pytest.raises(Crash):
            ckpt.save_checkpoint(run_dir / name, model, tok, {"step": 4})
    assert (run_dir / "best" / "model.safetensors").read_bytes() == good_bytes  # old best intact
    assert not (run_dir / "checkpoint-000004").exists()
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []

    # A hard kill (no exception handler ran) leaves a hidden temp dir and maybe a truncated dir:
    # neither is ever picked, and the next run sweeps the temp dir away.
    stale = run_dir / ".checkpoint-000006.tmp-dead"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    (run_dir / "checkpoint-000008").mkdir()  # no config.json / weights: incomplete
    assert ckpt.resolve_checkpoint(run_dir) == good
    assert ckpt.load_checkpoint(run_dir).meta["step"] == 2
    assert ckpt.remove_stale_temp_dirs(run_dir) == [stale] and not stale.exists()


def test_resolve_checkpoint_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "training_state.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="training_state.pt"):
        ckpt.load_training_state(bad)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_with_float64_solver_states(tmp_path, precision):
    summary = run(tiny_settings(tmp_path / "run", train__precision=precision, train__max_steps=2,
                                train__save_every=0, train__eval_every=0))
    assert all(math.isfinite(h["loss"]) for h in summary.history)
    cfg = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert cfg["state_dtype"] == "float64"
    scaler = torch.load(tmp_path / "run" / "final" / "training_state.pt", weights_only=True)["scaler"]
    assert bool(scaler) == (precision == "fp16")  # fp16 alone carries a grad scaler (its scale resumes)


def test_epochs_and_tokens_limit_the_run(tmp_path):
    s = tiny_settings(tmp_path / "run", train__max_tokens=3 * 4 * 32, train__max_steps=None, train__save_every=0,
                      train__eval_every=0)
    assert s.train.max_steps is None  # a given limit replaces the default max_steps
    assert run(s).steps == 3


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LRSchedule(opt, kind="cosine", lr=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(14):
        lrs.append(sched.lr)
        sched.step()
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False)) and lrs[-1] > 0.1


def test_plateau_schedule_cuts_after_patience_and_round_trips():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LRSchedule(opt, kind="plateau", lr=1.0, warmup_steps=0, total_steps=10, plateau_factor=0.5,
                       plateau_patience=1)
    for loss in (3.0, 2.0, 2.5, 2.4):
        sched.observe(loss)
    assert sched.lr == 0.5  # two evaluations without improvement > patience 1
    other = LRSchedule(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0), kind="plateau", lr=1.0,
                       warmup_steps=0, total_steps=10)
    other.load_state_dict(sched.state_dict())
    assert other.lr == 0.5 and other.best_loss == 2.0


def test_block_order_is_deterministic_and_ranks_get_disjoint_equal_shards():
    one = BlockOrder(103, 4, seed=7)
    assert np.array_equal(one.epoch_indices(0), BlockOrder(103, 4, seed=7).epoch_indices(0))
    assert not np.array_equal(one.epoch_indices(0), one.epoch_indices(1))
    shards = [BlockOrder(103, 4, seed=7, rank=r, world_size=2).epoch_indices(0) for r in range(2)]
    assert shards[0].shape == shards[1].shape == (12, 4)
    assert not set(shards[0].ravel()) & set(shards[1].ravel())


@pytest.mark.parametrize(
    ("sets", "wanted", "unwanted"),
    [
        ([], ["--lr 0.002", "--beta 0.25", "train.grad_clip=0.5"], ["float64", "--precision"]),
        (["solver.state_dtype=float32", "train.grad_clip=0", "train.precision=fp16"],
         ["solver.state_dtype=float64, now float32", "train.grad_clip=1.0, now off", "--precision bf16"], []),
        (["train.precision=bf16"], ["--precision fp32, now bf16"], ["fp16"]),  # what auto picks on bf16 hardware
        (["solver.solver=picard"], ["--lr"], ["beta"]),
        (["solver.solver=explicit", "solver.state_dtype=float32"], ["--lr", "grad_clip"], ["beta", "float64"]),
    ],
)
def test_divergence_advice_names_only_changes_that_change_something(sets, wanted, unwanted):
    from revdeq_cli.training.remedies import divergence_remedies

    s = resolve_settings(sets=sets, environ={})
    advice = " ".join(divergence_remedies(s, is_deq=s.solver.solver != "explicit"))
    assert all(w in advice for w in wanted), advice
    assert not any(u in advice for u in unwanted), advice


def test_an_unset_warmup_follows_the_runs_length_when_tokens_end_it(tmp_path):
    s = tiny_settings(tmp_path / "run", "train.warmup_steps=auto", train__max_tokens=10 * 4 * 32,
                      train__max_steps=None, train__save_every=0, train__eval_every=0)
    assert s.train.warmup_steps is None  # the length depends on the data: the trainer resolves it
    lines = []

    class Lines(PlainProgress):
        def log(self, message: str) -> None:
            lines.append(message)

    summary = run(s, progress=Lines(log_every=1))
    assert summary.steps == 10
    assert any("warmup 1)" in line for line in lines), lines  # round(0.1 * 10 steps), in the run header
    stored = __import__("yaml").safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert stored["train"]["warmup_steps"] == 1
    state = torch.load(tmp_path / "run" / "final" / "training_state.pt", weights_only=False)
    assert state["settings"]["train"]["warmup_steps"] == 1  # a resumed run keeps it
    assert summary.history[0]["lr"] == pytest.approx(1e-2)  # one warmup step: full lr at once


def test_tensorboard_logs_the_last_step_whatever_log_every(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tiny_settings(tmp_path / "run", "log.log_every=4", train__save_every=0, train__eval_every=0))
    acc = EventAccumulator(str(tmp_path / "run" / "logs"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 4, 6]


class RecordsPositionGradients(Callback):
    """Sums, per row of the position embedding, the norm of every gradient it receives in training."""

    def on_start(self, trainer) -> None:
        wpe = trainer.model.wpe.weight
        self.position_grad = torch.zeros(wpe.shape[0], dtype=torch.float64)

        def record(grad: torch.Tensor) -> None:
            self.position_grad += grad.detach().norm(dim=1).double().cpu()

        wpe.register_hook(record)


def test_a_default_runs_checkpoint_declares_exactly_the_positions_it_trained_on(tmp_path):
    # Every setting but the width and the corpus is the default: data.seq_len unset, the tiny preset's context.
    settings = resolve_settings(
        sets=["model.hidden_size=32", "model.num_attention_heads=4", "train.batch_size=4", "train.eval_batches=1",
              "log.progress=plain"],
        flags={"train.out_dir": str(tmp_path / "run"), "train.max_steps": 3, "train.device": "cpu",
               "data.dataset": CORPUS[0], "data.cache_dir": CORPUS[1], "data.offline": True}, environ={})
    lines: list[str] = []
    progress = PlainProgress(log_every=1)
    progress.log = lines.append
    recorder = RecordsPositionGradients()
    Trainer(settings, info=_single(), device=torch.device("cpu"), progress=progress, callbacks=[recorder]).run()
    model, tokenizer, saved, _ = ckpt.load_checkpoint(tmp_path / "run")
    context = model.config.max_position_embeddings
    assert context == saved.data.seq_len == 128 == model.wpe.weight.shape[0]
    assert tokenizer.model_max_length == context
    assert json.loads((tmp_path / "run" / "final" / "tokenizer_config.json").read_text())["model_max_length"] == 128
    assert (recorder.position_grad > 0).all(), "a declared position row received no gradient"
    assert "context: the saved model declares 128 positions, the sequence length it trains on" in lines


def test_a_given_context_longer_than_seq_len_is_kept_and_the_header_warns_once(tmp_path):
    lines: list[str] = []
    progress = PlainProgress(log_every=1)
    progress.log = lines.append
    settings = tiny_settings(tmp_path / "run", "model.max_position_embeddings=48", train__max_steps=2,
                             train__eval_every=0)
    Trainer(settings, info=_single(), device=torch.device("cpu"), progress=progress).run()
    warned = [line for line in lines if "get no training" in line]
    assert len(warned) == 1 and "declares 48 positions" in warned[0] and "positions 32..47" in warned[0]
    assert ckpt.load_checkpoint(tmp_path / "run").model.config.max_position_embeddings == 48


def test_backward_solve_divergence_is_named_with_its_own_remedies(tmp_path, monkeypatch):
    """A non-finite residual in the implicit gradient's backward solve names that solve and its settings, not
    the forward solver's beta."""
    from revdeq_cli import deq

    def diverging_backward(self, *args, **kwargs):
        raise deq.SolverDivergedError(7, where="backward")

    s = tiny_settings(tmp_path / "run", "solver.solver=anderson")
    assert s.solver.adjoint == "implicit"
    monkeypatch.setattr(deq.ImplicitAdjoint, "run", diverging_backward)
    with pytest.raises(TrainingDivergedError) as err:
        run(s)
    msg = str(err.value)
    assert "backward solve (step 7)" in msg and "solver.implicit_max_steps=" in msg and "--adjoint phantom" in msg
    assert "beta" not in msg


def test_a_callback_sets_the_lr_and_ends_the_run_early_as_a_finished_one(tmp_path):
    """`set_lr` replaces the schedule's rate for the next step only; `request_finish` from `on_step` makes the
    step just taken the last: no in-loop validation or save at it, then the usual end (full validation, test,
    final checkpoint at that step)."""
    events: list[tuple] = []

    class Budget(Callback):
        def on_start(self, trainer) -> None:
            events.append(("start", trainer.step))
            trainer.set_lr(1e-3)  # step 1's rate, in place of the warmup's 5e-3

        def on_step(self, trainer, record) -> None:
            events.append(("step", record["step"]))
            if record["step"] == 2:  # a save_every step: the final checkpoint is its only save
                trainer.request_finish()

        def on_evaluation(self, trainer, split, loss) -> None:
            events.append((split, trainer.step))

    settings = tiny_settings(tmp_path / "run", train__eval_every=1)
    summary = Trainer(settings, info=_single(), device=torch.device("cpu"), callbacks=[Budget()]).run()
    assert events == [("start", 0), ("step", 1), ("validation-prefix", 1), ("step", 2), ("validation-prefix", 2),
                      ("validation", 2), ("test", 2)]
    assert summary.steps == 2 and summary.total_steps == 6 and [h["step"] for h in summary.history] == [1, 2]
    assert summary.history[0]["lr"] == pytest.approx(1e-3)
    assert summary.history[1]["lr"] == pytest.approx(1e-2)  # the schedule's again (warmup step 2 of 2)
    assert summary.final_val_loss is not None and summary.test_loss is not None
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path / "run")] == ["checkpoint-000002"]
    assert summary.final_checkpoint == tmp_path / "run" / "final"
    assert ckpt.load_checkpoint(tmp_path / "run" / "final").meta["step"] == 2


@pytest.mark.parametrize("native, chosen", [(torch.bfloat16, "bf16"), (None, "fp32")])
def test_auto_precision_is_bf16_only_where_the_device_has_it_and_the_run_stores_its_choice(tmp_path, monkeypatch,
                                                                                         native, chosen):
    from revdeq_cli.training import precision as train_precision

    monkeypatch.setattr(train_precision, "native_low_precision", lambda device: native)
    settings = tiny_settings(tmp_path / "run", train__max_steps=2, train__save_every=0, train__eval_every=0)
    assert settings.train.precision == "auto"  # the default
    trainer = Trainer(settings, info=_single(), device=torch.device("cpu"))
    assert trainer.precision == chosen
    assert trainer._autocast_dtype == (torch.bfloat16 if chosen == "bf16" else None)
    trainer.run()
    # the run's files name the format it trained in, so a resume on another machine keeps it
    stored = torch.load(tmp_path / "run" / "final" / "training_state.pt", weights_only=True)["settings"]
    assert stored["train"]["precision"] == chosen
    assert f"precision: {chosen}" in (tmp_path / "run" / "config.yaml").read_text()
    # an explicit format is never changed
    assert train_precision.resolve_precision("fp16", torch.device("cpu")) == "fp16"
    assert train_precision.resolve_precision("fp32", torch.device("cpu")) == "fp32"


@pytest.mark.parametrize("precision, native, warns", [("bf16", None, True), ("bf16", torch.bfloat16, False),
                                                      ("fp32", None, False), ("auto", None, False)])
def test_bf16_on_a_cpu_that_emulates_it_is_warned_about_once(tmp_path, monkeypatch, precision, native, warns):
    from revdeq_cli.training import precision as train_precision

    monkeypatch.setattr(train_precision, "native_low_precision", lambda device: native)
    lines: list[str] = []
    progress = PlainProgress(log_every=1)
    progress.log = lines.append
    settings = tiny_settings(tmp_path / "run", train__precision=precision, train__max_steps=2, train__save_every=0,
                             train__eval_every=0)
    Trainer(settings, info=_single(), device=torch.device("cpu"), progress=progress).run()
    warned = [line for line in lines if "emulated" in line]
    assert len(warned) == int(warns)
    if warns:
        assert warned[0].startswith("warning: train.precision bf16") and "--precision auto" in warned[0]
    # never on another device type: a CUDA device without bf16 is the user's explicit choice, and is not emulated
    assert train_precision.emulated_precision_warning("bf16", torch.device("cuda")) is None


@pytest.mark.parametrize("cap", [1, 10_000])
def test_validation_reads_a_prefix_during_training_and_the_whole_at_the_end(small_corpus, tmp_path, cap):
    """train.eval_batches caps the validations during training (and the one at the end that competes for
    best/); the final figure always reads the whole split. A cap the split does not reach is the whole split."""
    from revdeq_cli.training.callbacks import Callback

    losses = []

    class Record(Callback):
        def on_evaluation(self, trainer, split, loss) -> None:
            losses.append((split, trainer.step, loss))

    settings = tiny_settings(tmp_path / "run", f"train.eval_batches={cap}", train__max_steps=2, train__eval_every=1)
    trainer = Trainer(settings, info=_single(), device=torch.device("cpu"), callbacks=[Record()])
    summary = trainer.run()
    whole = trainer.evaluate("validation")
    if cap == 1:
        assert [(s, n) for s, n, _ in losses] == [("validation-prefix", 1), ("validation-prefix", 2),
                                                  ("validation", 2), ("test", 2)]
        assert losses[1][2] == trainer.evaluate("validation", 1) != whole
        assert summary.best_val_loss == min(losses[0][2], losses[1][2])
    else:
        assert [(s, n) for s, n, _ in losses] == [("validation", 1), ("validation", 2), ("test", 2)]
        assert summary.best_val_loss == min(losses[0][2], losses[1][2])
    assert summary.final_val_loss == whole
