"""A test-only Axolotl plugin: records the trained model's outputs on fixed inputs, and lets DeepSpeed run on CPU.

Listed under `plugins:` in the tests' YAMLs (which also shows that listing GateRA's own plugin there is harmless).
"""

import os
from pathlib import Path

import torch
from axolotl.integrations.base import BasePlugin

PROBE_INPUT = torch.tensor([[5, 9, 13, 17, 21, 25, 29, 33], [40, 41, 42, 43, 44, 45, 46, 47]])


def _zero_stage(deepspeed) -> int:
    if isinstance(deepspeed, str):
        import json

        deepspeed = json.loads(Path(deepspeed).read_text())
    return int(((deepspeed or {}).get("zero_optimization") or {}).get("stage", 0))


class ProbePlugin(BasePlugin):
    def register(self, cfg):
        # Multi-process Axolotl assumes GPUs: it initialises DeepSpeed with NCCL and maps the model to device
        # LOCAL_RANK. On CPU (the tests), start the process group over gloo first, so that DeepSpeed finds it
        # initialised, and load the model on the CPU.
        if cfg.get("deepspeed") and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import deepspeed
            from axolotl.loaders.model import ModelLoader

            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            deepspeed.init_distributed(dist_backend="gloo")
            original = ModelLoader._set_device_map_config

            def _set_device_map_config(loader):
                original(loader)
                if isinstance(loader.model_kwargs.get("device_map"), dict):
                    loader.model_kwargs["device_map"] = {"": "cpu"}

            ModelLoader._set_device_map_config = _set_device_map_config

    def post_train(self, cfg, model):
        if int(os.environ.get("RANK", "0")) != 0 or _zero_stage(cfg.get("deepspeed")) == 3:
            return  # under ZeRO-3 a forward needs every rank
        layers = sorted({type(m).__module__ + "." + type(m).__name__ for m in model.modules()
                         if "gatera" in type(m).__module__ or "lora" in type(m).__module__})
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=PROBE_INPUT.to(next(model.parameters()).device)).logits.float().cpu()
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"logits": logits, "layer_types": layers}, out / "probe.pt")
