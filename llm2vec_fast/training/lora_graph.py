"""LoRA linears fused for the compiled training step: a graph pass that only ``torch.compile`` (inductor) gets.

peft's LoRA ``Linear`` computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: on a frozen base weight ``W``
(out, in) and the adapter's ``A`` (r, in), ``B`` (out, r) that is three matrix products forward and five backward,
plus a scale, an add and their backwards, each a pass over a whole ``(tokens, out)`` activation.
:func:`fuse_lora_linears` rewrites that subgraph of the dynamo graph, before autograd, into one op,
``llm2vec_fast::lora_linear``: forward ``x_l A^T`` (``x_l`` the adapter's input: ``x``, or its LoRA dropout) and
``x W^T`` (+ bias), the rank-r update accumulated into the output by the GEMM itself (``addmm_``, beta = 1);
backward ``dx = dY W (+ (s dY B) A`` accumulated the same way when ``x_l`` is ``x``), ``dA = (s dY B)^T x_l``,
``dB = s dY^T (x_l A^T)`` (``x_l A^T`` kept from the forward). On CPU in fp32 the frozen weight's two products are
oneDNN's matmul (on this project's AMD CPU about 10% cheaper than MKL's sgemm for a SmolLM2 layer's products, 1
thread). The same gradients as eager (in fp32 to rounding), without the elementwise passes; inductor fuses what
is around it.

:func:`training_compile_settings` is what the Trainer (``torch_compile``) sets around its steps: this pass as
inductor's ``pre_grad_custom_pass`` and float attributes kept constant as the encoder keeps them
(``compilation.float_attributes_constant``: LoRA's ``scaling``, which the pass needs as a number, among them).

The pass rewrites CPU graphs only: on CUDA it has not been measured yet (no GPU was lent to the task that wrote
it), so there inductor keeps peft's graph. It leaves a LoRA linear unfused where the pattern is not exactly that:
a trainable base weight or bias, a frozen adapter, a scale that is not a constant, an adapter input of another
shape or dtype (casts between mixed dtypes), several adapters summed, DoRA.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from typing import Optional

import torch
from torch import Tensor

from ..compilation import float_attributes_constant

__all__ = ["fuse_lora_linears", "lora_linear", "training_compile_settings"]

_LINEARS = (torch._C._nn.linear, torch.nn.functional.linear)


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


_ONEDNN = True


def _mm_t(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` for a frozen ``b``: oneDNN's matmul on CPU in fp32 where it is built in, else ``torch.mm``."""
    if _ONEDNN and a.device.type == "cpu" and a.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return torch.mm(a, b.t())


