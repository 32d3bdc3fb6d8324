"""Triton kernels against the PyTorch path, run on CPU by Triton's interpreter (TRITON_INTERPRET=1, set in conftest).

Outputs and every gradient, fp32 and fp16 (the interpreter mishandles bf16 `tl.dot`), odd shapes (not multiples of
the tiles), ranks 8-80, one token and many, gates near 0 and near 1, under autocast; 4-bit weights read in the kernel
bit for bit as bitsandbytes dequantises them; dispatch rules: "auto" only where `TRITON_WINS` says, one warning and
the PyTorch path after a Triton failure (forward or backward), clear errors under "triton", determinism.
Compilation for real GPUs: tests/test_kernel_compile.py.
"""

import os
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("triton")
assert os.environ.get("TRITON_INTERPRET") == "1", "conftest sets TRITON_INTERPRET=1 before triton is imported"

from peft import get_peft_model  # noqa: E402

from gatera_plugin import GateRAConfig  # noqa: E402
from gatera_plugin.kernels.hira_triton import Packed4bit, dequantize_packed, triton_gated_hira  # noqa: E402
from gatera_plugin.kernels.lora_triton import triton_gated_lora  # noqa: E402
from gatera_plugin.ops import gated_hira, gated_lora  # noqa: E402
from tests.helpers import max_error, rounding_bound, tiny_llama, within_tolerance  # noqa: E402

CASES = [  # (tokens, d_in, d_out, r)
    (1, 24, 40, 8),
    (37, 45, 53, 8),
    (70, 33, 17, 16),
    (19, 80, 72, 32),
    (9, 40, 24, 64),
]


def _inputs(n, d_in, d_out, r, dtype, gate_level, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(n, d_in, generator=g),
        "A": torch.randn(r, d_in, generator=g) * 0.3,
        "B": torch.randn(d_out, r, generator=g) * 0.3,
        "base": torch.randn(n, d_out, generator=g),
        "W0": torch.randn(d_out, d_in, generator=g) * 0.5,
    }
    if gate_level == "mixed":
        t["gate"] = torch.rand(n, 1, generator=g)
    elif gate_level == "near0":
        t["gate"] = torch.rand(n, 1, generator=g) * 1e-4
    elif gate_level == "near1":
        t["gate"] = 1 - torch.rand(n, 1, generator=g) * 1e-4
    return {k: v.to(dtype).requires_grad_(k != "W0") for k, v in t.items()}


def _run(kind, t, use_triton, scaling=0.7, with_base=True):
    base = t["base"] if with_base else None
    gate = t.get("gate")
    if kind == "hira":
        fn = triton_gated_hira if use_triton else gated_hira
        out = fn(t["x"], gate, t["A"], t["B"], lambda: t["W0"], scaling, base=base)
    else:
        fn = triton_gated_lora if use_triton else gated_lora
        out = fn(t["x"], gate, t["A"], t["B"], scaling, base=base)
    names = [k for k in ("x", "gate", "A", "B", "base") if k in t and (k != "base" or with_base)]
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    grads = torch.autograd.grad(out, [t[k] for k in names], grad_out)
    return out, dict(zip(names, grads))


@pytest.mark.parametrize("kind", ["hira", "lora"])
@pytest.mark.parametrize("case", CASES, ids=[f"n{c[0]}-in{c[1]}-out{c[2]}-r{c[3]}" for c in CASES])
@pytest.mark.parametrize("gate_level", ["mixed", "near0", "near1", "none"])
def test_fp32_equals_torch_path(kind, case, gate_level):
    t = _inputs(*case, torch.float32, gate_level)
    out, grads = _run(kind, t, True, with_base=gate_level != "near1")
    ref, ref_grads = _run(kind, t, False, with_base=gate_level != "near1")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["hira", "lora"])
