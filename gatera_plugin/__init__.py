"""GateRA (token-gated parameter-efficient fine-tuning) as a PEFT method.

`import gatera_plugin` registers the method with PEFT (`PeftType.GATERA`, prefix `gatera_`), so `get_peft_model`,
`PeftModel.from_pretrained`, `AutoPeftModelForCausalLM` and TRL's `SFTTrainer(peft_config=GateRAConfig(...))` work
with it, installs the small Trainer integration that applies and logs the penalties, and makes GateRA adapter
saves atomic and loads checked (`serialization.py`).

The method (formulas of every gate and branch kind, the penalties and their normalisation, gradients, merging,
inference, and our choices where the papers are silent) is described in docs/method.md of the source repository and
the sdist.
"""

from ._registration import PEFT_TYPE, register as _register
from .config import GateRAConfig
from .fsdp import install as _install_fsdp
from .layer import GateRALayer
from .model import FrozenHeadWarning, GateRAModel, UnreachedExpertsWarning
from .optim import split_gate_groups
from .penalty import binary_entropy
from .serialization import allow_pickle, install as _install_serialization
from .trainer_integration import find_gatera_model, install as _install_trainer_integration

__version__ = "0.1.0"

_register(GateRAConfig, GateRAModel)
_install_trainer_integration()
_install_serialization()
_install_fsdp()

__all__ = [
    "PEFT_TYPE", "FrozenHeadWarning", "GateRAConfig", "GateRALayer", "GateRAModel", "UnreachedExpertsWarning",
    "allow_pickle", "binary_entropy", "find_gatera_model", "split_gate_groups",
]
