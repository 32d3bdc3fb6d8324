"""Make GateRA a PEFT method: add `GATERA` to PEFT's closed `PeftType` enum and register config, tuner and prefix.

PEFT's `register_peft_method` only accepts names already present in `PeftType`, so an outside package has to add its
member first. Both steps are idempotent: importing this package twice (or reloading it) registers once.
"""

from __future__ import annotations

from peft.utils import PeftType

NAME = "gatera"
PREFIX = "gatera_"
# `peft_type` spellings read as GateRA in adapter_config.json (PEFT writes the enum value, "GATERA").
SPELLINGS = ("GATERA", NAME, "GateRA")


def _add_peft_type_member(name: str) -> PeftType:
    """Return `PeftType[name]`, adding it to the enum if needed (works on Python 3.11-3.13)."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    # `type.__setattr__` skips EnumType's guard against assigning members.
    type.__setattr__(PeftType, name, member)
    return member


PEFT_TYPE = _add_peft_type_member(NAME.upper())


def register(config_cls, model_cls) -> None:
    """Register GateRA with PEFT's mappings once; a second call with the same classes does nothing."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    if PEFT_TYPE in PEFT_TYPE_TO_TUNER_MAPPING:
        registered = PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE]
        if registered.__qualname__ != model_cls.__qualname__:
            raise RuntimeError(f"PEFT type {PEFT_TYPE.value} is already registered to {registered!r}.")
        # Re-import of this package (e.g. importlib.reload): point PEFT at the current classes.
        PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = PREFIX
        for spelling in SPELLINGS[1:]:
            PEFT_TYPE_TO_CONFIG_MAPPING[spelling] = config_cls
        return
    register_peft_method(name=NAME, config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)
    for spelling in SPELLINGS[1:]:  # PEFT looks the config class up by the file's raw string
        PEFT_TYPE_TO_CONFIG_MAPPING[spelling] = config_cls