@pytest.mark.parametrize("case", CASES[1:4], ids=[f"n{c[0]}-in{c[1]}-out{c[2]}-r{c[3]}" for c in CASES[1:4]])
def test_fp16_error_within_2x_of_torch_fp16(kind, case):
    """Against the fp32 truth, the kernel's fp16 error stays within 2x the PyTorch path's own fp16 error (+2 ulp)."""
    truth_out, truth = _run(kind, _inputs(*case, torch.float32, "mixed"), False)
    ours_out, ours = _run(kind, _inputs(*case, torch.float16, "mixed"), True)
    torch_out, torch16 = _run(kind, _inputs(*case, torch.float16, "mixed"), False)
    assert within_tolerance(ours_out, torch_out, truth_out)[0]
    for name in truth:
        assert ours[name].dtype == torch.float16
        assert within_tolerance(ours[name], torch16[name], truth[name], grad=True)[0], name


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_packed_4bit_weight_is_read_bit_exactly(quant_type, nested, dtype):
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit

    W = torch.randn(48, 128, dtype=dtype)
    try:
        params = bnb.nn.Params4bit(W, requires_grad=False, quant_type=quant_type, compress_statistics=nested).to("cpu")
    except RuntimeError as error:  # bitsandbytes 0.46 (the floor) quantises only nf4 on CPU; CI's newest does fp4 too
        if "must be nf4 on CPU" not in str(error):
            raise
        pytest.skip(f"bitsandbytes {bnb.__version__} quantises only nf4 on CPU")
    expected = dequantize_4bit(params.data, params.quant_state).float()
    packed = Packed4bit.from_params(params)
    assert torch.equal(dequantize_packed(packed), expected)
    # the PyTorch dequantisation (W0 of the PyTorch path after a kernel failure): bnb's values in the quantised dtype
    assert packed.dequantize().dtype == dtype and torch.equal(packed.dequantize().float(), expected)


def test_packed_4bit_layout_matches_reference_on_odd_shapes():
    """bitsandbytes' reference (PyTorch) dequantisation on a row length that is not a multiple of the block size.

    (bitsandbytes 0.50's CPU `dequantize_4bit` disagrees with its own reference there: its C kernel indexes blocks
    per row. The kernels follow the reference layout, which quantize_4bit writes.)
    """
    bnb = pytest.importorskip("bitsandbytes")
    reference = pytest.importorskip("bitsandbytes.backends.default.ops")
    _get_4bit_code = pytest.importorskip("bitsandbytes.backends.utils")._get_4bit_code  # absent in 0.46 (the floor)

    W = torch.randn(48, 80)
    params = bnb.nn.Params4bit(W, requires_grad=False, quant_type="nf4", compress_statistics=False).to("cpu")
    state = params.quant_state
    expected = reference._dequantize_4bit_compute(params.data.reshape(-1), state.absmax, _get_4bit_code("nf4", "cpu"),
                                                  state.blocksize, tuple(state.shape), torch.float32)
    assert torch.equal(dequantize_packed(Packed4bit.from_params(params)), expected)


def test_hira_kernel_with_packed_weight_equals_dense_weight():
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit

    params = bnb.nn.Params4bit(torch.randn(48, 128), requires_grad=False, quant_type="nf4").to("cpu")
    dense = dequantize_4bit(params.data, params.quant_state).float()
    t = _inputs(7, 128, 48, 8, torch.float32, "mixed")
    results = []
    for weight_fn in (lambda: Packed4bit.from_params(params), lambda: dense):
        out = triton_gated_hira(t["x"], t["gate"], t["A"], t["B"], weight_fn, 1.0, base=t["base"])
        grads = torch.autograd.grad(out, [t["x"], t["gate"], t["A"], t["B"]], torch.ones_like(out))
        results.append((out, grads))
    (packed_out, packed_grads), (dense_out, dense_grads) = results
    assert torch.equal(packed_out, dense_out)
    assert all(torch.equal(a, b) for a, b in zip(packed_grads, dense_grads))


def _assert_triton_model_equals_torch_model(make_model, autocast_dtype=None) -> None:
    """`make_model(kernel)` built with kernel="triton" (interpreted) and "torch": same logits and adapter gradients
    (under CPU autocast to `autocast_dtype` if given, to its tolerances)."""
    input_ids = torch.randint(3, 128, (2, 7))
    results = []
    for kernel in ("triton", "torch"):
        torch.manual_seed(0)
        model = make_model(kernel)
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            out = model(input_ids=input_ids, labels=input_ids)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (logits, grads), (ref_logits, ref_grads) = results
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if autocast_dtype is None else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(logits, ref_logits, **tolerance)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **(
            {"rtol": 1e-4, "atol": 1e-6} if autocast_dtype is None else {"rtol": 2e-2, "atol": 1e-3}), msg=name)


