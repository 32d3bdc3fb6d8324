"""GateRA on bitsandbytes' quantised linears (QLoRA-style training on 4-bit or 8-bit bases).

The base layer keeps its own quantised forward; the HiRA branch needs `W0` itself, which `base_weight` dequantises
through PEFT's helper on demand (in forward, and again in backward, where the memory-lean HiRA function rebuilds it
rather than keeping a dequantised copy alive between the two).
"""

from __future__ import annotations

import warnings

import torch
from peft.import_utils import is_bnb_4bit_available, is_bnb_available
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.integrations import dequantize_bnb_weight

from ._stack import user_stacklevel
from .fsdp import unsharded_weight
from .kernels import compute_dtype
from .layer import Linear

_WARNED: set[str] = set()  # warnings given once per process


class _KeptPacked:
    """A quantised weight kept while merged (`_keep_for_unmerge` of the 4-bit and 8-bit wrappers), out of sight of
    `nn.Module`; `scales`: an 8-bit weight's row scales (bitsandbytes moves them from the weight to the layer's state
    at its first forward, and the merge resets that state)."""

    def __init__(self, weight, scales=None) -> None:
        self.weight, self.scales = weight, scales


def _refuse_zero3_4bit() -> None:
    """4-bit bases under DeepSpeed ZeRO-3 are refused rather than half-supported.

    ZeRO-3 would partition the packed 4-bit bytes (with bitsandbytes' `quant_storage` trick) while their quantisation
    state stays whole, and GateRA's HiRA branch needs the dequantised W0 in forward and backward; gathering and
    dequantising a partitioned packed weight per layer and per pass is not implemented or tested here.
    """
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return
    if is_deepspeed_zero3_enabled():
        raise ValueError(
            "GateRA does not support 4-bit (bitsandbytes) bases under DeepSpeed ZeRO-3: ZeRO-3 would partition the "
            "packed 4-bit weights that GateRA's HiRA branch dequantises in every forward and backward. Use ZeRO-2 "
            "(integrations/deepspeed/zero2.json), which keeps the frozen 4-bit base whole on each rank and shards "
            "the adapter's optimizer state, or load the base in bf16 for ZeRO-3."
        )


class _QuantizedLinear(Linear):
    """Shared part of the 4-bit and 8-bit wrappers: dequantised `W0`; merging re-quantises (`_store_weight`).

    Reading the quantised weight runs eagerly under `torch.compile`: dynamo recursed without end in bitsandbytes'
    `Params4bit.__torch_function__` when it traced the dequantisation (RecursionError with any backend)."""

    @torch.compiler.disable
    def base_weight(self) -> torch.Tensor:
        base = self.get_base_layer()
        return dequantize_bnb_weight(base.weight, state=getattr(base, "state", None))  # (d_out, d_in)

    def _check_base_frozen(self) -> None:  # quantised weights are never trainable
        return None

    def _base_folds(self, x: torch.Tensor) -> bool:  # (8-bit: LLM.int8's forward is not a product with W0)
        return False

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        warnings.warn(
            "Merging a GateRA adapter into a quantised (bitsandbytes) base re-quantises the merged weight: the merged "
            "model's outputs differ from the unmerged one's by quantisation rounding (as for PEFT's LoRA).",
            UserWarning, stacklevel=2,
        )
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def _stored_weight(self) -> torch.Tensor:
        return self.base_weight()


