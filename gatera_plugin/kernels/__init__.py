"""Triton kernels (CUDA) for the gated branches, and the choice between them and the exact PyTorch path.

`GateRAConfig(kernel=...)`:

- "torch": always the PyTorch path (`gatera_plugin.ops`), with PyTorch's ops only.
- "auto" (default): the branch's Triton kernels only for a case listed in `TRITON_WINS`, the cases where a GPU
  measurement showed them beating the PyTorch path (device capability, compute dtype, rank, token count); the
  PyTorch path everywhere else. On an H200 (bench/results/gpu_check.json) the branch kernels won no case by more than
  noise (dense bf16: 0.99-1.02x the PyTorch path at 16k tokens, 1.28x slower at 4096 x 4096 with 4k tokens; NF4:
  1.11-1.34x slower), so the table is empty. On CUDA GPUs of compute capability 9.0+ the PyTorch path of a gated
  HiRA layer runs the token gate's row operations with the kernels of `rows.py` where the rows hold at least
  `rows.MIN_ELEMENTS` elements (2^25, where they won on the H200: bench/results/row_ops.json), PyTorch's ops
  elsewhere (`rows_for`). Under "auto" any Triton failure (compile error, `OutOfResources`, launcher or pointer
  error) warns once, naming the cause, and sends that layer to the PyTorch path (the row operations: every layer to
  PyTorch's ops) for good (in backward too: the gradients are then the PyTorch path's).
- "triton": the kernels wherever they can run (the row kernels at every size), errors raised: off CUDA (except under
  TRITON_INTERPRET=1, Triton's CPU interpreter, which the tests use), in float64, or where no tile configuration fits
  the device's shared memory.

No kernel accumulates with atomics (each output element is written by one program), so the kernels are
deterministic and `torch.use_deterministic_algorithms(True)` needs no exception for them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from .._stack import user_stacklevel
from ..ops.rows import TORCH_ROWS

KERNELS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_TOKENS = 2**31 - 1  # grid axis 0 and the int32 token-count argument; offsets themselves are int64
# "auto" takes the token gate's row kernels (`kernels/rows.py`) on NVIDIA GPUs of these compute capabilities only:
# 9.0 (H100 / H200), the generation measured. Elsewhere (A100, RTX 30/40: compile-checked for sm_80 only, not timed;
# Blackwell, sm_100 / sm_120: neither; AMD GPUs under ROCm, whose gfx90a / gfx942 torch reports as 9.0 / 9.4: never
# run) it keeps PyTorch's ops.
ROW_KERNEL_CAPABILITIES = frozenset({(9, 0)})
# below it (a T4, sm_75) the fp16 / bf16 branch kernels spill up to 1.5 KB of registers per thread
# (`python tests/test_kernel_compile.py --arch 75`): kernel="triton" warns there
SPILL_FREE_CAPABILITY = (8, 0)


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_here() -> bool:
    """Whether kernel='triton' can run on this machine: triton installed, and a CUDA device (or the interpreter)."""
    return triton_available() and (interpreting() or torch.cuda.is_available())


# ----------------------------------------------------------------------------------------------- where Triton wins
@dataclass(frozen=True)
class KernelCase:
    """One call of a branch, as the "auto" predicate sees it."""

    branch: str  # "hira" | "lora"
    capability: tuple[int, int]  # CUDA compute capability, e.g. (9, 0)
    dtype: torch.dtype  # compute dtype (the autocast dtype under autocast)
    rank: int
    n_tokens: int
    quantized: bool  # 4-bit base weight (HiRA reads the packed bytes)


@dataclass(frozen=True)
class TritonWin:
    """A measured region where the Triton kernels beat the PyTorch path (`bench/gpu_check.py` on a GPU)."""

    branch: str
    min_capability: tuple[int, int]
    dtypes: tuple[torch.dtype, ...]
    max_rank: int
    min_tokens: int
    max_tokens: int = MAX_TOKENS
    quantized: Optional[bool] = None  # None: dense and 4-bit alike

    def covers(self, case: KernelCase) -> bool:
        return (case.branch == self.branch and case.capability >= self.min_capability and case.dtype in self.dtypes
                and case.rank <= self.max_rank and self.min_tokens <= case.n_tokens <= self.max_tokens
                and self.quantized in (None, case.quantized))


# Empty: on an H200 the kernels beat the PyTorch path in no case by more than run-to-run noise (README, "Triton
# kernels"; bench/results/gpu_check.json). Add a `TritonWin` per region a measurement supports, e.g.
# TritonWin("hira", (9, 0), (torch.bfloat16,), 64, 4096).
TRITON_WINS: tuple[TritonWin, ...] = ()


def triton_wins(case: KernelCase) -> bool:
    """The "auto" predicate: whether `case` lies in a measured region where Triton beats the PyTorch path."""
    return case.n_tokens <= MAX_TOKENS and any(win.covers(case) for win in TRITON_WINS)


# ----------------------------------------------------------------------------------------------- helpers for the kernels
def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a branch computes in: the autocast dtype when autocast is on for x's device, else x's dtype (also
    for float64, which autocast does not cast)."""
    if x.is_floating_point() and x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def device_guard(x: torch.Tensor):
    """Launch on x's GPU (not the current one: multi-GPU `device_map` in one process); a no-op off CUDA."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


# Opt-in shared memory per block (bytes) by compute capability, where torch does not report it.
SMEM_BY_CAPABILITY = {(7, 0): 98304, (7, 5): 65536, (8, 0): 166912, (8, 6): 101376, (8, 7): 166912,
                      (8, 9): 101376, (9, 0): 232448}


def device_smem(device: torch.device) -> int:
    """Shared memory a kernel may use per block on `device`; off CUDA (the interpreter) sm_80's."""
    if device.type != "cuda":
        return SMEM_BY_CAPABILITY[(8, 0)]
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", 0)
    return smem or SMEM_BY_CAPABILITY.get((props.major, props.minor), 49152)


