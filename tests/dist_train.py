"""Entry point of the distributed tests: examples/train_sft.py plus probes (run by torchrun / accelerate / deepspeed).

Environment knobs (tests only): GATERA_TEST_KILL_AT_STEP and GATERA_TEST_KILL_RANK kill that rank with SIGKILL when
that optimisation step begins; GATERA_TEST_FP32_ADAPTER=1 trains fp32 adapters on a 4-bit base (TRL casts them to bf16,
FSDP2 runs keep them fp32); every rank writes probe_rank<R>.json into the output folder: whether the base weights
were partitioned outside forward (ZeRO-3) and registered as external parameters of the GateRA layers.

With `--fsdp N --cpu` (or an FSDP accelerate config and `--cpu`), accelerate is let to run FSDP on CPU processes
(`tests.distributed.allow_fsdp_on_cpu`).
"""

import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples"), str(ROOT)]

import torch  # noqa: E402
import train_sft  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from tests.distributed import (  # noqa: E402
    RING_ATTENTION_FORWARDS,
    allow_context_parallel_on_cpu,
    allow_fsdp_on_cpu,
)


class Probe(TrainerCallback):
    def __init__(self, output_dir):
        self.output_dir = Path(output_dir)
        self.rank = int(os.environ.get("RANK", "0"))
        self.kill_step = int(os.environ.get("GATERA_TEST_KILL_AT_STEP", "-1"))
        self.kill_rank = int(os.environ.get("GATERA_TEST_KILL_RANK", "-1"))
        self.fsdp = FsdpProbe() if fsdp_requested() else None
        self.folded = _count_folded_forwards()

    def on_init_end(self, args, state, control, model=None, **kwargs):
        """Where each rank's adapted base weights are once the adapter is built, before FSDP or DeepSpeed wrap the
        model (the meta device on the other ranks under FSDP's cpu_ram_efficient_loading), and how many GateRA
        branch scales wait for W0."""
        from gatera_plugin import GateRALayer

        layers = [m for m in model.modules() if isinstance(m, GateRALayer)]
        self.at_init = {"meta_base_weights_at_init": sum(m.get_base_layer().weight.is_meta for m in layers),
                        "pending_scales_at_init": sum(s is None for m in layers for s in m.scaling.values())}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if os.environ.get("GATERA_TEST_FP32_ADAPTER") == "1":  # fp32 adapters on a 4-bit base, as under FSDP2
            from gatera_plugin.fsdp import upcast_trainable_to_fp32

            upcast_trainable_to_fp32(model)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == 0:
            from gatera_plugin import GateRALayer
            from gatera_plugin.optim import gate_parameter_ratios

            layers = [m for m in model.modules() if isinstance(m, GateRALayer)]
            weights = [m.get_base_layer().weight for m in layers]
            gates = gate_parameter_ratios(model)
            probe = {
                "layers": len(layers),
                "partitioned": all(w.numel() == 0 and str(getattr(w, "ds_status", "")).endswith("NOT_AVAILABLE")
                                   for w in weights),
                "registered": all(id(w) in getattr(m, "_external_params", {}) for m, w in zip(layers, weights)),
                "optimizer_groups": [{"lr": g["lr"], "gates": sum(id(p) in gates for p in params),
                                      "params": len(params)}
                                     for g, params in zip(optimizer.param_groups, _model_params_by_group(optimizer))],
                **getattr(self, "at_init", {}),
            }
            if self.fsdp is not None:
                probe.update(self.fsdp.begin(model, layers))
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / f"probe_rank{self.rank}.json").write_text(json.dumps(probe))
        if state.global_step == self.kill_step and self.rank == self.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if "--context-parallel" in sys.argv:  # the attention calls that ran split across the context-parallel group
            (self.output_dir / f"ring_attention_rank{self.rank}.json").write_text(json.dumps(RING_ATTENTION_FORWARDS))
        if self.fsdp is not None:  # PEFT's save_pretrained on the sharded model, outside the Trainer, on every rank
            model.save_pretrained(self.output_dir / "direct_save", is_main_process=self.rank == 0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:  # the layers whose forward folded an ungated adapter into the base product
            path = self.output_dir / f"probe_rank{self.rank}.json"
            probe = {**json.loads(path.read_text()), **self.folded}
            if self.fsdp is not None and self.fsdp.reads["forward"]:
                probe.update(self.fsdp.end())
            path.write_text(json.dumps(probe))


def _count_folded_forwards() -> dict:
    """Count the calls of `folded_hira` by GateRA's layers: "folded_forwards" all of them, "backward_only_folds"
    those that fold backward only (`fold_forward=False`: the products run in bf16 / fp16)."""
    import dataclasses

    from gatera_plugin.branches import BRANCH_KINDS

    counts, original = {"folded_forwards": 0, "backward_only_folds": 0}, BRANCH_KINDS["hira"].folded

    def folded_hira(*args, **kwargs):
        counts["folded_forwards"] += 1
        counts["backward_only_folds"] += not kwargs.get("fold_forward", True)
        return original(*args, **kwargs)

    BRANCH_KINDS["hira"] = dataclasses.replace(BRANCH_KINDS["hira"], folded=folded_hira)
    return counts


def _model_params_by_group(optimizer) -> list[list]:
    """The model's parameters in each param group of `optimizer`. DeepSpeed's ZeRO optimizers (inside accelerate's
    wrapper) hold flat fp32 copies in their param groups, and the model's parameters of each group in `bit16_groups`
    (ZeRO-1/2) or `fp16_groups` (ZeRO-3)."""
    inner = optimizer
    while inner is not None:
        for name in ("bit16_groups", "fp16_groups"):
            groups = getattr(inner, name, None)
            if groups:
                assert len(groups) == len(optimizer.param_groups)
                return [list(group) for group in groups]
        inner = getattr(inner, "optimizer", None)
    return [group["params"] for group in optimizer.param_groups]


class FsdpProbe:
    """What GateRA's branch sees of W0 under FSDP2 during the first optimisation step.

    `sharded`: before the step every GateRA base weight is a DTensor holding a part of W0 on this rank. `reads`: every
    read of W0 by the branch (forward, and backward: the memory-lean HiRA backward) returns the whole, unsharded W0
    as a plain tensor. `resharded_after_forward`: after the model's forward, the base weights are shards again,
    every tensor autograd saved during forward that equals some W0 is FSDP's own gathered buffer (freed at the
    reshard), and no node of the autograd graph holds a live tensor equal to some W0: GateRA kept no copy.
    """

    def __init__(self):
        self.reads = {"forward": [], "backward": []}
        self.saved, self.saved_checked, self.layers = [], 0, []

    def record_reads(self, cls):
        """Wrap `cls.base_weight` (GateRA's layer class, or its 4-bit subclass) to record each read of W0."""
        original = cls.base_weight
        if getattr(original, "_probe", False):
            return

        def base_weight(layer):
            weight = original(layer)
            if layer in self.layers and type(layer) is cls:  # the first step of a fresh run only
                phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
                whole = type(weight) is not DTensor and tuple(weight.shape) == (layer.out_features, layer.in_features)
                self.reads[phase].append(whole)
            return weight

        base_weight._probe = True
        cls.base_weight = base_weight

    def begin(self, model, layers):
        weights = [m.get_base_layer().weight for m in layers]
        sharded = all(isinstance(w, DTensor) and w.to_local().numel() < w.numel() for w in weights)
        self.full = [w.full_tensor() for w in weights]  # as stored, for recognising W0 among saved tensors
        for cls in {type(m) for m in layers}:
            self.record_reads(cls)
        self.layers = layers
        self.after_forward = []
        self.handle = model.register_forward_hook(
            lambda module, args, output: self.after_forward.append(self.check_after_forward(layers, output)))
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return {"sharded": sharded}

    def is_weight(self, tensor):
        return isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and any(
            tensor.shape == v.shape and torch.equal(tensor, v) for w in self.full for v in (w, w.t()))

    def pack(self, tensor):
        if self.is_weight(tensor):
            self.saved.append(tensor)
        return tensor

    def kept_by_graph_nodes(self, output):
        """Tensors equal to some W0, with live storage, held as attributes of the autograd graph's nodes (e.g. the
        `ctx` of a custom Function) after the forward."""
        values = output.values() if isinstance(output, dict) else [output]  # TRL may return hidden states, no logits
        stack = [v.grad_fn for v in values if isinstance(v, torch.Tensor) and v.grad_fn is not None]
        seen, kept, self.graph_nodes = set(), 0, 0
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            self.graph_nodes += 1
            stack.extend(child for child, _ in node.next_functions)
            for value in getattr(node, "__dict__", {}).values():
                kept += bool(self.is_weight(value) and value.untyped_storage().size() > 0)
        return kept

    def check_after_forward(self, layers, output):
        resharded = all(isinstance(m.get_base_layer().weight, DTensor) for m in layers)
        freed = all(t.untyped_storage().size() == 0 for t in self.saved)
        self.saved_checked += len(self.saved)
        self.saved.clear()
        return resharded and freed and self.kept_by_graph_nodes(output) == 0

    def end(self):
        self.hooks.__exit__(None, None, None)
        self.handle.remove()
        self.layers = []
        return {"reads_forward": len(self.reads["forward"]), "reads_backward": len(self.reads["backward"]),
                "reads_whole": all(self.reads["forward"] + self.reads["backward"]),
                "resharded_after_forward": len(self.after_forward) > 0 and all(self.after_forward),
                "saved_weights_checked": self.saved_checked, "graph_nodes_checked": self.graph_nodes}


def fsdp_requested() -> bool:
    """`--fsdp N`, or an FSDP accelerate config (`accelerate launch` exports ACCELERATE_USE_FSDP)."""
    return "--fsdp" in sys.argv or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if fsdp_requested() and "--cpu" in arguments:
        allow_fsdp_on_cpu()
        if "--context-parallel" in arguments:
            allow_context_parallel_on_cpu()
    output_dir = arguments[arguments.index("--output-dir") + 1]
    train_sft.main(arguments, callbacks=[Probe(output_dir)])
