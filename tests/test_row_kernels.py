"""The token gate's row kernels (`kernels/rows.py`) against PyTorch's ops, under Triton's interpreter on CPU.

Each operation (`scale`, `add_scaled` with and without writing into `update`, `scale_and_dot_`) on widths below,
at and across the kernels' column chunk, fp32 / fp16; a gated HiRA layer's output and every gradient with the
kernels against PyTorch's ops (both dΔW arrangements: the token scale on x and on δ); which one runs for each
`kernel` setting; and one warning, then PyTorch's ops, after a Triton failure under "auto" (an error under
"triton"). Compilation for real GPUs: tests/test_kernel_compile.py.
"""

import os
import sys
import types
import warnings

import pytest
import torch

pytest.importorskip("triton")
assert os.environ.get("TRITON_INTERPRET") == "1", "conftest sets TRITON_INTERPRET=1 before triton is imported"

import gatera_plugin.kernels.rows as row_kernels  # noqa: E402
from gatera_plugin.kernels import rows_for  # noqa: E402
from gatera_plugin.ops import gated_hira  # noqa: E402
from gatera_plugin.ops.rows import TORCH_ROWS  # noqa: E402

# Not bf16: the interpreter rounds fp32 -> bf16 toward zero (1 ulp off PyTorch's round-to-nearest); bf16 runs on a
# GPU in bench/gpu_check.py (a) and is compiled for sm_80 / sm_90 by tests/test_kernel_compile.py.
DTYPES = [torch.float32, torch.float16]
WIDTHS = [5, 64, 2048, 2100]  # below, at and across the 2048-column chunk
KERNELS = row_kernels.TRITON_ROWS_RAISING  # kernel="triton": the kernels at every size
ALWAYS = dict.fromkeys(row_kernels.MIN_ELEMENTS, 0)


def _rows(n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, d, generator=g).to(dtype), torch.randn(n, d, generator=g).to(dtype)
    scale = torch.rand(n, 1, generator=g).to(dtype)
    return a, b, scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", WIDTHS)
def test_scale_and_add_scaled_equal_pytorchs_ops(dtype, d):
    """Both compute in fp32 and round once: the same numbers (fp32: up to the order of one multiply-add)."""
    a, base, scale = _rows(7, d, dtype)
    exact = {"rtol": 0, "atol": 0} if dtype != torch.float32 else {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(KERNELS.scale(a, scale), TORCH_ROWS.scale(a, scale), **exact)
    tolerance = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {}
    expected = TORCH_ROWS.add_scaled(base, a, scale)
    torch.testing.assert_close(KERNELS.add_scaled(base, a, scale), expected, **tolerance)
    update = a.clone()
    out = KERNELS.add_scaled(base, update, scale, out=update)
    assert out.data_ptr() == update.data_ptr()
    torch.testing.assert_close(out, expected, **tolerance)
    # `value` (the branch's s): base + s · a ⊙ scale, against fp64
    reference = (base.double() + 2.5 * a.double() * scale.double()).to(dtype)
    loose = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 4e-3}
    for rows in (TORCH_ROWS, KERNELS):
        torch.testing.assert_close(rows.add_scaled(base, a, scale, value=2.5), reference, **loose)
        update = a.clone()
        out = rows.add_scaled(base, update, scale, out=update, value=2.5)
        assert out.data_ptr() == update.data_ptr()
        torch.testing.assert_close(out, reference, **loose)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", WIDTHS)
