"""The two shortcuts tests/conftest.py takes in Triton's interpreter change no result and drop no check.

* a ``@triton.jit`` helper does not patch ``triton.language`` again inside a launch that already patched it;
* the interpreter's integer-overflow checks are skipped while ``debug`` is off, because ``device_assert`` drops
  their result then: an int32 overflow passes silently as shipped (checked here), and raises once ``debug`` is on.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from conftest import triton_interpreter_as_shipped

triton = pytest.importorskip("triton")
interpreting = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="the shortcuts apply to Triton's interpreter only")


def _kernel_results():
    """The attention kernels (padding, window, dropout: helpers called in loops) and the MNTP loss kernels,
    forward and backward, on fresh inputs from fixed seeds."""
    from llm2vec_fast.kernels import masked_next_token_loss
    from llm2vec_fast.kernels.attention import bidirectional_attention

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 13, 2, 16, generator=gen).requires_grad_()
    k, v = (torch.randn(2, 13, 1, 16, generator=gen).requires_grad_() for _ in range(2))
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, :3] = mask[1, 10:] = False
    torch.manual_seed(3)
    out = bidirectional_attention(q, k, v, key_padding_mask=mask, window=4, dropout_p=0.2, impl="triton")
    grads = torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, generator=gen))

    hidden = torch.randn(2, 7, 16, generator=gen).requires_grad_()
    weight = torch.randn(37, 16, generator=gen).requires_grad_()
    labels = torch.randint(0, 37, (2, 7), generator=gen)
    labels[0, :4] = -100
    loss = masked_next_token_loss(hidden, weight, labels, impl="triton")
    return (out.detach(), *grads, loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))


@interpreting
def test_shortcuts_are_on_and_give_the_interpreters_own_results():
    from triton.runtime import interpreter

    assert getattr(interpreter._patch_lang, "_once_per_launch", False), "conftest's launch shortcut is not in place"
    assert not interpreter.interpreter_builder.options.sanitize_overflow
    fast = _kernel_results()
    with triton_interpreter_as_shipped():
        assert interpreter.interpreter_builder.options.sanitize_overflow
        shipped = _kernel_results()
    assert interpreter._patch_lang._once_per_launch  # back in place after the block
    for got, want in zip(fast, shipped):
        assert torch.equal(got, want)


@interpreting
def test_overflow_checks_assert_only_with_debug():
    """What the skipped checks did: nothing, without ``debug``. If a Triton release made them assert without it,
    this fails, and conftest's skip would be dropping a check."""
    import triton.language as tl
    from triton.runtime import interpreter

    @triton.jit
    def _double(x_ptr, out_ptr):
        tl.store(out_ptr, tl.load(x_ptr) * 2)

    x = torch.tensor([2**31 - 1], dtype=torch.int32)
    out = torch.empty_like(x)
    with triton_interpreter_as_shipped():
        options = interpreter.interpreter_builder.options
        assert options.sanitize_overflow and not options.debug
        _double[(1,)](x, out)  # wraps around, unreported
        assert out.item() == -2
        interpreter.interpreter_builder.options = dataclasses.replace(options, debug=True)
        with pytest.raises(Exception, match="overflow"):
            _double[(1,)](x, out)