@torch.library.custom_op("llm2vec_fast::lora_linear", mutates_args=())
def _lora_linear_op(x: Tensor, x_lora: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
                    lora_b: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(y, x_lora A^T)``; ``x_lora`` None means ``x`` (no LoRA dropout)."""
    rows = _rows(x)
    xa = torch.mm(rows if x_lora is None else _rows(x_lora), lora_a.t())
    y = _mm_t(rows, weight) if bias is None else torch.addmm(bias, rows, weight.t())
    y.addmm_(xa, lora_b.t(), alpha=scale)
    return y.view(*x.shape[:-1], weight.shape[0]), xa


@_lora_linear_op.register_fake
def _(x, x_lora, weight, bias, lora_a, lora_b, scale):
    rows = x.numel() // x.shape[-1]
    return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(rows, lora_a.shape[0])


@torch.library.custom_op("llm2vec_fast::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(grad: Tensor, lora_input: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                             xa: Tensor, scale: float, input_grad: bool, lora_input_grad: bool
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dx_lora, dA, dB)``. ``lora_input_grad``: ``x_lora`` was a tensor of its own and needs its gradient
    ``(s dY B) A`` apart; otherwise that term is accumulated into ``dx``. A gradient nothing needs is an empty
    tensor."""
    g = _rows(grad)
    dxa = torch.mm(g, lora_b).mul_(scale)
    grad_b = torch.mm(g.t(), xa).mul_(scale)
    grad_a = torch.mm(dxa.t(), _rows(lora_input))
    grad_x, grad_lora = lora_input.new_empty(0), lora_input.new_empty(0)
    if input_grad:
        grad_x = _mm_t(g, weight.t())
        if not lora_input_grad:
            grad_x.addmm_(dxa, lora_a)
        grad_x = grad_x.view(lora_input.shape)
    if lora_input_grad:
        grad_lora = torch.mm(dxa, lora_a).view(lora_input.shape)
    return grad_x, grad_lora, grad_a, grad_b


@_lora_linear_backward_op.register_fake
def _(grad, lora_input, weight, lora_a, lora_b, xa, scale, input_grad, lora_input_grad):
    shaped = [lora_input.new_empty(lora_input.shape if need else (0,)) for need in (input_grad, lora_input_grad)]
    return shaped[0], shaped[1], lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _setup_context(ctx, inputs, output):
    x, x_lora, weight, bias, lora_a, lora_b, scale = inputs
    ctx.save_for_backward(x if x_lora is None else x_lora, weight, lora_a, lora_b, output[1])
    ctx.scale, ctx.separate = scale, x_lora is not None


def _backward(ctx, grad_y, grad_xa):
    # ``x_lora A^T`` is returned only to be saved; nothing else reads it, so its gradient (grad_xa) is None or 0.
    lora_input, weight, lora_a, lora_b, xa = ctx.saved_tensors
    input_grad = bool(ctx.needs_input_grad[0])
    lora_input_grad = ctx.separate and bool(ctx.needs_input_grad[1])
    grad_x, grad_lora, grad_a, grad_b = _lora_linear_backward_op(
        grad_y, lora_input, weight, lora_a, lora_b, xa, ctx.scale, input_grad, lora_input_grad)
    return (grad_x if input_grad else None), (grad_lora if lora_input_grad else None), None, None, grad_a, \
        grad_b, None


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def lora_linear(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
                bias: Tensor | None = None, x_lora: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias) + F.linear(F.linear(x_lora, lora_a), lora_b) * scale`` as one op, for a frozen
    ``weight`` (out, in) and ``bias`` (no gradient is computed for them); ``x`` (..., in), ``x_lora`` the adapter's
    input (LoRA dropout of ``x``; None: ``x`` itself), ``lora_a`` (r, in), ``lora_b`` (out, r). Returns (..., out)."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("lora_linear computes no gradient for the base weight and bias: they must be frozen "
                         "(requires_grad=False)")
    if x.shape[-1] != weight.shape[1] or lora_a.shape != (lora_b.shape[1], weight.shape[1]) \
            or lora_b.shape[0] != weight.shape[0]:
        raise ValueError(f"lora_linear: shapes do not fit: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}")
    if x_lora is not None and x_lora.shape != x.shape:
        raise ValueError(f"lora_linear: x_lora {tuple(x_lora.shape)} must have x's shape {tuple(x.shape)}")
    return _lora_linear_op(x, x_lora, weight, bias, lora_a, lora_b, float(scale))[0]


def _example(node) -> Tensor | None:
    value = node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, Tensor) else None


