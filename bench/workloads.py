"""A benchmark case: network × batch × classes × output × contender, as a zero-argument step function."""
import functools

import torch

from bench import contenders as K
from bench.networks import make

CONTENDERS = {
    # exact Jacobian penalty
    "a_autograd_sum": K.autograd_sum,
    "b_autograd_per_class": K.autograd_per_class,
    "c_func_vmap": K.func_vmap,
    "c_func_vmap_chunk2": functools.partial(K.func_vmap, chunk_size=2),
    "e_dbprop_python": functools.partial(K.dbprop_jacobian, backend="python"),
    "f_dbprop_native": functools.partial(K.dbprop_jacobian, backend="native"),
    "f_dbprop_native_chunk1": functools.partial(K.dbprop_jacobian, backend="native", chunk_size=1),
    "f_dbprop_native_chunk4": functools.partial(K.dbprop_jacobian, backend="native", chunk_size=4),
    # random projections
    "d_jacreg_1": functools.partial(K.jacreg, n_proj=1),
    "d_jacreg_C": None,  # n_proj = C, bound at build time
    "f_dbprop_random_1": functools.partial(K.dbprop_jacobian, backend="native", estimator="random", n_proj=1),
    # output gradient, double backprop, plain step
    "a_autograd_output_gradient": K.autograd_output_gradient,
    "f_dbprop_output_gradient": K.dbprop_output_gradient,
    "g_autograd_double_backprop": K.autograd_double_backprop,
    "g_dbprop_double_backprop": K.dbprop_double_backprop,
    "h_plain_step": K.plain_step,
    # mixed precision (bench/autocast.py)
    "a_autograd_sum_autocast_bf16": K.under_autocast(K.autograd_sum),
    "f_dbprop_native_autocast_bf16": K.under_autocast(functools.partial(K.dbprop_jacobian, backend="native")),
    "f_dbprop_native_bf16_compute": K.dbprop_jacobian_low_precision,
}


def build_case(spec):
    """``spec``: network, C, batch, output, contender, device, seed -> (step function, device)."""
    device = torch.device(spec.get("device", "cpu"))
    model, shape = make(spec["network"], spec["C"], spec.get("seed", 0))
    model = model.to(device)
    g = torch.Generator().manual_seed(spec.get("seed", 0) + 1)
    x = torch.randn(spec["batch"], *shape, generator=g).to(device)
    y = torch.randint(0, spec["C"], (spec["batch"],), generator=g).to(device)
    name = spec["contender"]
    fn = CONTENDERS[name]
    if name == "d_jacreg_C":
        fn = functools.partial(K.jacreg, n_proj=spec["C"])

    def step():
        for p in model.parameters():
            p.grad = None
        fn(model, x, y, spec["output"], spec["C"])

    step.model = model
    return step, device