if is_bnb_available():
    import bitsandbytes as bnb

    class Linear8bitLt(_QuantizedLinear):
        """GateRA on `bitsandbytes.nn.Linear8bitLt`."""

        @torch.compiler.disable
        def base_weight(self) -> torch.Tensor:
            """W0: dequantised, or as it is where `llm_int8_has_fp16_weight=True` keeps it dense (quantised in each
            forward; PEFT's helper failed on its missing scales)."""
            weight = self.get_base_layer().weight
            return weight if weight.dtype != torch.int8 else super().base_weight()

        def _keep_for_unmerge(self):
            """The `Int8Params` itself and its row scales (merging puts a new one in its place): no dense fp32 copy
            of W0, 4x the int8 weight, while merged (a dense weight, `llm_int8_has_fp16_weight`: its copy)."""
            base = self.get_base_layer()
            if base.weight.dtype != torch.int8:
                return super()._keep_for_unmerge()
            scales = base.weight.SCB if base.weight.SCB is not None else base.state.SCB
            return _KeptPacked(base.weight, scales)

        def _read_kept(self, kept) -> torch.Tensor:
            if not isinstance(kept, _KeptPacked):
                return super()._read_kept(kept)
            return bnb.functional.int8_vectorwise_dequant(kept.weight.data, kept.scales.to(kept.weight.device))

        def _restore_kept(self, kept) -> None:
            if not isinstance(kept, _KeptPacked):
                return super()._restore_kept(kept)
            base, weight, scales = self.get_base_layer(), kept.weight, kept.scales
            if weight.device != base.weight.device:  # (the model moved while merged)
                weight, scales = weight.to(base.weight.device), scales.to(base.weight.device)
            weight.CB, weight.SCB = weight.data, scales  # (as quantising left them: the layer's first forward takes them)
            base.weight = weight
            base.state.reset_grads()

        def _store_weight(self, weight: torch.Tensor) -> None:
            base = self.get_base_layer()
            old = base.weight
            base.weight = bnb.nn.Int8Params(
                weight.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights
            ).to(old.device)
            base.state.reset_grads()

    def dispatch_bnb_8bit(target, adapter_name, config, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, bnb.nn.Linear8bitLt):
            return Linear8bitLt(target, adapter_name, config=config, **kwargs)
        return None


