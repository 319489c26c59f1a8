"""`RevDEQForCausalLM`: the Reversible DEQ language model (and its baselines) as a Hugging Face model.

    x      = wte(input_ids) + wpe(positions)                     [B, T, H]
    z*     = deq.solve(f, z0, x)         f = Block (block.py)     [B, T, H]
             z0 = 0 (init_state "zeros", the paper's) or x (init_state "input")
    logits = lm_head(ln_f(z*))                                   [B, T, V]

For `solver="explicit"` the model is an ordinary GPT: z = x, then `num_hidden_layers` untied blocks with no
further input injection (x enters once, as the initial state).

Which solve runs:

* training mode (`model.train()`): `tol`, `max_steps`;
* eval mode: `inference_max_steps` steps; with `inference_tol` set, adaptive depth: each position stops
  (freezes) once its own relative residual is below `inference_tol`, the solve ends when every position has
  (docs/DESIGN.md §7); padding positions (attention_mask 0) are frozen from the start;
* with a cache (`use_cache=True`, as `generate` does): exact mode runs the same per-position rule (each new
  position freezes at its tolerance, else runs `inference_max_steps` steps) and keeps the keys/values of every
  evaluation, a frozen position's held ones included (see cache.py), so it equals the full recomputation;
  fixed-point mode solves to `inference_tol` (else `tol`) per position.

Gradients come from the configured method (`adjoint`). With autograd off the result is the solver's own
output z[N] for every method (Implicit and Phantom would otherwise add the 1 or k evaluations that attach
their graph), so cached and uncached inference agree.

Every solver setting is read from `self.config` at call time. State-dict names: `wte.weight` [V, H],
`wpe.weight` [P, H], `blocks.{i}.*` (one block for a DEQ; names in block.py), `ln_f.weight`/`ln_f.bias`,
`lm_head.weight` [V, H] (absent from the file when tied to `wte.weight`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Cache, GenerationMixin, PreTrainedModel
from transformers import initialization as init

from revdeq_cli import deq
from revdeq_cli.deq.state import relative_residual
from revdeq_cli.errors import UserError
from revdeq_cli.model.block import MLP, AttentionMask, Block, CausalSelfAttention
from revdeq_cli.model.cache import EvaluationKeyValues, RevDEQCache
from revdeq_cli.model.config import INITIALIZER_RANGE, PER_POSITION_SOLVERS, RevDEQConfig
from revdeq_cli.model.decoding import solve_exact_cached, solve_fixed_point_cached
from revdeq_cli.model.outputs import EquilibriumProbe, RevDEQCausalLMOutput, SolverStats, lm_loss


class RevDEQPreTrainedModel(PreTrainedModel):
    config_class = RevDEQConfig
    config: RevDEQConfig
    base_model_prefix = "revdeq"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 initialisation: N(0, 0.02) (`INITIALIZER_RANGE`), biases 0; the blocks' output projections
        (`c_proj` of attention and MLP) with std 0.02 / sqrt(2 * layers)."""
        # The projections are marked in __init__: transformers v5 initialises each parameter once (it flags it),
        # children before parents, so re-initialising c_proj from its parent module would be silently skipped.
        if isinstance(module, nn.Linear) and getattr(module, "residual_projection", False):
            config = self.config
            std = INITIALIZER_RANGE / math.sqrt(2 * config.num_hidden_layers)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
            return
        super()._init_weights(module)


