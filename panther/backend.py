"""``torch.compile(model, backend="panther")``: rewrite dense layers into sketched ops, then Inductor.

The backend is found through the ``torch_dynamo_backends`` entry point (``pyproject.toml``), so
``backend="panther"`` works in a process that never imported panther. For each graph Dynamo
captures it

1. validates the options (:class:`panther.options.PantherOptions`);
2. runs the passes of :mod:`panther.passes` on a fresh copy of the graph (the Dynamo
   GraphModule itself is never edited): find linear / conv2d / attention layers, run the
   example inputs once to record what each sees, decide per layer (by default the smallest
   rank whose output error on those inputs is within ``tolerance`` = 5%, factorized in the
   metric of the recorded activations), compute factors from the real weights, rewrite into
   ``torch.ops.panther`` ops;
3. writes the debugging dumps (``dump_dir`` / ``$PANTHER_DUMP_DIR``, and ``TORCH_TRACE``
   artifacts) and logs a summary table to the ``panther`` logger;
4. lowers the rewritten graph with Inductor's ``compile_fx`` (``mode=`` passed on; the
   factors become frozen constants under max-autotune without grad, so on CPU the sketched
   GEMMs use Inductor's C++ GEMM template);
5. returns a callable that checks, on every call, that no rewritten weight changed since its
   factors were computed: its in-place version (``_version``), its storage (``.data =``,
   ``vector_to_parameters``, a swapped Parameter) and the optimizer steps that updated it (fused
   optimizers do not bump ``_version``). It refreshes them or raises (``on_stale``), never
   serving stale factors. A refresh keeps the rank while the new weight still meets the
   tolerance on the recorded activations; otherwise the graph is compiled again, calibrated on
   the new weights. Writes through ``weight.data`` (``w.data.copy_(...)``) are invisible, as
   they are to autograd: write under ``torch.no_grad()`` instead.

Example::

    >>> model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.GELU(), torch.nn.Linear(512, 10))
    >>> fast = torch.compile(model, backend="panther", options={"tolerance": 0.1, "rank_fraction": 0.25})
    >>> with torch.no_grad():
    ...     y = fast(torch.randn(8, 512))
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.fx as fx

from panther.options import PantherOptions
from panther.passes.stamp import step_epoch, watch_weight, weight_stamp

__all__ = ["panther_backend", "PantherCompiled", "StaleWeightError"]

log = logging.getLogger("panther")


class StaleWeightError(RuntimeError):
    """A rewritten weight changed after compilation and ``on_stale="raise"`` was asked for."""


def panther_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None, mode: str | None = None, **kwargs: Any):
    """The ``torch.compile`` backend. ``options`` are :class:`PantherOptions` fields.

    Args:
        gm: the graph Dynamo captured (not modified).
        example_inputs: its real inputs (parameters included), SymInts as ints.
        options: dict of :class:`PantherOptions` fields (``torch.compile(options=...)``).
        mode: Inductor mode from ``torch.compile(mode=...)``; ``options["mode"]`` also works
            (torch.compile does not accept both ``mode`` and ``options``).

    Raises:
        ValueError / TypeError: malformed options (the message lists what is allowed).
    """
    if kwargs:
        raise TypeError(f"panther backend got unexpected arguments {sorted(kwargs)}; it takes options= and mode=")
    opts = PantherOptions.from_dict(options)
    if mode is not None and mode != "default":
        opts = PantherOptions.from_dict(opts, mode=mode)
    return PantherCompiled(gm, example_inputs, opts)


def _graph_name() -> str:
    from torch._guards import CompileContext

    cid = CompileContext.current_compile_id()
    if cid is None:
        return "graph"
    return f"graph_{cid.frame_id}_{cid.frame_compile_id}"


class PantherCompiled:
    """What the backend returns for one graph: the Inductor-compiled rewritten graph.

    Attributes:
        report: the :class:`panther.passes.Report` (also ``rewrites.json`` in a dump).
        graph_module: the rewritten ``torch.fx.GraphModule`` (runs eagerly when called).
        dump_path: the dump folder of this graph, or None.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: list[Any], opts: PantherOptions):
        self.options = opts
        self._source_gm = gm
        self._example_inputs = list(example_inputs)
        self._tracing_context = torch._guards.TracingContext.try_get()
        self._grad_enabled = torch.is_grad_enabled()  # the mode Dynamo captured (and guards on)
        self._build(gm, example_inputs, _graph_name())

    def _build(self, gm: fx.GraphModule, example_inputs: list[Any], name: str) -> None:
        from panther import passes
        from panther.passes import dump

        opts = self.options
        try:
            ctx = passes.run_passes(gm, example_inputs, opts, graph_name=name)
        except Exception as e:  # never break the model: compile the graph as it is
            if opts.strict:
                raise
            log.warning("panther: the passes failed on %s (%s: %s); compiling it dense", name, type(e).__name__, e)
            ctx = passes.run_passes(gm, example_inputs, opts, graph_name=name, skip=tuple(n for n, _ in passes.PIPELINE))
            ctx.report.notes.append(f"the passes failed ({type(e).__name__}: {e}); the graph was compiled dense")
        self._ctx = ctx
        self.report = ctx.report
        self.graph_module = ctx.gm
        self._set_watch()
        try:
            self._compiled = self._lower(example_inputs)
        except Exception as e:
            if opts.strict or not self._watch and not self.report.rewritten:
                raise
            self._fall_back_dense(gm, f"Inductor failed on the rewritten graph ({type(e).__name__}: {e})")
            self._compiled = self._lower(example_inputs)
        self.dump_path = dump.emit(gm, ctx)

    def _set_watch(self) -> None:
        self._watch = [c for c in self._ctx.candidates if c.decision == "rewrite" and c.weight_index is not None]
        self._stamps = {}
        for c in self._watch:
            weight = self._ctx.inputs.example_inputs[c.weight_index]
            watch_weight(weight)
            self._stamps[id(c)] = weight_stamp(weight)
        self._set_fast_checks()
        self._freeze = self._wants_freezing()

    def _set_fast_checks(self) -> None:
        # The per-call check: (input index, _version, data_ptr) per watched weight, and the
        # optimizer-step epoch (steps are looked up only when it moved).
        self._fast = [(c.weight_index, *self._stamps[id(c)][:2]) for c in self._watch]
        self._epoch = step_epoch()

    def _fall_back_dense(self, gm: fx.GraphModule, why: str) -> None:
        """Leave every layer of this graph dense (the rewritten graph could not be lowered)."""
        from panther.passes.graph import copy_graph

        log.warning("panther: %s; %s is compiled dense", why, self.report.graph)
        for cand in self.report.rewritten:
            cand.dense("lowering", why)
            cand.factors = {}
        self.report.notes.append(f"{why}; the graph was compiled dense")
        self.report.output_error = None
        self._ctx.gm = self.graph_module = copy_graph(gm)
        self._set_watch()

    # -- lowering ----------------------------------------------------------------------------

    def _inductor_patches(self) -> dict[str, Any]:
        from torch._inductor import list_mode_options

        patches: dict[str, Any] = {}
        if self.options.mode and self.options.mode != "default":
            patches.update(list_mode_options(self.options.mode))
        patches.update(self.options.inductor)
        return patches

    def _wants_freezing(self) -> bool:
        patches = self._inductor_patches()
        return bool(patches.get("max_autotune")) and not torch.is_grad_enabled() and bool(self._watch)

    def _lower(self, example_inputs: list[Any]):
        from torch._inductor.compile_fx import compile_fx

        from panther.passes.graph import copy_graph

        patches = self._inductor_patches()
        if self._freeze:
            patches["freezing"] = True
            on_cpu = all(t.device.type == "cpu" for t in example_inputs if isinstance(t, torch.Tensor))
            if on_cpu:
                patches["max_autotune_gemm_backends"] = "CPP,ATEN"
        # compile_fx may edit the module it is given: hand it a copy (buffers are shared).
        return compile_fx(copy_graph(self.graph_module), example_inputs, config_patches=patches)

    # -- calls -------------------------------------------------------------------------------

    def __call__(self, *args: Any) -> Any:
        for i, version, ptr in self._fast:
            w = args[i]
            if w._version != version or w.data_ptr() != ptr:
                self._stale(args)
                break
        else:
            if self._epoch != step_epoch():
                if any(weight_stamp(args[c.weight_index]) != self._stamps[id(c)] for c in self._watch):
                    self._stale(args)
                else:
                    self._epoch = step_epoch()
        return self._compiled(*args)

    def _stale(self, args: tuple) -> None:
        changed = [c for c in self._watch if weight_stamp(args[c.weight_index]) != self._stamps[id(c)]]
        names = ", ".join(c.label for c in changed[:4]) + (", ..." if len(changed) > 4 else "")
        if self.options.on_stale == "raise":
            raise StaleWeightError(
                f"panther: weight(s) of {names} changed after torch.compile computed their "
                "low-rank factors; recompile (torch._dynamo.reset() or a fresh torch.compile) or pass "
                "options={'on_stale': 'refresh'}"
            )
        from panther.passes.kinds import kind_module

        tol = self._ctx.options.effective_tolerance()
        with torch.no_grad():
            for cand in changed:
                weight = args[cand.weight_index]
                kind_module(cand.kind).factorize(self._ctx, cand, weight)
                err = self._refresh_error(cand, weight, args)
                if err is not None and tol is not None and err > tol:
                    log.info("panther: %s does not meet tolerance %s at rank %d after the change (error %.3g); "
                             "compiling %s again", cand.label, tol, cand.rank, err, self.report.graph)
                    break
                for key, buf_name in cand.attrs["buffers"].items():
                    self.graph_module.get_buffer(buf_name).copy_(cand.factors[key])
                cand.weight_version = weight._version
                self._stamps[id(cand)] = weight_stamp(weight)
            else:
                err = None
        if err is not None and tol is not None and err > tol:
            self._rebuild(args)  # (outside no_grad: the graph is built in the mode it was captured in)
            return
        self._set_fast_checks()
        log.info("panther: refreshed the factors of %s (weights changed after compilation)", names)
        if self._freeze:
            # Frozen factors are constants of the compiled code: compile again with the new ones.
            with torch._guards.tracing(self._tracing_context):
                self._compiled = self._lower(self._example_inputs)

    def _refresh_error(self, cand: Any, weight: torch.Tensor, args: tuple) -> float | None:
        """Output error of ``cand``'s refreshed factors on the activations recorded at compile
        time (bias included), or None when it was not calibrated to a tolerance."""
        from panther.passes.calibrate import metric_error
        from panther.passes.kinds import kind_module

        if "mean" not in cand.stats:
            return None
        kind = kind_module(cand.kind)
        bias_node = cand.inputs.get("bias")
        bias = None
        if bias_node is not None:
            bias_index = self._ctx.inputs.index(bias_node)
            if bias_index is None:
                return math.inf  # a bias computed in the graph (a slice, a sum): only a rebuild can measure it
            bias = args[bias_index]
        A, B = kind.factors_to_ab(cand)
        return metric_error(cand.stats, kind.dense_weight(self._ctx, cand, weight), A, B, bias)

    def _rebuild(self, args: tuple) -> None:
        """Run the passes and Inductor again on the original graph, with the current weights."""
        examples = list(self._example_inputs)
        for cand in self._watch:
            examples[cand.weight_index] = args[cand.weight_index]
        self._example_inputs = examples
        with torch._guards.tracing(self._tracing_context), torch.set_grad_enabled(self._grad_enabled):
            self._build(self._source_gm, examples, self.report.graph)