if is_bnb_4bit_available():
    import bitsandbytes as bnb

    def _keep_standard_4bit_layout(base) -> None:
        """Stop bitsandbytes' CPU inference repacking, and undo it if it already happened.

        On CPUs with AVX512-BF16, `Linear4bit` repacks its weight on the first eval forward into a layout that
        `dequantize_4bit` (and so PEFT's `dequantize_bnb_weight`) reads as garbage. GateRA dequantises `W0` on every
        forward, so the repacked fast path would only make its branch wrong.
        """
        if hasattr(base, "support_avx512bf16_for_cpu"):
            base.support_avx512bf16_for_cpu = False
        state = getattr(base.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(base.weight.data, state)
            if not state.nested and state.absmax.dim() == 2:
                # bitsandbytes 0.50's inverse re-nests a double-quantised absmax but leaves a plain one as the repacking
                # stored it, (d_in / blocksize, d_out) in bf16: back to one scale per block, in row-major block order
                state.absmax = state.absmax.t().reshape(-1).float().contiguous()
            storage = getattr(state, "original_storage_type", None)  # (bnb_4bit_quant_storage, e.g. bf16 for FSDP)
            base.weight.data = data.view(storage) if storage is not None else data
            base.weight.quant_state = state
            if "repacked" in _WARNED:
                return
            _WARNED.add("repacked")
            warnings.warn(
                "A 4-bit (bitsandbytes) layer ran an eval forward on this CPU before GateRA wrapped it, and bitsandbytes "
                "repacked its weight for CPU inference, rounding its quantisation scales (absmax) to bf16 (and under "
                "double quant quantising them again on the way back). GateRA restored the standard layout, but W0 now "
                "differs from the loaded one by that rounding (up to 2^-8, 0.4%, per scale; more under double quant). "
                "For the exact base, load the model again and apply or load the adapter before any eval forward. "
                "(Said once; other layers may be affected too.)",
                UserWarning, stacklevel=user_stacklevel(),
            )

    def _gathered_4bit_weight(base) -> None:
        """Make `base.weight` readable as 4-bit W0 under FSDP2, then keep its standard layout.

        FSDP2 shards the packed bytes (stored as bf16 with `bnb_4bit_quant_storage`) and, inside the unit's
        forward and backward, puts a plain gathered parameter in their place, without the `quant_state` that
        bitsandbytes keeps on the module as well: reattach it as bitsandbytes' own forward does.
        """
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        unsharded_weight(base.weight)
        if getattr(base.weight, "quant_state", None) is None and getattr(base, "quant_state", None) is not None:
            fix_4bit_weight_quant_state_from_module(base)
        _keep_standard_4bit_layout(base)

    class Linear4bit(_QuantizedLinear):
        """GateRA on `bitsandbytes.nn.Linear4bit` (NF4 / FP4)."""

        def __init__(self, *args, **kwargs) -> None:
            _refuse_zero3_4bit()
            super().__init__(*args, **kwargs)
            _keep_standard_4bit_layout(self.get_base_layer())

        @torch.compiler.disable
        def base_weight(self) -> torch.Tensor:
            _gathered_4bit_weight(self.get_base_layer())
            return super().base_weight()

        def _base_folds(self, x: torch.Tensor) -> bool:
            """bitsandbytes' 4-bit forward is `x W0ᵀ + b` with W0 dequantised, in `compute_dtype`, returned in x's
            dtype: the same as the folded product (`GateRALayer._base_folds`) where x has that dtype and autocast is
            off or in that dtype too. (An fp32 compute dtype under bf16 autocast stays apart: on CPU bitsandbytes
            0.50 computes it in bf16, as the folded product would, but its CUDA kernels are not checked for that.)"""
            base = self.get_base_layer()
            return (type(base).forward is bnb.nn.Linear4bit.forward and x.dtype == base.compute_dtype
                    and compute_dtype(x) == x.dtype)

        @torch.compiler.disable
        def kernel_weight(self):
            """W0 for the Triton kernels: the packed 4-bit bytes, dequantised inside the kernel."""
            from .kernels.hira_triton import Packed4bit

            _gathered_4bit_weight(self.get_base_layer())
            return Packed4bit.from_params(self.get_base_layer().weight)

        def _keep_for_unmerge(self):
            """The packed `Params4bit` itself (merging puts a new one in its place, never writes into it), for unmerge
            to put back as it was. Quantising a dequantised copy again would not restore it under double quant (the
            nested absmax re-quantises to other values, so each merge / unmerge cycle moved W0), and the copy was a
            dense fp32 d_out × d_in tensor per layer. Held in a `_KeptPacked`, not as a module attribute of its own:
            a parameter would join the layer's parameters and state_dict."""
            return _KeptPacked(self.get_base_layer().weight)

        def _read_kept(self, kept) -> torch.Tensor:
            return dequantize_bnb_weight(kept.weight)

        def _restore_kept(self, kept) -> None:
            base, weight = self.get_base_layer(), kept.weight
            if weight.device != base.weight.device:  # (the model moved while merged)
                weight = weight.to(base.weight.device)
            base.weight = weight
            base.quant_state = weight.quant_state  # (bitsandbytes keeps it on the module too; the merge replaced it)

        def _store_weight(self, weight: torch.Tensor) -> None:
            base = self.get_base_layer()
            old = base.weight
            kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
            kwargs["requires_grad"] = False
            if "bnb_quantized" in kwargs:
                kwargs["bnb_quantized"] = False
            base.weight = bnb.nn.Params4bit(weight.to("cpu"), **kwargs).to(old.device)

    def dispatch_bnb_4bit(target, adapter_name, config, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, bnb.nn.Linear4bit):
            return Linear4bit(target, adapter_name, config=config, **kwargs)
        return None


def refuse_4bit_under_zero3(model: torch.nn.Module) -> None:
    """`_refuse_zero3_4bit` for a model whose 4-bit layers were wrapped before the ZeRO-3 config existed
    (`get_peft_model` before `TrainingArguments(deepspeed=...)`): the Trainer integration calls it on its model."""
    if is_bnb_4bit_available() and any(isinstance(module, Linear4bit) for module in model.modules()):
        _refuse_zero3_4bit()
