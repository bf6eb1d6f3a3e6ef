"""The torch.compile backend "gsa": rewrite every attention of the captured graph into GSA,
then hand the graph on to a compiler (Inductor by default).

    torch.compile(model, backend="gsa")                                  # derived config
    torch.compile(model, backend="gsa", options={"config": "Qwen/Qwen3-4B"})
    torch.compile(model, backend="gsa", options={"config": cfg, "compiler": "aot_eager"})
    torch.compile(model, backend=functools.partial(gsa_backend, options={"config": cfg}),
                  mode="reduce-overhead")                                # CUDA graphs (torch.compile
                                                                         # takes mode or options, not both)

The backend is registered through the `torch_dynamo_backends` entry point in pyproject.toml, so
it works without importing gsa_compile first. Options:
    config      GSAConfig, a shipped config name or a JSON path; None derives one per graph
    compiler    "inductor" (default), "aot_eager" or "eager": what runs the rewritten graph
    reports     a list; the Report of every compiled graph is appended to it
    codes_state a CodesState shared by every graph of this compiled model (created on first use
                and kept in the options dict, so recompiles and graph breaks share the codes
                buffers already made)
    config_derived  True when `config` was derived for the model (GSAConfig.for_model) and
                may be re-derived with the number of sites found
    parameter_names id(parameter) -> qualified name in the model (parameter_names(model)), to
                number layers of graphs dynamo captured below the model's root
    tensor_parallel (rank, size) when the model holds this rank's share of every attention's heads,
                consecutive and equal (a model built with local heads); the hash weights are
                then the rank's rows of the model's. Not needed for DTensor-sharded weights
                (ColwiseParallel key projections), whose shard is read from the weight"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
from torch import fx

from ..config import GSAConfig, load_config
from ..errors import GSAConfigError
from ..passes import PassContext, run_pipeline
from ..passes.codes_state import CodesState

COMPILERS = ("inductor", "aot_eager", "eager")
OPTIONS = ("config", "compiler", "reports", "codes_state", "config_derived", "parameter_names", "tensor_parallel")


def parameter_names(model: torch.nn.Module) -> dict:
    """id(tensor) -> qualified name for every parameter and buffer of `model`."""
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return {id(tensor): name for name, tensor in named}


def resolve_config_option(config: Any) -> Optional[GSAConfig]:
    """A GSAConfig from a GSAConfig, a shipped config name, a JSON path, or None."""
    if config is None or isinstance(config, GSAConfig):
        return config
    if isinstance(config, str):
        return load_config(config)
    raise GSAConfigError(
        f"config must be a GSAConfig, a shipped config name or a JSON path, got {type(config).__name__}"
    )


def tensor_parallel_option(value: Any) -> Optional[tuple]:
    """(rank, size) from the tensor_parallel option (None: not declared)."""
    if value is None:
        return None
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value) and 0 <= value[0] < value[1]):
        raise GSAConfigError(f"tensor_parallel must be (rank, size) with integers 0 <= rank < size, got {value!r}")
    return tuple(value)


def gsa_backend(gm: fx.GraphModule, example_inputs, options: Optional[dict] = None, mode: Optional[str] = None):
    """torch.compile backend: GSA passes, then the chosen compiler."""
    options = {} if options is None else options
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise GSAConfigError(f"unknown gsa backend option(s) {unknown}; options are {list(OPTIONS)}")
    compiler = options.get("compiler", "inductor")
    if compiler not in COMPILERS:
        raise GSAConfigError(f"gsa backend option compiler must be one of {list(COMPILERS)}, got {compiler!r}")
    state = options.setdefault("codes_state", CodesState())
    context = PassContext(
        route="torch.compile",
        config=resolve_config_option(options.get("config")),
        config_derived=bool(options.get("config_derived", False)),
        whole_model=False,
        state=state,
        example_inputs=list(example_inputs),
        parameter_names=options.get("parameter_names") or {},
        tensor_parallel=tensor_parallel_option(options.get("tensor_parallel")),
    )
    gm = run_pipeline(gm, context)
    if options.get("reports") is not None:
        options["reports"].append(context.report)
    compiled = hand_on(gm, example_inputs, compiler, mode)
    if not any(kind == "cat" for _, _, kind in context.codes.values()):
        return compiled
    return _with_active_state(compiled, state, context.growing_links)


def _with_active_state(compiled, state: CodesState, links: list):
    """`compiled`, run with `state` active: its gsa::cached_codes_cat calls keep their codes
    there. links: (site, input index of past, output index of the cat result); a call's past
    is known to be the site's stored keys when it is the tensor the last call returned, not
    modified since (identity and version counter: no device read), whichever of the model's
    graphs returned it."""
    boxed = getattr(compiled, "_boxed_call", False)
    returned = state.returned_keys  # shared: the prefill and the decode step are two graphs

    def run(*args):
        # Callers differ in whether they hand a boxed callable its inputs as one list (torch
        # 2.13's dynamo calls it with them spread out): read either form, pass it on as given.
        called_boxed = len(args) == 1 and isinstance(args[0], list)
        inputs = args[0] if called_boxed else args
        known = {}
        for site, past_index, _ in links:
            past, last = inputs[past_index], returned.get(site)
            known[site] = last is not None and last[0]() is past and past._version == last[1]
        with state.active(known):
            outputs = compiled(*args)
        for site, _, key_index in links:
            key = outputs[key_index]
            returned[site] = (weakref.ref(key), key._version)
        return outputs

    # Dynamo calls a compiled function that takes its inputs as one list with that list.
    run._boxed_call = boxed
    return run


def hand_on(gm: fx.GraphModule, example_inputs, compiler: str, mode: Optional[str] = None):
    """Compile the rewritten graph with `compiler` (a registered dynamo backend name); an
    Inductor `mode` of torch.compile ("max-autotune", ...) applies its Inductor options."""
    if compiler == "eager":
        return gm.forward
    from torch._dynamo.backends.registry import lookup_backend

    if compiler == "inductor" and mode:
        import torch._inductor

        with torch._inductor.config.patch(torch._inductor.list_mode_options(mode)):
            return lookup_backend(compiler)(gm, example_inputs)
    return lookup_backend(compiler)(gm, example_inputs)


__all__ = ["gsa_backend", "hand_on", "parameter_names", "resolve_config_option", "COMPILERS"]