def torch_path_grads(function, tensors, need, grad_out, *args) -> tuple:
    """Gradients of the PyTorch path `function.apply(None, x, gate, A, B, *args)` for the tensors in `tensors` =
    (x, gate, A, B) flagged in `need` (None elsewhere): the backward fallback after a Triton failure."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(n) if t is not None else None for t, n in zip(tensors, need)]
        out = function.apply(None, *leaves, *args)
        wanted = [leaf for leaf, n in zip(leaves, need) if n]
        grads = iter(torch.autograd.grad(out, wanted, grad_out.to(out.dtype)))
    return tuple(next(grads) if n else None for n in need)


# ----------------------------------------------------------------------------------------------- failures
class KernelUnsupported(RuntimeError):
    """The host wrapper refuses a launch up front (e.g. no tile configuration fits the device's shared memory)."""


def is_triton_failure(error: BaseException) -> bool:
    """A failure of Triton itself: its own errors (compilation, `OutOfResources`, PTXAS), an error raised inside the
    triton package (its launcher: CUDA errors, "Pointer argument cannot be accessed from Triton", ...), or a launch
    our host wrappers refuse up front (`KernelUnsupported`)."""
    if isinstance(error, KeyboardInterrupt):  # (an OOM: `_raised_inside_triton` reads the whole chain for one)
        return False
    if isinstance(error, KernelUnsupported):
        return True
    triton_errors = sys.modules.get("triton.errors")
    if triton_errors is not None and isinstance(error, triton_errors.TritonError):
        return True
    return _raised_inside_triton(error)


def _raised_inside_triton(error: BaseException) -> bool:
    """Whether any frame between the launch and the raise belongs to the triton package, for `error` or an error it
    was raised from (not only the innermost frame: Triton's launcher build raises `CalledProcessError` in
    `subprocess` when gcc fails, its cache `PermissionError` in `os` under a read-only home)."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    if any(isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e) for e in chain):
        return False  # (memory is the run's to manage, not a kernel failure to fall back from)
    for error in chain:
        traceback = error.__traceback__
        while traceback is not None:
            module = traceback.tb_frame.f_globals.get("__name__", "")
            if module == "triton" or module.startswith("triton."):
                return True
            traceback = traceback.tb_next
    return False


_WARNED: set[str] = set()


def _failure_cause(error: BaseException) -> str:
    message = str(error).strip()
    return f"{type(error).__name__}: {message.splitlines()[0]}" if message else type(error).__name__


def _fall_back(layer, adapter_name: str, branch: str, error: BaseException) -> bool:
    """`on_failure` under kernel="auto": a Triton failure sends this layer's adapter to the PyTorch path for good,
    with one warning per distinct cause; True when handled (other errors propagate)."""
    if not is_triton_failure(error):
        return False
    cause = _failure_cause(error)
    layer.triton_failures[adapter_name] = cause
    if cause not in _WARNED:
        _WARNED.add(cause)
        warnings.warn(
            f"GateRA: the Triton {branch} kernel failed ({cause}); this layer, and any other that fails the same "
            "way, uses the PyTorch path from now on (same results). Set kernel='torch' to skip the kernels, or "
            "kernel='triton' to raise such errors.",
            RuntimeWarning, stacklevel=user_stacklevel(),
        )
    return True


def _raise_clearly(branch: str, error: BaseException) -> bool:
    """`on_failure` under kernel="triton": a Triton failure is raised again, naming the setting."""
    if not is_triton_failure(error):
        return False
    raise RuntimeError(
        f"kernel='triton': the Triton {branch} kernel failed ({_failure_cause(error)}). Use kernel='auto' (the "
        "PyTorch path wherever the kernels are not known to work and win) or kernel='torch'."
    ) from error


# ----------------------------------------------------------------------------------------------- dispatch
def rows_for(kernel: str, x: torch.Tensor):
    """What runs a gated HiRA layer's passes over rows of activations (`ops.rows.TorchRows`' operations) for the
    layer's `kernel` setting and input x: PyTorch's ops for "torch" and off CUDA, the Triton row kernels
    (`kernels/rows.py`) on CUDA for "auto" on the NVIDIA GPUs measured (`ROW_KERNEL_CAPABILITIES`; a Triton
    failure then warns once and PyTorch's ops take over; a triton that fails to import too) and for "triton" (errors
    raised; also on CPU under TRITON_INTERPRET=1). While torch.compile traces the model, PyTorch's ops (which it
    compiles and fuses itself)."""
    if kernel == "torch" or not triton_available() or torch.compiler.is_compiling() or (
            x.device.type != "cuda" and not (kernel == "triton" and interpreting())):
        return TORCH_ROWS
    if kernel == "triton":
        rows = _row_kernels()
        if isinstance(rows, BaseException):
            raise RuntimeError(f"kernel='triton': triton fails to import ({_failure_cause(rows)}). Repair or reinstall "
                               "triton, or use kernel='auto' or kernel='torch'.") from rows
        return rows.TRITON_ROWS_RAISING
    if torch.version.hip is not None or _capability(x.device.index) not in ROW_KERNEL_CAPABILITIES:
        return TORCH_ROWS
    rows = _row_kernels()
    if isinstance(rows, BaseException):  # (a broken triton install: optional acceleration must not fail a run)
        cause = _failure_cause(rows)
        if f"import: {cause}" not in _WARNED:
            _WARNED.add(f"import: {cause}")
            warnings.warn(
                f"GateRA: triton is installed but fails to import ({cause}), so the token gate's row "
                "operations use PyTorch's ops (the same results). Repair or uninstall triton, or set kernel='torch'.",
                RuntimeWarning, stacklevel=user_stacklevel(),
            )
        return TORCH_ROWS
    return rows.TRITON_ROWS


@functools.cache
def _row_kernels():
    """The `kernels.rows` module, or the error importing it (and triton) raised: tried once per process (a failed
    import leaves no module behind, so each forward would run triton's `__init__` again)."""
    try:
        from . import rows
    except Exception as error:  # noqa: BLE001  (the callers decide: warn under "auto", raise under "triton")
        return error
    return rows


@functools.cache
def _capability(index: Optional[int]) -> tuple[int, int]:
    """The compute capability of CUDA device `index` (None: the current one), asked once per device."""
    return torch.cuda.get_device_capability(index)


def _check_triton(branch: str, device: torch.device, dtype: torch.dtype) -> None:
    """kernel="triton": raise a clear error where the kernels cannot run."""
    if dtype not in KERNEL_DTYPES:
        raise ValueError(
            f"kernel='triton' runs float32, float16 and bfloat16 inputs, got {dtype}. Use kernel='torch' (or 'auto', "
            "which falls back to the PyTorch path) for other dtypes."
        )
    if not triton_available():
        raise ImportError("kernel='triton' needs the `triton` package (`pip install gatera-plugin[triton]`).")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"kernel='triton' runs on CUDA tensors, but this layer's input is on {device}. Use kernel='auto' (the "
            "exact PyTorch path off CUDA) or kernel='torch'; to run the kernels on CPU in Triton's interpreter "
            "(slow, for tests) set TRITON_INTERPRET=1 before importing triton."
        )
    if device.type == "cuda" and dtype != torch.float32 and not torch.compiler.is_compiling():
        capability = _capability(device.index)
        if capability < SPILL_FREE_CAPABILITY and (cause := f"spills on sm_{capability[0]}{capability[1]}") not in _WARNED:
            _WARNED.add(cause)
            warnings.warn(
                f"GateRA: kernel='triton' on a GPU of compute capability {capability[0]}.{capability[1]} (before "
                f"{SPILL_FREE_CAPABILITY[0]}.{SPILL_FREE_CAPABILITY[1]}): in {str(dtype).removeprefix('torch.')} the "
                f"{branch} kernels spill registers there (compile-checked for a T4, sm_75) and run slowly. Use "
                "kernel='auto' (the PyTorch path there) or kernel='torch'.",
                RuntimeWarning, stacklevel=user_stacklevel(),
            )