def _linear_args(node) -> tuple | None:
    """``(input, weight, bias)`` of a ``F.linear`` call node, or None."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or node.target not in _LINEARS:
        return None
    names = ("input", "weight", "bias")
    args = list(node.args) + [node.kwargs.get(name) for name in names[len(node.args):]]
    if len(args) != 3 or set(node.kwargs) - set(names[:len(args)]) - set(names):
        return None
    return tuple(args)


def _only_user(node, user) -> bool:
    return isinstance(node, torch.fx.Node) and list(node.users) == [user]


def _match(add) -> tuple | None:
    """``(x, x_lora, weight, bias, lora_a, lora_b, scale, nodes_to_remove)`` where ``add`` is
    ``linear(x, W, b) + linear(linear(x_lora, A), B) * s`` (either order of both sums), with W and b frozen, A and
    B trainable, s a constant and ``x_lora`` x itself (None) or a tensor of x's shape and dtype (LoRA dropout of
    x); None otherwise."""
    if add.op != "call_function" or add.target not in (operator.add, torch.add) or len(add.args) != 2 or add.kwargs:
        return None
    for base, update in (add.args, add.args[::-1]):
        linear = _linear_args(base)
        if linear is None or not _only_user(base, add) or not _only_user(update, add):
            continue
        if update.op != "call_function" or update.target not in (operator.mul, torch.mul) or update.kwargs:
            continue
        factors = update.args
        if len(factors) != 2:
            continue
        for product, scale in (factors, factors[::-1]):
            if isinstance(scale, bool) or not isinstance(scale, (int, float)):
                continue
            outer = _linear_args(product)
            if outer is None or outer[2] is not None or not _only_user(product, update):
                continue
            inner_node = outer[0]
            inner = _linear_args(inner_node)
            if inner is None or inner[2] is not None or not _only_user(inner_node, product):
                continue
            x, weight, bias = linear
            x_lora = None if inner[0] is x else inner[0]  # LoRA dropout of x: the adapter's own input
            values = [_example(n) for n in (x, weight, inner[1], outer[1])]
            if any(v is None for v in values) or (bias is not None and _example(bias) is None):
                continue
            x_value, w_value, a_value, b_value = values
            if x_lora is not None and (_example(x_lora) is None or _example(x_lora).shape != x_value.shape
                                       or _example(x_lora).dtype != x_value.dtype):
                continue
            if x_value.device.type != "cpu":
                continue  # measured on CPU only: on CUDA inductor keeps peft's graph (see the module docstring)
            if w_value.requires_grad or (bias is not None and _example(bias).requires_grad) \
                    or not (a_value.requires_grad and b_value.requires_grad) \
                    or len({v.dtype for v in values}) != 1 or w_value.dim() != 2 \
                    or a_value.shape[0] != b_value.shape[1]:
                continue
            return x, x_lora, weight, bias, inner[1], outer[1], float(scale), (update, product, inner_node, base)
    return None


def fuse_lora_linears(graph: torch.fx.Graph) -> int:
    """Rewrite every peft LoRA linear of a dynamo graph (torch IR, before autograd) that :func:`_match` finds
    into one ``llm2vec_fast::lora_linear``; returns how many were fused."""
    fused = 0
    for add in list(graph.nodes):
        match = _match(add)
        if match is None:
            continue
        x, x_lora, weight, bias, lora_a, lora_b, scale, dead = match
        with graph.inserting_before(add):
            op = graph.call_function(torch.ops.llm2vec_fast.lora_linear.default,
                                     (x, x_lora, weight, bias, lora_a, lora_b, scale))
            out = graph.call_function(operator.getitem, (op, 0))
        out.meta = dict(add.meta)
        add.replace_all_uses_with(out)
        graph.erase_node(add)
        for node in dead:
            graph.erase_node(node)
        fused += 1
    return fused


def _graph_pass_class():
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class FuseLoRALinears(CustomGraphPass):
        """:func:`fuse_lora_linears` as inductor's ``pre_grad_custom_pass`` (hashed by this file, for its cache);
        counts what it fused in ``torch._dynamo.utils.counters["inductor"]["lora_linears_fused"]``."""

        def __call__(self, graph: torch.fx.Graph) -> None:
            from torch._dynamo.utils import counters

            counters["inductor"]["lora_linears_fused"] += fuse_lora_linears(graph)

        def uuid(self):
            return get_hash_for_files((__file__,))

    return FuseLoRALinears


@functools.cache
def _fuse_pass():
    return _graph_pass_class()()


@contextlib.contextmanager
def training_compile_settings():
    """The settings a compiled training step is traced and compiled with (see the module docstring); torch.compile
    reads them on the call that traces, so they are set around every step (cheap: two config patches)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.custom_graph_pass import get_custom_graph_passes

    passes = list(get_custom_graph_passes(inductor_config.pre_grad_custom_pass))
    if _fuse_pass() not in passes:
        passes.append(_fuse_pass())
    with float_attributes_constant(), \
            inductor_config.patch(pre_grad_custom_pass=passes[0] if len(passes) == 1 else passes):
        yield