class RevDEQForCausalLM(RevDEQPreTrainedModel, GenerationMixin):
    """A causal language model whose body is one equilibrium block (or L stacked blocks, `solver="explicit"`).

    `forward(input_ids [B, T] long, ...)` returns `RevDEQCausalLMOutput`; `generate(...)` works as for any
    Hugging Face causal LM, with the per-evaluation key/value cache of cache.py.

    Positions are learned (`wpe`) for `max_position_embeddings` tokens, the context the model trained on.
    Past it `forward` (and so `generate`) raises a `UserError` naming the limit: transformers' `generate` has
    no way to crop the window for absolute positions, so keep prompt + `max_new_tokens` within the context.
    `revdeq generate` (`revdeq_cli.training.generation.generate_sample`) goes on past it by cropping the
    window to the last `max_position_embeddings` tokens, recomputed without the cache."""

    _tied_weights_keys = {"lm_head.weight": "wte.weight"}

    def __init__(self, config: RevDEQConfig):
        super().__init__(config)
        hidden = config.hidden_size
        self.wte = nn.Embedding(config.vocab_size, hidden)
        self.wpe = nn.Embedding(config.max_position_embeddings, hidden)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(hidden, config.num_attention_heads, config.intermediate_size, dropout=config.dropout,
                  bias=config.bias, eps=config.layer_norm_eps, skip=config.block_skip if config.is_deq else "state")
            for _ in range(config.num_hidden_layers)
        )
        for module in self.blocks.modules():
            if isinstance(module, (CausalSelfAttention, MLP)):
                module.c_proj.residual_projection = True  # see _init_weights
        self.ln_f = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False)
        self.last_solver_stats: SolverStats | None = None
        self.post_init()

    # ------------------------------------------------------------------ HF plumbing
    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def num_parameters_split(self) -> dict[str, int]:
        """Parameter counts: total (a tied head counted once), embedding (token + position embeddings) and
        non-embedding (everything else, an untied head included)."""
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        embedding = self.wte.weight.numel() + self.wpe.weight.numel()
        return {"total": total, "embedding": embedding, "non_embedding": total - embedding}

    def read_out(self, z: Tensor) -> Tensor:
        """Logits [B, T, V] read from states z [B, T, H]: lm_head(ln_f(z)) (what `forward` does with the solver's
        output; the training objective reads f(z_N) with it)."""
        return self.lm_head(self.ln_f(z))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        solver_steps: int | None = None,
        detached_steps: int | None = None,
        output_next_state: bool = False,
        **kwargs: Any,
    ) -> RevDEQCausalLMOutput | tuple:
        r"""Logits [B, T, V] for `input_ids` [B, T] (long).

        `labels` [B, T]: Hugging Face convention, shifted inside (position t predicts labels[t+1]).
        `shift_labels` [B, T]: already aligned targets (position t predicts shift_labels[t]). -100 is ignored;
        `loss` is the mean cross-entropy over the remaining targets (computed in float32).
        `cache` (`past_key_values` is accepted as the old name): continue from it; `use_cache` (default: True
        iff a cache is given) makes and returns one. `attention_mask` [B, past + T]: 1 = token, 0 = padding.
        `logits_to_keep` > 0 computes logits for the last that many positions only (ignored with labels).
        `solver_steps` / `detached_steps` (DEQ, no cache): this call's solver steps (training: the differentiated
        ones; eval: all of them, 0 = z0 itself) and steps run first without a graph, instead of the config's
        (`max_steps` / 0 in training, `eval_max_steps` in eval mode): the training objective passes the counts
        it drew (`revdeq_cli.training.objective`). `output_next_state` (DEQ, no cache) also returns `state`, the
        z [B, T, H] the logits read, and `next_state` = f(z) (one more evaluation of the block), both with their
        graphs, for the objective's terms at the solver's output. The config is not validated here: it was when
        it was made (`RevDEQConfig.check()`)."""
        config = self.config
        if input_ids is None:
            raise ValueError("input_ids is required (inputs_embeds is not supported by RevDEQForCausalLM)")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, length], got {tuple(input_ids.shape)}")
        if labels is not None and shift_labels is not None:
            raise ValueError("pass either labels (shifted inside) or shift_labels (already aligned), not both")
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = cache is not None
        cache = self._cache_for_call(cache) if use_cache else None
        past = cache.get_seq_length() if cache is not None else 0
        length = input_ids.shape[1]
        if attention_mask is not None and attention_mask.shape[-1] != past + length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions, expected {past + length} "
                f"({past} cached + {length} new)"
            )

        positions = self._positions(input_ids, past, attention_mask, position_ids)
        x = self.wte(input_ids) + self.wpe(positions)
        if self.training and config.dropout:  # (a module call per generated token otherwise)
            x = self.drop(x)
        mask = AttentionMask.build(past, length, attention_mask, x.device)
        # the positions that iterate under adaptive depth: padding never holds a solve up
        real = attention_mask[:, -length:].bool() if attention_mask is not None and not bool(attention_mask.all()) \
            else None

        steps = (solver_steps, detached_steps)
        if (steps != (None, None) or output_next_state) and (cache is not None or not config.is_deq):
            raise ValueError("solver_steps / detached_steps / output_next_state apply to a DEQ's full-sequence "
                             "forward (no cache)")
        if torch.is_grad_enabled():
            z, stats = self._body(x, mask, cache, steps, real)
        else:
            # Without autograd, inference mode also drops autograd's per-op bookkeeping: 10-20% of a cached
            # decoding step on CPU. The cache buffers written in here become inference tensors (only ever written
            # in here); z is cloned out so the logits returned are ordinary tensors a caller may modify in place.
            with torch.inference_mode():
                z, stats = self._body(x, mask, cache, steps, real)
            z = z.clone()
        self.last_solver_stats = stats
        # f(z) before the logits: the order the objective's terms were built in when they lived here, which fixes
        # the order autograd sums gradients in (the default run's losses are bit for bit those of revdeq 0.1)
        next_state = self.blocks[0](z, x, mask) if output_next_state else None

        hidden = self.ln_f(z)
        if labels is None and shift_labels is None and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        out = RevDEQCausalLMOutput(
            loss=lm_loss(logits, labels, shift_labels), logits=logits, cache=cache, solver_steps=stats.steps,
            solver_position_steps=stats.position_steps, solver_residual=stats.residual, solver_nfe=stats.nfe,
            solver_backward=stats.backward, state=z if output_next_state else None, next_state=next_state,
        )
        use_dict = return_dict if return_dict is not None else config.return_dict
        return out if use_dict else out.to_tuple()

    @torch.no_grad()
    def probe_equilibrium(self, input_ids: torch.LongTensor, solver_steps: int | None = None) -> EquilibriumProbe:
        """Solve `input_ids` [B, T] (long, no padding, no cache) as in eval mode, with `solver_steps` steps (None:
        the config's inference steps; 0: z0), and evaluate f once more at the result: the per-position picture
        behind a window's residual (`revdeq inspect --probe`). The train/eval mode is left as it was.
        Raises ValueError for a model without a solver."""
        if not self.config.is_deq:
            raise ValueError("probe_equilibrium needs a DEQ model; this one stacks explicit blocks")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, length], got {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        training = self.training
        self.eval()  # everything below in eval mode: no dropout in z, f(z) or the logits
        try:
            x = self.wte(input_ids) + self.wpe(self._positions(input_ids, 0, None, None))
            mask = AttentionMask.build(0, length, None, x.device)
            z, _ = self._solve_full(x, mask, solver_steps=solver_steps)
            fz = self.blocks[0](z, x, mask)
            logits = self.read_out(z)
        finally:
            self.train(training)
        hidden = z.shape[-1]
        residual = relative_residual(z.reshape(-1, hidden), fz.reshape(-1, hidden)).view(z.shape[:2])
        return EquilibriumProbe(x=x, z=z, fz=fz, residual=residual, logits=logits)

    # ------------------------------------------------------------------ pieces of forward
    def _body(self, x: Tensor, mask: AttentionMask, cache: RevDEQCache | None,
              steps: tuple[int | None, int | None] = (None, None),
              real: Tensor | None = None) -> tuple[Tensor, SolverStats]:
        """z [B, T, H] from the input injection x: the stacked blocks, or the equilibrium solve the cache calls for.
        `real` [B, T] bool (None: all): the non-padding positions, the ones adaptive depth iterates."""
        if not self.config.is_deq:
            return self._run_explicit(x, mask, cache)
        if cache is None:
            return self._solve_full(x, mask, *steps, real=real)
        if cache.mode == "exact":
            return solve_exact_cached(self, x, mask, cache, real)
        return solve_fixed_point_cached(self, x, mask, cache, real)

    def _positions(self, input_ids: Tensor, past: int, attention_mask: Tensor | None,
                   position_ids: Tensor | None) -> Tensor:
        """Position ids [B, T]: given, or counted over non-padding tokens, or past..past+T-1."""
        batch, length = input_ids.shape
        limit = self.config.max_position_embeddings
        if position_ids is None and (attention_mask is None or bool(attention_mask.all())):
            last = past + length  # no device sync needed for the common case
            position_ids = torch.arange(past, past + length, device=input_ids.device).expand(batch, -1)
        else:
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            last = int(position_ids.max()) + 1 if length else 0
        if last > limit:
            raise UserError(
                f"input_ids: {last} positions exceed the context length max_position_embeddings={limit}; "
                "shorten the input (or max_new_tokens)"
            )
        return position_ids

    def _cache_for_call(self, cache: Cache | None) -> RevDEQCache:
        """The cache to use: ours as given, a new one for None or an empty foreign cache (generate makes a
        DynamicCache with one layer per `num_hidden_layers`; ours needs one per evaluation of f)."""
        if isinstance(cache, RevDEQCache):
            return cache
        if cache is None or cache.get_seq_length() == 0:
            return RevDEQCache(self.config.cache_mode if self.config.is_deq else "exact")
        raise ValueError(
            f"cache: a filled {type(cache).__name__} was not made by this model; pass None or a RevDEQCache"
        )

    def _run_explicit(self, x: Tensor, mask: AttentionMask, cache: RevDEQCache | None) -> tuple[Tensor, SolverStats]:
        hook = EvaluationKeyValues(cache) if cache is not None else None
        z = x
        for block in self.blocks:
            z = block(z, None, mask, hook)
        layers = len(self.blocks)
        return z, SolverStats(steps=layers, residual=float("nan"), nfe=layers)

    def _solve_full(self, x: Tensor, mask: AttentionMask, solver_steps: int | None = None,
                    detached_steps: int | None = None, real: Tensor | None = None) -> tuple[Tensor, SolverStats]:
        config = self.config
        if self.training:
            tol, steps = config.tol, config.max_steps
        else:
            tol, steps = config.inference_tol, config.eval_max_steps
        steps = steps if solver_steps is None else int(solver_steps)
        detached = int(detached_steps or 0)
        if steps == 0 and detached == 0:
            return self._bypass(x, mask)
        # Without autograd every gradient method would give the solver's output z[N], except that Implicit and
        # Phantom attach their graph through 1 or k extra evaluations of f; plain iteration keeps the work and
        # the result equal to the cached path's.
        grad = torch.is_grad_enabled()
        per_position = not self.training and tol is not None
        readout = self._reads_midpoint()
        # adaptive depth under autograd: unrolled, the method that differentiates through each position's freezing;
        # the midpoint readout too (the reversible backward starts from z_N's cotangent alone)
        adjoint = self._adjoint() if grad and not (per_position or readout) else deq.UnrolledAdjoint()
        if steps == 0:  # only detached steps were asked for: they are the whole (graph-free) solve
            steps, detached = detached, 0
        # training stops the batch together at `tol` (if any); inference gives each position its own stop
        return self._solve(x, mask, None, tol=tol, max_steps=steps, adjoint=adjoint, detached_steps=detached,
                           per_position=per_position, real=real, readout=readout)

    def _z0(self, x: Tensor) -> Tensor:
        """The solver's start [B, T, H]: the input injection (init_state "input") or zeros."""
        return x if self.config.init_state == "input" else torch.zeros_like(x)

    def _bypass(self, x: Tensor, mask: AttentionMask, hook: Any = None) -> tuple[Tensor, SolverStats]:
        """0 solver steps: z = z0, the solver bypassed (its residual measured with one evaluation of f, the one
        a cache's layer 0 holds: `hook`)."""
        z = self._z0(x)
        with torch.no_grad():
            fz = self.blocks[0](z, x, mask, hook)
            residual = relative_residual(z.flatten(1), fz.flatten(1)).max()
        return z, SolverStats(steps=0, residual=float(residual), nfe=1,
                              position_steps=torch.zeros(x.shape[:2], dtype=torch.long, device=x.device))

    def _solve(self, x: Tensor, mask: AttentionMask, hook: Any, *, tol: float | None, max_steps: int,
               adjoint: deq.Adjoint, detached_steps: int = 0, per_position: bool = False,
               real: Tensor | None = None, z0: Tensor | None = None, readout: bool = False,
               readout_layer: int | None = None) -> tuple[Tensor, SolverStats]:
        """The equilibrium solve of f = the block over x [B, T, H] from z0 [B, T, H] (None: `_z0(x)`).
        `per_position` (needs tol): each position freezes at its own residual (deq.solve's groups; `real` [B, T]
        bool: the positions that iterate at all). `readout` (reversible solver): return the pair's midpoint
        (y_N + z_N) / 2 and its residual, from one more evaluation of f (`inference_readout`), which an exact
        cache's hook gives layer `readout_layer`."""
        block = self.blocks[0]
        shape = x.shape
        batch, length = shape[0], shape[1]
        groups, active = None, None
        if self.config.solver in PER_POSITION_SOLVERS:
            # deq mixes iterates per "sample" (dim 0). Anderson/Broyden over a whole [T, H] sequence would let
            # later tokens steer earlier positions through the shared mixing weights (a leak of the future into
            # the past until the solve converges); as [B*T, H] states every position has its own weights, so
            # position t depends only on positions <= t, as in the Reversible/Picard/Relaxed updates.
            def f(z: Tensor, x: Tensor) -> Tensor:
                return block(z.view(shape), x, mask, hook).reshape(-1, shape[-1])

            z0 = (self._z0(x) if z0 is None else z0).reshape(-1, shape[-1])
            if per_position:  # a sample is a position already
                groups, active = 1, real.reshape(-1, 1) if real is not None else None
        else:
            def f(z: Tensor, x: Tensor) -> Tensor:
                return block(z, x, mask, hook)

            # z0 = x is elementwise in the position, so the exact cache stays exact
            z0 = self._z0(x) if z0 is None else z0
            if per_position:
                groups, active = length, real
        # trace=False: only the final residual is reported, and per-step reductions add up when decoding
        params = list(block.parameters()) if torch.is_grad_enabled() else []
        sol = deq.solve(f, z0, x, solver=self._solver(), adjoint=adjoint, tol=tol, max_steps=max_steps,
                        params=params, trace=False, detached_steps=detached_steps, groups=groups, active=active)
        if sol.group_steps is not None:
            position_steps = sol.group_steps.view(batch, length)
        else:
            position_steps = torch.full((batch, length), sol.steps, dtype=torch.long, device=x.device)
        stats = SolverStats(steps=sol.steps, residual=sol.max_residual, nfe=sol.nfe, position_steps=position_steps,
                            backward=sol.backward)
        if readout:
            return self._read_midpoint(sol.y.view(shape), sol.z.view(shape), x, mask, hook, readout_layer, stats)
        return sol.z.view(shape), stats

    def _reads_midpoint(self) -> bool:
        """This call reads the reversible pair's midpoint: eval mode (training reads z_N), `config.reads_midpoint`."""
        return not self.training and self.config.reads_midpoint

    def _read_midpoint(self, y: Tensor, z: Tensor, x: Tensor, mask: AttentionMask, hook: Any,
                       layer: int | None, stats: SolverStats) -> tuple[Tensor, SolverStats]:
        """m = (y + z) / 2 [B, T, H] of the reversible pair and `stats` with m's residual (the largest per-sample
        relative residual, from one more evaluation of f, without a graph: it only measures) and that evaluation
        counted. An exact cache's hook (`EvaluationKeyValues`) stores it in `layer`, the same for every solve."""
        m = (y + z) / 2
        if layer is not None:
            hook.next_layer(layer)
        with torch.no_grad():
            fm = self.blocks[0](m, x, mask, hook)
            stats.residual = float(relative_residual(m.flatten(1), fm.flatten(1)).max())
        stats.nfe += 1
        return m, stats

    def _solver(self) -> deq.Solver:
        return deq.make_solver(self.config.solver, **self.config.solver_kwargs())

    def _adjoint(self) -> deq.Adjoint:
        return deq.make_adjoint(self.config.adjoint, **self.config.adjoint_kwargs())