def kernel_case(layer, adapter_name: str, branch: str, x: torch.Tensor, dtype: torch.dtype) -> Optional[KernelCase]:
    """The call as "auto" judges it, or None where the kernels cannot run at all (off CUDA, other dtypes, no
    triton)."""
    if x.device.type != "cuda" or dtype not in KERNEL_DTYPES or not triton_available():
        return None
    quantized = getattr(layer.get_base_layer().weight, "quant_state", None) is not None
    return KernelCase(branch, _capability(x.device.index), dtype, layer.r[adapter_name],
                      x.numel() // max(x.shape[-1], 1), quantized)


def _auto_takes_triton(layer, adapter_name: str, branch: str, x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether "auto" runs the branch kernels: never while torch.compile traces the model (PyTorch's ops, which it
    compiles itself, as `rows_for`; the device query `kernel_case` makes would cost a graph break per layer)."""
    if adapter_name in layer.triton_failures or torch.compiler.is_compiling() or torch.version.hip is not None:
        return False  # (ROCm: the measurements are NVIDIA's)
    case = kernel_case(layer, adapter_name, branch, x, dtype)
    return case is not None and triton_wins(case)


def run_branch(layer, adapter_name: str, branch: str, x: torch.Tensor, run_torch: Callable[[], torch.Tensor],
               run_triton: Callable[[Callable[[BaseException], bool]], torch.Tensor]) -> torch.Tensor:
    """Run `branch` for `layer`'s adapter on input x (..., d_in) by the layer's `kernel` setting: `run_torch()` (the
    PyTorch path) or `run_triton(on_failure)` (the kernels; `on_failure(error)`, called on an error in forward or
    backward, falls back under "auto" and returns True, raises a clear error under "triton", and returns False for
    errors that are not Triton's, which then propagate unchanged)."""
    choice = layer.options[adapter_name].kernel
    if choice == "torch":
        return run_torch()
    dtype = compute_dtype(x)
    if choice == "triton":
        _check_triton(branch, x.device, dtype)

        def on_failure(error: BaseException) -> bool:
            return _raise_clearly(branch, error)
    elif _auto_takes_triton(layer, adapter_name, branch, x, dtype):

        def on_failure(error: BaseException) -> bool:
            return _fall_back(layer, adapter_name, branch, error)
    else:
        return run_torch()
    try:
        return run_triton(on_failure)
    except Exception as error:  # noqa: BLE001  (on_failure decides: Triton's own failures only)
        if not on_failure(error):
            raise
    return run_torch()
