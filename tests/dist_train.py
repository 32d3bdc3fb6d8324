"""Entry point of the distributed tests: examples/train_sft.py plus probes (run by torchrun / accelerate / deepspeed).

Environment knobs (tests only): GATERA_TEST_KILL_AT_STEP and GATERA_TEST_KILL_RANK kill that rank with SIGKILL when
that optimisation step begins; every rank writes probe_rank<R>.json into the output folder: whether the base weights
were partitioned outside forward (ZeRO-3) and registered as external parameters of the GateRA layers.
"""

import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples"), str(ROOT)]

import train_sft  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


class Probe(TrainerCallback):
    def __init__(self, output_dir):
        self.output_dir = Path(output_dir)
        self.rank = int(os.environ.get("RANK", "0"))
        self.kill_step = int(os.environ.get("GATERA_TEST_KILL_AT_STEP", "-1"))
        self.kill_rank = int(os.environ.get("GATERA_TEST_KILL_RANK", "-1"))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            from gatera_plugin import GateRALayer

            layers = [m for m in model.modules() if isinstance(m, GateRALayer)]
            weights = [m.get_base_layer().weight for m in layers]
            probe = {
                "layers": len(layers),
                "partitioned": all(w.numel() == 0 and str(getattr(w, "ds_status", "")).endswith("NOT_AVAILABLE")
                                   for w in weights),
                "registered": all(id(w) in getattr(m, "_external_params", {}) for m, w in zip(layers, weights)),
            }
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / f"probe_rank{self.rank}.json").write_text(json.dumps(probe))
        if state.global_step == self.kill_step and self.rank == self.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    arguments = sys.argv[1:]
    output_dir = arguments[arguments.index("--output-dir") + 1]
    train_sft.main(arguments, callbacks=[Probe(output_dir)])
