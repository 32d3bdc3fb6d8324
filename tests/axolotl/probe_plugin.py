"""A test-only Axolotl plugin: records the trained model's outputs on fixed inputs, and lets DeepSpeed run on CPU.

Listed under `plugins:` in the tests' YAMLs (which also shows that listing GateRA's own plugin there is harmless).
"""

import json
import os
from pathlib import Path

import torch
from axolotl.integrations.base import BasePlugin

PROBE_INPUT = torch.tensor([[5, 9, 13, 17, 21, 25, 29, 33], [40, 41, 42, 43, 44, 45, 46, 47]])


def _zero_stage(deepspeed) -> int:
    if isinstance(deepspeed, str):
        deepspeed = json.loads(Path(deepspeed).read_text())
    return int(((deepspeed or {}).get("zero_optimization") or {}).get("stage", 0))


class ProbePlugin(BasePlugin):
    def register(self, cfg):
        # Multi-process Axolotl assumes GPUs: it initialises DeepSpeed with NCCL and maps the model to device
        # LOCAL_RANK. On CPU (the tests), start the process group over gloo first, so that DeepSpeed finds it
        # initialised, or let accelerate run FSDP (or plain DDP) on CPU processes (it would fall back to DDP, or
        # see no distributed run), and load the model on the CPU.
        if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return
        from axolotl.loaders.model import ModelLoader

        if not (cfg.get("deepspeed") or cfg.get("fsdp_config")):  # DDP
            os.environ["ACCELERATE_USE_CPU"] = "true"
        elif cfg.get("deepspeed"):
            import deepspeed

            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            deepspeed.init_distributed(dist_backend="gloo")
        else:
            from accelerate.parallelism_config import ParallelismConfig

            from tests.distributed import allow_fsdp_on_cpu

            allow_fsdp_on_cpu()
            os.environ["ACCELERATE_USE_CPU"] = "true"  # else the Trainer sees no distributed run and refuses FSDP
            build_device_mesh = ParallelismConfig.build_device_mesh  # Axolotl asks for a "cuda" mesh

            def build_cpu_mesh(config, device_type):
                return build_device_mesh(config, "cpu")

            ParallelismConfig.build_device_mesh = build_cpu_mesh
        original = ModelLoader._set_device_map_config

        def _set_device_map_config(loader):
            original(loader)
            if isinstance(loader.model_kwargs.get("device_map"), dict):
                loader.model_kwargs["device_map"] = {"": "cpu"}

        ModelLoader._set_device_map_config = _set_device_map_config

    def get_training_args(self, cfg):
        # `bf16: true` on CPU: transformers refuses bf16 without a GPU unless the run says `use_cpu`, which Axolotl
        # has no key for (autocast on CPU then runs in bf16, as on a GPU)
        if cfg.get("bf16") is True and not torch.cuda.is_available():
            return {"use_cpu": True}
        return None

    def post_lora_load(self, cfg, model):
        # each rank: where its adapted base weights are when the adapter has been built (the meta device on the other
        # ranks under FSDP's `cpu_ram_efficient_loading`), and how many GateRA branch scales wait for W0
        from gatera_plugin import GateRALayer

        layers = [m for m in model.modules() if isinstance(m, GateRALayer)]
        if not layers or not cfg.get("fsdp_config"):
            return
        rank = int(os.environ.get("RANK", "0"))
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"load_probe_rank{rank}.json").write_text(json.dumps({
            "meta_base_weights": sum(m.get_base_layer().weight.is_meta for m in layers), "layers": len(layers),
            "pending_scales": sum(s is None for m in layers for s in m.scaling.values())}))

    def post_trainer_create(self, cfg, trainer):
        # what the model's training forwards receive: the collator, and the largest attention-mask value (packed
        # rows number their sequences 1, 2, ... in some of Axolotl's collators)
        self.collator, self.mask_max = type(trainer.data_collator).__name__, 0
        self.trainer = trainer  # its optimizer, at the end of training

        def record(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            if module.training and isinstance(mask, torch.Tensor) and mask.dim() == 2:
                self.mask_max = max(self.mask_max, int(mask.max()))

        def record_logits(module, args, output):  # None where the loss came without logits (Liger's fused loss)
            if module.training:
                self.training_logits = getattr(output, "logits", None) is not None

        trainer.model.register_forward_pre_hook(record, with_kwargs=True)
        trainer.model.register_forward_hook(record_logits)

    def post_train(self, cfg, model):
        # (Axolotl's `fsdp_version` defaults to 2 in every config: `fsdp_config` is what marks an FSDP run)
        if cfg.get("fsdp_config") and int(os.environ.get("RANK", "0")) == 0:  # did FSDP2 really shard the model?
            from torch.distributed.tensor import DTensor

            sharded = [isinstance(p, DTensor) for n, p in model.named_parameters() if "base_layer" in n]
            wrapped = [n for n, _ in model.named_modules() if n.endswith("_checkpoint_wrapped_module")]
            (Path(cfg.output_dir) / "fsdp_probe.json").write_text(
                json.dumps({"sharded_base_weights": sum(sharded), "checkpoint_wrapped_modules": len(wrapped)}))
        if int(os.environ.get("RANK", "0")) != 0 or _zero_stage(cfg.get("deepspeed")) == 3 or cfg.get("fsdp_config"):
            return  # under ZeRO-3 and FSDP a forward needs every rank
        layers = sorted({type(m).__module__ + "." + type(m).__name__ for m in model.modules()
                         if "gatera" in type(m).__module__ or "lora" in type(m).__module__})
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=PROBE_INPUT.to(next(model.parameters()).device)).logits.float().cpu()
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        dtypes = {name: str(param.dtype) for name, param in model.named_parameters()}
        torch.save({"logits": logits, "layer_types": layers, "dtypes": dtypes, "collator": getattr(self, "collator", None),
                    "mask_max": getattr(self, "mask_max", None), "optimizer_groups": self._optimizer_groups(),
                    "training_logits": getattr(self, "training_logits", None), "optimizer": self._optimizer_class(),
                    "wrapped_model": self._wrapped_model_class(),
                    "causal_lm_forward": type(getattr(model, "get_base_model", lambda: model)()).forward.__module__},
                   out / "probe.pt")

    def _wrapped_model_class(self) -> str | None:
        """Name of the class that the trainer wrapped the model in for training (DDP's, or the model itself)."""
        trainer = getattr(self, "trainer", None)
        return None if trainer is None else type(trainer.model_wrapped).__name__

    def _optimizer_class(self) -> str | None:
        """Module and name of the class of the optimizer that trained the model (inside accelerate's wrapper)."""
        optimizer = getattr(getattr(self, "trainer", None), "optimizer", None)
        optimizer = getattr(optimizer, "optimizer", optimizer)
        return None if optimizer is None else f"{type(optimizer).__module__}.{type(optimizer).__name__}"

    def _optimizer_groups(self) -> list[dict]:
        """Each param group of the optimizer that trained the model: its starting rate, and how many of its
        parameters are GateRA gate parameters and how many are not."""
        from gatera_plugin.optim import gate_parameter_ratios

        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.optimizer is None:
            return []
        gates = gate_parameter_ratios(trainer.model)
        return [{"lr": group.get("initial_lr", group["lr"]), "gates": sum(id(p) in gates for p in group["params"]),
                 "others": sum(id(p) not in gates for p in group["params"])}
                for group in trainer.optimizer.param_groups]


def constant_reward(prompts, completions, **kwargs) -> list[float]:
    """A reward function for the GRPO test (`trl.reward_funcs: [tests.axolotl.probe_plugin.constant_reward]`): the same
    for every completion, so that GRPO's own loss and gradient are 0."""
    return [1.0 for _ in completions]