@pytest.mark.parametrize("branch", ["hira", "lora"])
def test_model_with_triton_kernels_equals_torch_kernels(branch):
    """A whole GateRA model with kernel="triton" (interpreted) gives the torch path's logits and gradients."""
    extra = {"lora_alpha": 8} if branch == "lora" else {}
    _assert_triton_model_equals_torch_model(lambda kernel: get_peft_model(tiny_llama(), GateRAConfig(
        r=8, target_modules=["q_proj", "down_proj"], branch=branch, init_weights=False, kernel=kernel, **extra)))


@pytest.mark.parametrize("gate", ["sigmoid", "none"])
def test_triton_lora_with_a_structure_gate_under_autocast_equals_torch(gate):
    """`branch="lora"`, `structure_gate=True`, fp16 autocast (the interpreter's stand-in for a bf16 Trainer run): the
    Triton function gets an fp32 gate beside fp16 x, A and B, and its backward mixes them (it raised "expected m1 and
    m2 to have the same dtype" after a refactor)."""
    _assert_triton_model_equals_torch_model(lambda kernel: get_peft_model(tiny_llama(), GateRAConfig(
        r=8, target_modules=["q_proj", "down_proj"], branch="lora", lora_alpha=8, gate=gate, structure_gate=True,
        init_weights=False, kernel=kernel)), autocast_dtype=torch.float16)


@pytest.mark.parametrize("branch", ["hira", "lora"])
def test_triton_model_with_gates_started_nearly_closed_under_fp16_autocast_equals_torch(branch):
    """Token gates started at σ(-10) under fp16 autocast: the Triton functions get the fp32 gate beside fp16 x, A and
    B (the layer no longer casts it to the products' dtype, so that its gradient, s · dot with HiRA's s 1/g0 times
    larger, is formed in fp32), and give the torch path's logits and gradients."""
    extra = {"lora_alpha": 8} if branch == "lora" else {}
    _assert_triton_model_equals_torch_model(lambda kernel: get_peft_model(tiny_llama(), GateRAConfig(
        r=8, target_modules=["q_proj", "down_proj"], branch=branch, gate_bias_init=-10.0, init_weights=False,
        kernel=kernel, **extra)), autocast_dtype=torch.float16)


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16, torch.float32])
def test_4bit_model_with_triton_kernels_equals_torch_kernels(tmp_path, quant_storage):
    """The same on an NF4 base: the kernel dequantises the packed bytes itself, whatever dtype holds them
    (`bnb_4bit_quant_storage`: bf16 for FSDP / ZeRO-3, fp32 as Axolotl's qlora for qwen2_moe, jamba, nemotron_h)."""
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit

    from tests.helpers import load_4bit

    params = bnb.nn.Params4bit(torch.randn(8, 64), requires_grad=False, quant_type="nf4",
                               quant_storage=quant_storage).to("cpu")
    try:
        dequantize_4bit(params.data, params.quant_state)
    except RuntimeError as error:  # bitsandbytes 0.46 (the floor) dequantises only uint8 storage on CPU
        pytest.skip(f"bitsandbytes {bnb.__version__} on CPU: {error}")

    tiny_llama(hidden=64, intermediate=128, init_std=0.2).save_pretrained(tmp_path)
    _assert_triton_model_equals_torch_model(lambda kernel: get_peft_model(load_4bit(tmp_path, quant_storage=quant_storage), GateRAConfig(
        r=8, target_modules=["down_proj"], init_weights=False, kernel=kernel)))


def test_auto_takes_the_torch_path_off_cuda(monkeypatch):
    import gatera_plugin.kernels.hira_triton as kernels

    def fail(*args, **kwargs):
        raise AssertionError("the Triton kernel must not run for CPU tensors with kernel='auto'")

    monkeypatch.setattr(kernels, "triton_gated_hira", fail)
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj"], init_weights=False))
    model(input_ids=torch.randint(3, 128, (1, 5))).logits.sum().backward()