def test_scale_and_dot_scales_in_place_and_returns_the_row_dot_products(dtype, d):
    p, x, scale = _rows(9, d, dtype, seed=1)
    reference_dot = (p.double() * x.double()).sum(1)
    p_torch, p_kernel = p.clone(), p.clone()
    dot_torch = TORCH_ROWS.scale_and_dot_(p_torch, x, scale)
    dot_kernel = KERNELS.scale_and_dot_(p_kernel, x, scale)
    assert torch.equal(p_kernel, p_torch)
    assert dot_kernel.dtype == torch.float32 and dot_kernel.shape == (9,)
    # fp32 accumulation, against fp64: no worse than PyTorch's own vecdot (which rounds to the input dtype)
    torch_error = (dot_torch.double() - reference_dot).abs().max()
    assert (dot_kernel.double() - reference_dot).abs().max() <= torch_error + 1e-5 * reference_dot.abs().max()


def test_strided_or_empty_rows_use_pytorchs_ops(monkeypatch):
    """Rows not contiguous along d, and no rows at all (a grid of 0 programs), are not handed to the kernels; the
    result is PyTorch's."""
    monkeypatch.setattr(row_kernels, "scale_rows", lambda *a, **k: pytest.fail("kernel launched"))
    monkeypatch.setattr(row_kernels, "scale_rows_and_dot_", lambda *a, **k: pytest.fail("kernel launched"))
    a, _, scale = _rows(4, 10, torch.float32)
    torch.testing.assert_close(KERNELS.scale(a.t().contiguous().t(), scale), a * scale)
    empty, no_scale = torch.zeros(0, 10), torch.zeros(0, 1)
    assert KERNELS.scale(empty, no_scale).shape == (0, 10)
    assert KERNELS.add_scaled(empty, empty, no_scale).shape == (0, 10)
    assert KERNELS.scale_and_dot_(empty.clone(), empty, no_scale).shape == (0,)


def test_broadcasts_promotions_and_float_scales_get_pytorchs_results(monkeypatch):
    """Inputs outside the kernels' contract (a base row broadcast over the update, a scale of another dtype, which
    PyTorch promotes to, a Python float scale) are PyTorch's: same shape and dtype, no kernel launched."""
    monkeypatch.setattr(row_kernels, "scale_rows", lambda *a, **k: pytest.fail("kernel launched"))
    monkeypatch.setattr(row_kernels, "scale_rows_and_dot_", lambda *a, **k: pytest.fail("kernel launched"))
    a, base, scale = _rows(4, 8, torch.float16)
    for got, expected in [
        (KERNELS.add_scaled(base[:1], a, scale), torch.addcmul(base[:1], a, scale)),
        (KERNELS.scale(a, scale.float()), a * scale.float()),
        (KERNELS.add_scaled(base, a, scale.float()), torch.addcmul(base, a, scale.float())),
        (KERNELS.scale(a, 0.5), a * 0.5),
        (KERNELS.scale(a, scale.reshape(1, 4)[:, :1].expand(4, 1)[:1]), a * scale[:1]),
    ]:
        assert got.shape == expected.shape and got.dtype == expected.dtype
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(KERNELS.scale_and_dot_(a.clone(), a, 0.5), TORCH_ROWS.scale_and_dot_(a.clone(), a, 0.5))


@pytest.mark.parametrize("d_in, d_out", [(24, 40), (40, 24)])  # the token scale on x, then on δ
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gated_hira_with_the_row_kernels_equals_pytorchs_ops(dtype, d_in, d_out):
    g = torch.Generator().manual_seed(3)
    x, base = torch.randn(2, 9, d_in, generator=g), torch.randn(2, 9, d_out, generator=g)
    A, B = torch.randn(8, d_in, generator=g) * 0.3, torch.randn(d_out, 8, generator=g) * 0.3
    W0, gate = torch.randn(d_out, d_in, generator=g), torch.rand(2, 9, 1, generator=g)
    grad_out = torch.randn(2, 9, d_out, generator=g)

    def run(row_ops):
        leaves = [t.to(dtype).requires_grad_() for t in (x, gate, A, B, base)]
        out = gated_hira(leaves[0], leaves[1], leaves[2], leaves[3], lambda: W0.to(dtype), 0.7, base=leaves[4],
                         row_ops=row_ops)
        grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
        return out, grads

    (out, grads), (out_ref, grads_ref) = run(KERNELS), run(TORCH_ROWS)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}
    torch.testing.assert_close(out, out_ref, **tolerance)
    for name, got, expected in zip(("x", "gate", "A", "B", "base"), grads, grads_ref):
        torch.testing.assert_close(got, expected, **tolerance, msg=lambda m, n=name: f"d{n}: {m}")