def test_triton_off_cuda_without_interpreter_is_refused_clearly():
    code = (
        "import torch, gatera_plugin; from peft import get_peft_model; from tests.helpers import TwoLinear; "
        "m = get_peft_model(TwoLinear(), gatera_plugin.GateRAConfig(target_modules=['lin0'], kernel='triton')); "
        "m(torch.randn(2, 12))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode != 0
    assert "kernel='triton' runs on CUDA tensors" in done.stderr and "TRITON_INTERPRET=1" in done.stderr


# ----------------------------------------------------------------------------------------------- kernel="auto" dispatch
@pytest.fixture
def auto_takes_triton(monkeypatch):
    """Pretend that "auto" runs on a GPU where a measurement put every case in Triton's favour: the predicate sees a
    CUDA case for the interpreted CPU tensors, `TRITON_WINS` covers it. Returns the list of cases it judged."""
    import gatera_plugin.kernels as dispatch

    cases = []

    def case_on_cpu(layer, adapter_name, branch, x, dtype):
        cases.append(dispatch.KernelCase(branch, (9, 0), dtype, layer.r[adapter_name], x.numel() // x.shape[-1],
                                         False))
        return cases[-1]

    monkeypatch.setattr(dispatch, "kernel_case", case_on_cpu)
    monkeypatch.setattr(dispatch, "TRITON_WINS", tuple(
        dispatch.TritonWin(branch, (8, 0), (torch.float32, torch.float16, torch.bfloat16), 512, 1)
        for branch in ("hira", "lora")))
    monkeypatch.setattr(dispatch, "_WARNED", set())
    return cases


def _counting(monkeypatch, module, name, fail_with=None, calls=None, entry=lambda args: args[0].dtype):
    """Wrap the kernel `module.name` so that each launch appends `entry(args)` (default: the dtype of the first
    argument) to `calls` (a new list unless given; returned), and raises `fail_with()` when given."""
    kernel = getattr(module, name)
    calls = [] if calls is None else calls

    class Wrapped:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append(entry(args))
                if fail_with is not None:
                    raise fail_with()
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(module, name, Wrapped())
    return calls


def _model_step(branch, kernel, input_ids, seed=0):
    extra = {"lora_alpha": 8} if branch == "lora" else {}
    torch.manual_seed(seed)
    model = get_peft_model(tiny_llama(), GateRAConfig(r=8, target_modules=["q_proj", "down_proj"], branch=branch,
                                                      init_weights=False, kernel=kernel, **extra))
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    return model, out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_step(got, expected):
    (_, logits, grads), (_, ref_logits, ref_grads) = got, expected
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_auto_is_the_torch_path_until_a_gpu_measurement_says_otherwise():
    """No measured region yet: the predicate rejects even the GPU case the kernels were designed for."""
    import gatera_plugin.kernels as dispatch

    assert dispatch.TRITON_WINS == ()
    assert not dispatch.triton_wins(dispatch.KernelCase("hira", (9, 0), torch.bfloat16, 32, 16384, False))
    win = dispatch.TritonWin("hira", (9, 0), (torch.bfloat16,), 64, 4096, quantized=False)
    assert win.covers(dispatch.KernelCase("hira", (9, 0), torch.bfloat16, 32, 16384, False))
    for other in [("lora", (9, 0), torch.bfloat16, 32, 16384, False), ("hira", (8, 9), torch.bfloat16, 32, 16384, False),
                  ("hira", (9, 0), torch.float32, 32, 16384, False), ("hira", (9, 0), torch.bfloat16, 128, 16384, False),
                  ("hira", (9, 0), torch.bfloat16, 32, 1024, False), ("hira", (9, 0), torch.bfloat16, 32, 16384, True)]:
        assert not win.covers(dispatch.KernelCase(*other)), other


# `_model_step`'s launches of the counted kernel: two adapted layers per block, two blocks. HiRA builds its ΔW block
# in forward and again in backward, except in the first q_proj's backward: its input needs no gradient, and its
# gate's gradient comes from the update that forward kept (no δ ΔW)
_KERNEL_RUNS_PER_STEP = {"hira": 2 * 2 * 2 - 1, "lora": 2 * 2}


@pytest.mark.parametrize("branch", ["hira", "lora"])
def test_auto_takes_the_kernels_where_the_predicate_says(auto_takes_triton, monkeypatch, branch):
    import gatera_plugin.kernels.hira_triton as hira_kernels
    import gatera_plugin.kernels.lora_triton as lora_kernels

    module, name = (hira_kernels, "_hira_delta_kernel") if branch == "hira" else (lora_kernels, "_lora_fwd_kernel")
    calls = _counting(monkeypatch, module, name)
    input_ids = torch.randint(3, 128, (2, 7))
    _assert_same_step(_model_step(branch, "auto", input_ids), _model_step(branch, "torch", input_ids))
    assert len(calls) == _KERNEL_RUNS_PER_STEP[branch]
    assert {(c.branch, c.n_tokens, c.rank) for c in auto_takes_triton} == {(branch, 14, 8)}


@pytest.mark.parametrize("branch", ["hira", "lora"])
def test_auto_takes_the_pytorch_path_while_torch_compile_traces(auto_takes_triton, monkeypatch, branch):
    """Under torch.compile "auto" runs PyTorch's ops, which it compiles itself (as for the row kernels), without
    judging the case: on CUDA that query reads the device's capability, a graph break per layer."""
    import gatera_plugin.kernels.hira_triton as hira_kernels
    import gatera_plugin.kernels.lora_triton as lora_kernels

    module, name = (hira_kernels, "_hira_delta_kernel") if branch == "hira" else (lora_kernels, "_lora_fwd_kernel")
    calls = _counting(monkeypatch, module, name)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    input_ids = torch.randint(3, 128, (2, 7))
    _model_step(branch, "auto", input_ids)
    assert calls == [] and auto_takes_triton == []


TRITON_FAILURES = {
    "out-of-resources": lambda: __import__("triton").runtime.errors.OutOfResources(232448, 166912, "shared memory"),
    "compile-error": lambda: __import__("triton").compiler.errors.CompilationError("def k(): ...", None, "boom"),
    # what the CUDA launcher raises (from inside the triton package) for a CPU tensor or a failed launch
    "launcher": lambda: _raised_in_triton(ValueError("Pointer argument (at 0) cannot be accessed from Triton "
                                                     "(cpu tensor?)")),
    # raised outside the triton package by what Triton calls: gcc failing on the launcher's C source (no Python.h),
    # the kernel cache's folder under a read-only home (the innermost frames are subprocess's and os's)
    "launcher-build": lambda: _raised_below_triton("import subprocess, sys\n"
                                                   "subprocess.check_call([sys.executable, '-c', 'raise SystemExit(1)'])"),
    "cache-folder": lambda: _raised_below_triton("import os\nos.makedirs(os.devnull + '/triton-cache')"),
}


def _raised_below_triton(code):
    """The error that `code` raises when a triton module runs it (its own frames are the standard library's)."""
    scope = {"__name__": "triton.runtime.build"}
    exec("def build():\n" + "".join(f"    {line}\n" for line in code.splitlines()), scope)  # noqa: S102
    try:
        scope["build"]()
    except Exception as raised:  # noqa: BLE001
        return raised


def _raised_in_triton(error):
    """`error`, with a traceback whose innermost frame belongs to a triton module (as the launcher's errors do)."""
    scope = {"__name__": "triton.backends.nvidia.driver", "error": error}
    exec("def launch():\n    raise error\n", scope)  # noqa: S102
    try:
        scope["launch"]()
    except type(error) as raised:
        return raised


@pytest.mark.parametrize("failure", list(TRITON_FAILURES))
@pytest.mark.parametrize("where", ["_hira_delta_kernel", "_hira_mask_kernel"])  # forward and backward, backward only
def test_auto_falls_back_once_per_cause_with_the_torch_paths_results(auto_takes_triton, monkeypatch, failure,
                                                                      where):
    """A failing kernel (forward or backward) under "auto": one warning naming the cause and kernel='torch', then the
    PyTorch path for that layer from then on; logits and gradients equal the PyTorch path's."""
    import gatera_plugin.kernels.hira_triton as hira_kernels

    error = TRITON_FAILURES[failure]
    calls = _counting(monkeypatch, hira_kernels, where, fail_with=error)
    input_ids = torch.randint(3, 128, (2, 7))
    with pytest.warns(RuntimeWarning) as record:
        got = _model_step("hira", "auto", input_ids)
    messages = [str(w.message) for w in record if "Triton" in str(w.message)]
    assert len(messages) == 1, messages
    assert type(error()).__name__ in messages[0] and "kernel='torch'" in messages[0]
    assert [w.filename for w in record if "Triton" in str(w.message)] == [__file__]  # (the line that ran the step)
    model = got[0]
    failed = [m for m in model.modules() if getattr(m, "triton_failures", None)]
    assert len(failed) == 4 and all(set(m.triton_failures) == {"default"} for m in failed)
    _assert_same_step(got, _model_step("hira", "torch", input_ids))

    launched = len(calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=input_ids, labels=input_ids).loss.backward()  # remembered: no new launch, no new warning
    assert len(calls) == launched


def test_auto_falls_back_on_a_4bit_base_in_backward(auto_takes_triton, monkeypatch, tmp_path):
    """The mask kernel (backward only) fails on an NF4 base: the step's gradients come from the PyTorch path, with W0
    dequantised by PyTorch from the packed bytes, and equal a kernel="torch" run's."""
    pytest.importorskip("bitsandbytes")
    import gatera_plugin.kernels.hira_triton as hira_kernels
    from tests.helpers import load_4bit

    tiny_llama(hidden=64, intermediate=128, init_std=0.2).save_pretrained(tmp_path)
    _counting(monkeypatch, hira_kernels, "_hira_mask_kernel", fail_with=TRITON_FAILURES["out-of-resources"])
    with pytest.warns(RuntimeWarning, match="OutOfResources"):
        _assert_triton_model_equals_torch_model(lambda kernel: get_peft_model(load_4bit(tmp_path), GateRAConfig(
            r=8, target_modules=["down_proj"], init_weights=False, kernel="auto" if kernel == "triton" else kernel)))


def test_errors_chained_through_triton_are_classified_by_the_whole_chain():
    """An OOM anywhere in the chain is the run's (not a kernel failure to fall back from); a context the code
    suppressed (`raise ... from None`) is not read."""
    from gatera_plugin.kernels import is_triton_failure

    inside = _raised_in_triton(RuntimeError("launch failed"))
    assert is_triton_failure(inside)
    try:
        raise ValueError("our own error") from None
    except ValueError as suppressed:
        suppressed.__context__ = inside
        assert not is_triton_failure(suppressed)
    oom = torch.OutOfMemoryError("CUDA out of memory")
    assert not is_triton_failure(_raised_in_triton(RuntimeError("CUDA error: out of memory")))
    wrapped = RuntimeError("while launching")
    wrapped.__cause__ = oom
    assert not is_triton_failure(wrapped)


def test_auto_does_not_swallow_errors_that_are_not_tritons(auto_takes_triton, monkeypatch):
    import gatera_plugin.kernels.hira_triton as hira_kernels

    _counting(monkeypatch, hira_kernels, "_hira_delta_kernel", fail_with=lambda: ZeroDivisionError("our bug"))
    with pytest.raises(ZeroDivisionError, match="our bug"):
        _model_step("hira", "auto", torch.randint(3, 128, (2, 7)))


@pytest.mark.parametrize("where", ["_hira_delta_kernel", "_hira_mask_kernel"])
def test_triton_raises_kernel_failures_naming_the_setting(monkeypatch, where):
    import gatera_plugin.kernels.hira_triton as hira_kernels

    _counting(monkeypatch, hira_kernels, where, fail_with=TRITON_FAILURES["out-of-resources"])
    with pytest.raises(RuntimeError, match=r"kernel='triton': the Triton hira kernel failed \(OutOfResources: out of "
                                           r"resource: shared memory.*kernel='torch'"):
        _model_step("hira", "triton", torch.randint(3, 128, (2, 7)))


def test_triton_on_a_gpu_before_sm80_warns_once_that_half_kernels_spill(monkeypatch):
    """A T4 (sm_75): the fp16 / bf16 kernels compile there but spill registers (`python tests/test_kernel_compile.py
    --arch 75`), so kernel="triton" warns once per capability, naming kernel='auto'; fp32 there and half precision
    on sm_80+ (compile-checked without spills) do not warn."""
    import gatera_plugin.kernels as dispatch

    capability = {0: (7, 5)}
    monkeypatch.setattr(dispatch, "_capability", lambda index: capability[index])
    monkeypatch.setattr(dispatch, "_WARNED", set())
    cuda = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning, match=r"kernel='triton' on a GPU of compute capability 7\.5 .*in float16 the "
                                            r"hira kernels spill registers.*kernel='auto'"):
        dispatch._check_triton("hira", cuda, torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatch._check_triton("lora", cuda, torch.bfloat16)  # warned once for this capability
        dispatch._check_triton("hira", cuda, torch.float32)
        for capability[0] in [(8, 0), (8, 6), (8, 9), (9, 0)]:
            dispatch._check_triton("hira", cuda, torch.bfloat16)


def test_no_tile_configuration_fits_refused_up_front(auto_takes_triton, monkeypatch):
    """A device with too little shared memory: "triton" refuses before launching, "auto" falls back."""
    import gatera_plugin.kernels.blocks as blocks
    import gatera_plugin.kernels.hira_triton as hira_kernels

    monkeypatch.setattr(blocks, "device_smem", lambda device: 8 * 1024)
    calls = _counting(monkeypatch, hira_kernels, "_hira_delta_kernel")
    input_ids = torch.randint(3, 128, (2, 7))
    with pytest.raises(RuntimeError, match="kernel='triton'.*KernelUnsupported: the hira_delta kernel needs more shared "
                                           "memory"):
        _model_step("hira", "triton", input_ids)
    with pytest.warns(RuntimeWarning, match="KernelUnsupported"):
        got = _model_step("hira", "auto", input_ids)
    _assert_same_step(got, _model_step("hira", "torch", input_ids))
    assert calls == []


@pytest.mark.parametrize("branch", ["hira", "lora"])
def test_deterministic_mode_runs_the_kernels_bit_for_bit(auto_takes_triton, monkeypatch, branch):
    """No kernel accumulates with atomics: under torch.use_deterministic_algorithms(True) "auto" and "triton" still
    take the kernels, and two runs give bitwise-equal logits and gradients."""
    import gatera_plugin.kernels.hira_triton as hira_kernels
    import gatera_plugin.kernels.lora_triton as lora_kernels

    module, name = (hira_kernels, "_hira_delta_kernel") if branch == "hira" else (lora_kernels, "_lora_fwd_kernel")
    calls = _counting(monkeypatch, module, name)
    input_ids = torch.randint(3, 128, (2, 7))
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    # (on CPU "auto" leaves the gate's row operations to PyTorch and "triton" runs their kernels: each is run twice)
    runs = [_model_step(branch, kernel, input_ids) for kernel in ("auto", "auto", "triton", "triton")]
    assert len(calls) == 4 * _KERNEL_RUNS_PER_STEP[branch]  # every run took the kernels
    for (_, logits, grads), (_, logits2, grads2) in (runs[:2], runs[2:]):
        assert torch.equal(logits, logits2) and all(torch.equal(grads[n], grads2[n]) for n in grads)


@pytest.mark.parametrize("kind", ["hira", "lora"])
def test_kernels_compute_in_the_autocast_dtype(monkeypatch, kind):
    """Under autocast (fp16 here: the interpreter mishandles bf16 dots) the kernels take fp16 operands like the
    PyTorch path's matmuls: same output dtype, error against the fp32 truth within 2x the PyTorch path's (+2 ulp),
    gradients in the parameters' fp32."""
    import gatera_plugin.kernels.hira_triton as hira_kernels
    import gatera_plugin.kernels.lora_triton as lora_kernels

    module, name = (hira_kernels, "_hira_mask_kernel") if kind == "hira" else (lora_kernels, "_lora_bwd_db_kernel")
    calls = _counting(monkeypatch, module, name)
    t = _inputs(19, 80, 72, 32, torch.float32, "mixed")
    truth_out, truth = _run(kind, t, False)
    with torch.autocast("cpu", dtype=torch.float16):
        ours_out, ours = _run(kind, t, True)
        torch_out, torch16 = _run(kind, t, False)
    assert ours_out.dtype == torch_out.dtype and calls == [torch.float16]  # the backward kernel's gradient: fp16
    assert 0 < max_error(ours_out, truth_out) <= rounding_bound(torch_out, truth_out, torch.float16)
    for name in truth:
        assert ours[name].dtype == truth[name].dtype == torch.float32, name
        # fp32 gradients of fp16 products: held to fp16's rule
        assert max_error(ours[name], truth[name]) <= rounding_bound(torch16[name], truth[name], torch.float16), name


def test_block_choice_fits_every_rank_and_device():
    """Ranks are walked in chunks, so r = 512 launches the tiles of r = 32 on every GPU from sm_75 up."""
    from gatera_plugin.kernels import SMEM_BY_CAPABILITY
    from gatera_plugin.kernels.blocks import KERNEL_NAMES, choose_blocks

    for kernel in KERNEL_NAMES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            big = choose_blocks(kernel, dtype, 32, SMEM_BY_CAPABILITY[(9, 0)])
            for smem in SMEM_BY_CAPABILITY.values():
                for r in (1, 8, 16, 32, 64, 128, 256, 512):
                    blocks = choose_blocks(kernel, dtype, r, smem)
                    assert blocks is not None and blocks.smem_bound(kernel, dtype.itemsize) <= smem
                    assert blocks.RB == (16 if r <= 16 else 32)
            assert choose_blocks(kernel, dtype, 512, SMEM_BY_CAPABILITY[(9, 0)]) == big
            if kernel != "hira_mask":  # the only kernel without tl.dot tiles
                assert choose_blocks(kernel, dtype, 32, 8 * 1024) is None


@pytest.mark.parametrize("kind", ["hira", "lora"])
def test_ranks_beyond_one_chunk_equal_torch_path(kind):
    """r = 80: three rank chunks of 32, the last one partial."""
    t = _inputs(21, 40, 36, 80, torch.float32, "mixed")
    out, grads = _run(kind, t, True)
    ref, ref_grads = _run(kind, t, False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_every_launch_runs_on_the_inputs_device(monkeypatch):
    """Each kernel launch happens inside `device_guard(x)` (torch.cuda.device(x.device) on CUDA: multi-GPU
    device_map in one process launches on the tensor's GPU, not the current one)."""
    import contextlib

    import gatera_plugin.kernels.hira_triton as hira_kernels
    import gatera_plugin.kernels.lora_triton as lora_kernels

    guarded, launched = [], []

    @contextlib.contextmanager
    def guard(x):
        guarded.append(x.device)
        try:
            yield
        finally:
            guarded.pop()

    for module in (hira_kernels, lora_kernels):
        monkeypatch.setattr(module, "device_guard", guard)
    for module, names in ((hira_kernels, ("_hira_delta_kernel", "_hira_mask_kernel")),
                          (lora_kernels, ("_lora_fwd_kernel", "_lora_bwd_db_kernel"))):
        for name in names:
            _counting(monkeypatch, module, name, calls=launched, entry=lambda args, name=name: (name, list(guarded)))
    for kind in ("hira", "lora"):
        _run(kind, _inputs(9, 40, 24, 8, torch.float32, "mixed"), True)
    assert [name for name, _ in launched] == ["_hira_delta_kernel", "_hira_delta_kernel", "_hira_mask_kernel",
                                              "_lora_fwd_kernel", "_lora_bwd_db_kernel"]
    assert all(devices == [torch.device("cpu")] for _, devices in launched)


def test_an_adapter_saved_with_triton_loads_where_the_kernels_cannot_run(tmp_path, monkeypatch):
    """An adapter trained with kernel='triton' on a GPU could not be loaded for inference on a machine without triton
    (macOS, a CPU box): the config refused it. It loads with kernel='auto' (the same results) and a warning; a new
    config asking for the kernels there is still refused."""
    from peft import PeftModel

    import gatera_plugin.config as config_module

    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=["q_proj"], kernel="triton"))
    model.save_pretrained(tmp_path)
    monkeypatch.setattr(config_module, "triton_runs_here", lambda: False)
    monkeypatch.setattr(config_module, "triton_available", lambda: False)
    with pytest.warns(UserWarning, match=r"saved with kernel='triton', whose kernels cannot run here .* kernel='auto'"):
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].kernel == "auto"
    with pytest.raises(ValueError, match=r"kernel='triton' needs the `triton` package"):
        GateRAConfig(r=4, target_modules=["q_proj"], kernel="triton")