def test_gated_hira_under_half_autocast_with_fp32_inputs():
    """An fp32 model under fp16 autocast: fp32 x and δ, half-precision products (δ ΔW in fp16), so the kernels take
    rows of mixed dtypes; outputs and every gradient as with PyTorch's ops."""
    g = torch.Generator().manual_seed(4)
    x, base = torch.randn(2, 9, 40, generator=g), torch.randn(2, 9, 24, generator=g)
    A, B = torch.randn(8, 40, generator=g) * 0.3, torch.randn(24, 8, generator=g) * 0.3
    W0, gate = torch.randn(24, 40, generator=g), torch.rand(2, 9, 1, generator=g)
    grad_out = torch.randn(2, 9, 24, generator=g)

    def run(row_ops):
        leaves = [t.clone().requires_grad_() for t in (x, gate, A, B)]
        with torch.autocast("cpu", dtype=torch.float16):
            out = gated_hira(*leaves, lambda: W0, 0.7, base=base.half(), row_ops=row_ops)
        return out, torch.autograd.grad(out, leaves, grad_out.to(out.dtype))

    (out, grads), (out_ref, grads_ref) = run(KERNELS), run(TORCH_ROWS)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, out_ref, rtol=2e-3, atol=2e-3)
    for name, got, expected in zip(("x", "gate", "A", "B"), grads, grads_ref):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3, msg=lambda m, n=name: f"d{n}: {m}")


def test_rows_for_each_kernel_setting(monkeypatch):
    import gatera_plugin.kernels as dispatch

    cpu = torch.zeros(1)
    cuda = types.SimpleNamespace(device=torch.device("cuda", 0))  # only its device is read
    capability = {0: (9, 0)}
    monkeypatch.setattr(dispatch, "_capability", lambda index: capability[index])
    assert rows_for("torch", cuda) is TORCH_ROWS
    assert rows_for("auto", cpu) is TORCH_ROWS  # off CUDA: PyTorch's ops, also under the interpreter
    assert rows_for("auto", cuda) is row_kernels.TRITON_ROWS
    capability[0] = (8, 9)  # an RTX 40: compile-checked, not timed
    assert rows_for("auto", cuda) is TORCH_ROWS
    for unmeasured in ((10, 0), (12, 0)):  # Blackwell: neither compiled nor timed
        capability[0] = unmeasured
        assert rows_for("auto", cuda) is TORCH_ROWS
    capability[0] = (9, 0)
    monkeypatch.setattr(torch.version, "hip", "6.2")  # an MI250X under ROCm reports 9.0 too
    assert rows_for("auto", cuda) is TORCH_ROWS
    monkeypatch.setattr(torch.version, "hip", None)
    assert rows_for("triton", cuda) is row_kernels.TRITON_ROWS_RAISING
    assert rows_for("triton", cpu) is row_kernels.TRITON_ROWS_RAISING  # under TRITON_INTERPRET=1 (the tests)


def test_a_triton_that_fails_to_import_gives_pytorchs_ops_and_one_warning(monkeypatch):
    """`rows_for("auto")` imported the row kernels (and triton) on every CUDA forward, before the capability check: a
    broken triton install crashed every default gated HiRA forward, also on GPUs that never take the kernels."""
    import gatera_plugin.kernels as dispatch

    cuda = types.SimpleNamespace(device=torch.device("cuda", 0))
    capability = {0: (8, 0)}
    monkeypatch.setattr(dispatch, "_capability", lambda index: capability[index])
    monkeypatch.setitem(sys.modules, "gatera_plugin.kernels.rows", None)  # (importing it raises ImportError)
    monkeypatch.delattr(dispatch, "rows", raising=False)
    monkeypatch.setattr(dispatch, "_WARNED", set())
    dispatch._row_kernels.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert rows_for("auto", cuda) is TORCH_ROWS  # an A100: never imported
        assert dispatch._row_kernels.cache_info().misses == 0
        capability[0] = (9, 0)
        with pytest.warns(RuntimeWarning, match=r"triton is installed but fails to import .* set kernel='torch'"):
            assert rows_for("auto", cuda) is TORCH_ROWS
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert rows_for("auto", cuda) is TORCH_ROWS  # (said once, and tried once)
        assert dispatch._row_kernels.cache_info().misses == 1
        with pytest.raises(RuntimeError, match=r"kernel='triton': triton fails to import .*kernel='auto'"):
            rows_for("triton", cuda)
    finally:
        dispatch._row_kernels.cache_clear()


def test_auto_takes_a_kernel_only_from_its_measured_size(monkeypatch):
    """Below `MIN_ELEMENTS` (where an H200 ran PyTorch's op faster, launch included) "auto" keeps PyTorch's op."""
    launched = []
    monkeypatch.setattr(row_kernels, "scale_rows", lambda a, scale, **k: launched.append(a.numel()) or a * scale)
    monkeypatch.setattr(row_kernels, "scale_rows_and_dot_", lambda p, x, scale: launched.append(-p.numel()))
    rows = row_kernels.TritonRows(min_elements={"scale": 64, "add_scaled": 64, "scale_and_dot_": 48})
    (small, base, s_small), (big, _, s_big) = _rows(3, 16, torch.float32), _rows(4, 16, torch.float32)
    rows.scale(small, s_small)  # 48 elements: PyTorch's op
    rows.scale(big, s_big)
    rows.add_scaled(base, small, s_small)
    rows.scale_and_dot_(small.clone(), small, s_small)
    assert launched == [64, -48]
    assert row_kernels.TRITON_ROWS.min_elements == row_kernels.MIN_ELEMENTS
    assert row_kernels.MIN_ELEMENTS == dict.fromkeys(("scale", "add_scaled", "scale_and_dot_"), 1 << 25)


def test_a_failure_under_auto_warns_once_then_pytorchs_ops(monkeypatch):
    import triton

    monkeypatch.setattr(row_kernels, "ROW_KERNEL_FAILURE", None)
    auto = row_kernels.TritonRows(min_elements=ALWAYS)  # "auto" at sizes where it takes the kernels
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(row_kernels, "scale_rows", failing)
    a, base, scale = _rows(3, 16, torch.float32)
    with pytest.warns(RuntimeWarning, match=r"row kernel failed \(OutOfResources.*kernel='torch'") as record:
        torch.testing.assert_close(auto.scale(a, scale), a * scale)
    assert record[0].filename == __file__  # (the caller's line, not the package's)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(auto.add_scaled(base, a, scale), torch.addcmul(base, a, scale))
    assert len(calls) == 1  # after the failure no kernel is tried again
    with pytest.raises(RuntimeError, match=r"kernel='triton': the Triton row kernel failed \(OutOfResources"):
        row_kernels.TRITON_ROWS_RAISING.scale(a, scale)


def test_errors_that_are_not_tritons_propagate(monkeypatch):
    monkeypatch.setattr(row_kernels, "ROW_KERNEL_FAILURE", None)
    monkeypatch.setattr(row_kernels, "scale_rows", lambda *a, **k: (_ for _ in ()).throw(ValueError("ours")))
    a, _, scale = _rows(3, 16, torch.float32)
    with pytest.raises(ValueError, match="ours"):
        row_kernels.TritonRows(min_elements=ALWAYS).scale(a, scale)
    assert row_kernels.ROW_KERNEL_FAILURE is None
