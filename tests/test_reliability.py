"""Nothing saved is lost: atomic saves; an interrupted run resumes to the same result; no NaN from edge cases."""

import errno
import fcntl
import functools
import json
import os
import warnings

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from gatera_plugin import GateRAConfig
from tests.helpers import eval_logits, randomize_adapters, tiny_llama, toy_texts, word_tokenizer

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _trained(seed=0):
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS))
    torch.manual_seed(seed)
    return randomize_adapters(model)


# ------------------------------------------------------------------------------------------------ atomic saves
def test_a_failure_while_writing_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    import peft.peft_model

    ids = torch.randint(3, 128, (2, 7))
    first = _trained(0)
    first.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}

    real_save = peft.peft_model.safe_save_file

    def crash_half_way(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = open(filename, "rb").read()
        open(filename, "wb").write(data[: len(data) // 3])  # the process dies with a third of the file written
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        _trained(1).save_pretrained(tmp_path)
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # byte for byte, and no staging folder left behind
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []
    torch.testing.assert_close(eval_logits(PeftModel.from_pretrained(tiny_llama(), tmp_path), ids), eval_logits(first, ids))


@pytest.mark.parametrize("adapter", ["default", "other"])
def test_a_save_missing_tensors_is_refused_and_the_previous_adapter_kept(tmp_path, monkeypatch, adapter):
    """If the tensors PEFT selects for saving miss some of the adapter's (PEFT 0.21's own selection under torch's
    checkpoint wrappers saved none), the save raises, naming the counts, and writes nothing."""
    from peft.tuners.tuners_utils import BaseTuner

    from gatera_plugin.model import GateRAModel

    model = _trained(0)
    if adapter != "default":
        model.add_adapter(adapter, GateRAConfig(r=4, target_modules=TARGETS))
        model.set_adapter(adapter)  # the one being trained
    model.save_pretrained(tmp_path)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def selection_missing_one(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        selected = BaseTuner._get_adapter_state_dict.__func__(cls, model, config, adapter_name, state_dict,
                                                             unwanted_adapter_names)
        return dict(list(selected.items())[1:]) if f".{adapter}" in next(iter(selected)) else selected

    monkeypatch.setattr(GateRAModel, "_get_adapter_state_dict", classmethod(selection_missing_one))
    randomize_adapters(model)
    with pytest.raises(RuntimeError, match=rf"the adapter '{adapter}' .* holds 23 of its 24 tensors, so nothing was"):
        model.save_pretrained(tmp_path)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_an_adapter_named_like_a_module_is_refused():
    """PEFT saves an adapter without every key that holds another adapter's name: beside an adapter named "mlp",
    "default" would save 16 of its 24 tensors (the completeness check refuses that save). The name is refused when
    the adapter is added, and at `get_peft_model`."""
    model = _trained(0)
    with pytest.raises(ValueError, match=r"adapter_name 'mlp' is also the name of modules .* Choose another"):
        model.add_adapter("mlp", GateRAConfig(r=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match=r"adapter_name 'layers' is also the name of modules"):
        get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS), adapter_name="layers")


@pytest.mark.parametrize("name", ["gatera_gate", "gatera_A", "base_layer"])
def test_a_first_adapter_named_like_a_gatera_module_is_refused(name):
    """GateRA's own modules (`gatera_gate`, `base_layer`, ...) do not exist before the first adapter is injected, so
    the module walk let the first adapter take their name; the next adapter's save then lacked its tensors under
    '.gatera_gate.' and failed ("holds 6 of its 10 tensors"), after training."""
    with pytest.raises(ValueError, match=rf"adapter_name '{name}' is also the name of modules .*'<layer>\.{name}'"):
        get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS), adapter_name=name)


@pytest.mark.parametrize("name", ["weight", "bias", "threshold", "alpha"])
def test_an_adapter_named_like_a_tensor_is_refused_and_leaves_the_model_as_it_was(name, tmp_path):
    """Beside an adapter named like a tensor (`weight`, a gate's `threshold`, a structure gate's `alpha`), PEFT would
    save the others without those tensors (the completeness check then refused every save, naming wrapper
    modules). The name is refused when the adapter is added; nothing of it stays behind: the model's outputs, its
    adapters and its save are those of before."""
    model = _trained(0)
    x = torch.randint(0, 64, (2, 7))
    before = eval_logits(model, x)
    config = GateRAConfig(r=4, target_modules=TARGETS, structure_gate=True,
                          gate="threshold" if name == "threshold" else "sigmoid")
    model.add_adapter("other", config)  # (its tensors hold the names the refused one takes)
    with pytest.raises(ValueError, match=rf"adapter_name '{name}' is also the name of tensors of this model .* "
                                         "Choose another"):
        model.add_adapter(name, GateRAConfig(r=4, target_modules=TARGETS))
    assert list(model.peft_config) == ["default", "other"]
    assert not any(name in module.gatera_A for module in model.modules() if hasattr(module, "gatera_A"))
    torch.testing.assert_close(eval_logits(model, x), before, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["other"]


@pytest.mark.parametrize("gate", ["threshold", "structure"])
def test_gates_whose_tensors_are_named_like_another_adapter_are_refused(gate):
    """The other way round: beside an adapter named "threshold" (or "alpha"), an adapter with threshold gates (or
    structure gates) would be saved without those tensors (a warning blamed ZeRO-3). Refused before anything is
    injected."""
    name = "threshold" if gate == "threshold" else "alpha"
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS), adapter_name=name)
    config = (GateRAConfig(r=4, target_modules=TARGETS, gate="threshold") if gate == "threshold"
              else GateRAConfig(r=4, target_modules=TARGETS, structure_gate=True))
    with pytest.raises(ValueError, match=rf"Adapter 'second''s gates hold tensors named \['{name}'\], and so are "
                                         rf"adapter\(s\) \['{name}'\]"):
        model.add_adapter("second", config)
    assert list(model.peft_config) == [name]
    assert not any("second" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("trainable_tokens", [None, [3, 4]])
def test_an_adapter_refused_half_way_can_be_added_again(trainable_tokens):
    """An adapter whose targets include a layer GateRA cannot adapt is refused after it reached some layers: those
    layers' entries are removed with it, so the name can be added again with the right targets (its leftover
    modules made the name clash with the model's own), and it trains. The other adapters' parameters stay as
    trainable as they were (frozen here; each layer it reached re-activated them), trainable tokens included, and
    the refusal is the one the user sees. A module it wrapped for itself alone (k_proj) is its base layer again (it
    stayed a GateRA layer without adapters, its weight renamed `base_layer.weight` in the state dict)."""
    model = randomize_adapters(get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS,
                                                                         trainable_token_indices=trainable_tokens)))
    model.requires_grad_(False)
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="GateRA cannot adapt target module of type LlamaRMSNorm"):
        model.add_adapter("late", GateRAConfig(r=4, target_modules=["q_proj", "k_proj", "norm"]))
    assert not any("late" in module.gatera_A for module in model.modules() if hasattr(module, "gatera_A"))
    assert type(model.base_model.model.model.layers[0].self_attn.k_proj) is torch.nn.Linear
    assert list(model.state_dict()) == keys
    assert not [n for n, p in model.named_parameters() if p.requires_grad]
    model.add_adapter("late", GateRAConfig(r=4, target_modules=["q_proj"]))
    model.set_adapter("late")
    x = torch.randint(0, 64, (2, 7))
    model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".late" in n)


@pytest.mark.parametrize("existing", [dict(branch="hira"), dict(branch="lora", lora_alpha=4),
                                      dict(branch="lora", lora_alpha=16, gate="threshold")], ids=str)
def test_loading_into_an_existing_adapter_of_another_structure_is_refused(existing, tmp_path):
    """`load_adapter(folder, adapter_name)` into an adapter the model has keeps that adapter's config (PEFT's way, and
    the Trainer's resume): where the saved config builds another model (another branch, scale or gate) the load is
    refused, naming the fields (it took the weights silently: logits off by 2.6 to 3.6 here). Into an adapter of the
    saved structure it loads the saved model exactly."""
    saved = randomize_adapters(get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, branch="lora",
                                                                         lora_alpha=16)))
    x = torch.randint(0, 64, (2, 7))
    expected = eval_logits(saved, x)
    saved.save_pretrained(tmp_path)
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, **existing))
    field = next(name for name in ("branch", "lora_alpha", "gate") if existing.get(name) != saved.peft_config[
        "default"].to_dict()[name])
    with pytest.raises(ValueError, match=rf"into this model's adapter 'default', which exists already .*`{field}`"
                                         r".* call `delete_adapter\('default'\)` first"):
        model.load_adapter(tmp_path, adapter_name="default")
    same = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, branch="lora", lora_alpha=16))
    same.load_adapter(tmp_path, adapter_name="default")
    torch.testing.assert_close(eval_logits(same, x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("task_type", ["SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"])
def test_a_classifier_adapter_reloads_with_from_pretrained_and_resumes_with_its_config_reused(task_type, tmp_path):
    """PEFT extends a classifier's `modules_to_save` in place (`score`, `classifier`, `qa_outputs`), so a config that
    went through it twice holds duplicates, and `from_pretrained` loads into the adapter it built from the saved
    config: both compare as the same structure (the refusal above refused them), and the reload is exact."""
    from transformers import LlamaForQuestionAnswering, LlamaForTokenClassification

    from tests.helpers import tiny_llama_classifier, tiny_llama_config

    def base():
        if task_type == "SEQ_CLS":
            return tiny_llama_classifier(2)
        config = tiny_llama_config()
        config.num_labels = 2
        torch.manual_seed(0)
        return (LlamaForTokenClassification if task_type == "TOKEN_CLS" else LlamaForQuestionAnswering)(config)

    config = GateRAConfig(r=4, target_modules=TARGETS, task_type=task_type, init_weights=False)
    model = get_peft_model(base(), config).eval()
    model.save_pretrained(tmp_path)
    x = torch.randint(3, 64, (2, 6))
    output = "start_logits" if task_type == "QUESTION_ANS" else "logits"
    with torch.no_grad():
        expected = getattr(model(input_ids=x), output)
        loaded = PeftModel.from_pretrained(base(), tmp_path).eval()
        torch.testing.assert_close(getattr(loaded(input_ids=x), output), expected, rtol=0, atol=0)
        again = get_peft_model(base(), config)  # (the config reused, as a second Trainer would: duplicates)
        again.load_adapter(tmp_path, adapter_name="default", is_trainable=True)
        torch.testing.assert_close(getattr(again.eval()(input_ids=x), output), expected, rtol=0, atol=0)


def test_the_same_structure_spelled_otherwise_loads_into_an_existing_adapter(tmp_path):
    """A resumed run that spells a value otherwise (16 and 16.0, one layer index and a list of one, a list in
    another order or with a repeat) builds the same model: it is not refused."""
    saved = dict(r=4, target_modules=TARGETS, lora_alpha=16, layers_to_transform=[1, 0], layers_pattern="layers",
                 modules_to_save=["lm_head"], alpha_pattern={"q_proj": 3}, sparse_threshold=0)
    get_peft_model(tiny_llama(), GateRAConfig(**saved)).save_pretrained(tmp_path)
    spelled = dict(saved, lora_alpha=16.0, layers_to_transform=[0, 1], layers_pattern=["layers"],
                   modules_to_save=["lm_head", "lm_head"], alpha_pattern={"q_proj": 3.0}, sparse_threshold=0.0)
    get_peft_model(tiny_llama(), GateRAConfig(**spelled)).load_adapter(tmp_path, adapter_name="default")


def test_a_frozen_adapter_saved_incomplete_is_warned_about(tmp_path, monkeypatch):
    """DeepSpeed ZeRO-3's consolidated state dict, which the Trainer saves, leaves frozen parameters out: a frozen
    second adapter (e.g. a reference adapter) arrives without its tensors. That save goes on, with a warning naming
    the adapter, while the trained adapter is saved whole."""
    from peft.tuners.tuners_utils import BaseTuner

    from gatera_plugin.model import GateRAModel

    model = _trained(0)
    model.add_adapter("reference", GateRAConfig(r=4, target_modules=TARGETS))  # frozen: "default" stays active

    def without_frozen(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        selected = BaseTuner._get_adapter_state_dict.__func__(cls, model, config, adapter_name, state_dict,
                                                             unwanted_adapter_names)
        return {} if adapter_name == "reference" else selected

    monkeypatch.setattr(GateRAModel, "_get_adapter_state_dict", classmethod(without_frozen))
    with pytest.warns(UserWarning, match=r"the adapter 'reference' .* holds 0 of its 24 tensors; it is frozen"):
        model.save_pretrained(tmp_path)
    assert len(load_file(tmp_path / "adapter_model.safetensors")) == 24


def test_a_failure_between_the_renames_is_detected_on_load(tmp_path, monkeypatch):
    """Killed after the new weights replaced the old but before the config did: the pair is refused, not mixed."""
    _trained(0).save_pretrained(tmp_path)
    real_replace = os.replace  # the test restores with it after undo

    def die_before_config(src, dst):
        if str(dst).endswith("adapter_config.json"):
            raise KeyboardInterrupt("killed between the renames")
        real_replace(src, dst)

    ids = torch.randint(3, 128, (2, 7))
    first = _trained(0)
    expected = eval_logits(first, ids)
    monkeypatch.setattr(os, "replace", die_before_config)
    with pytest.raises(KeyboardInterrupt):
        _trained(1).save_pretrained(tmp_path)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="does not match the checksum.*kept as adapter_model.safetensors.previous"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    # nothing was lost: following the message restores the first adapter
    os.replace(tmp_path / "adapter_model.safetensors.previous", tmp_path / "adapter_model.safetensors")
    torch.testing.assert_close(eval_logits(PeftModel.from_pretrained(tiny_llama(), tmp_path), ids), expected)


def test_a_save_in_the_other_weights_format_replaces_the_previous_weights(tmp_path):
    """A pickled save over a safetensors one (and back) leaves one weights file, this save's: left there, the other
    file was what PEFT and transformers loaded (they prefer safetensors), with the new config."""
    import gatera_plugin

    ids = torch.randint(3, 128, (2, 7))
    first, second = _trained(0), _trained(1)
    first.save_pretrained(tmp_path)
    with gatera_plugin.allow_pickle():
        second.save_pretrained(tmp_path, safe_serialization=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.bin"]
        torch.testing.assert_close(eval_logits(PeftModel.from_pretrained(tiny_llama(), tmp_path), ids),
                                   eval_logits(second, ids))
        with open(tmp_path / "adapter_model.bin", "ab") as handle:  # the pickled weights are checksummed too
            handle.write(b"\0")
        with pytest.raises(ValueError, match="adapter_model.bin does not match the checksum"):
            PeftModel.from_pretrained(tiny_llama(), tmp_path)
    first.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    torch.testing.assert_close(eval_logits(PeftModel.from_pretrained(tiny_llama(), tmp_path), ids), eval_logits(first, ids))


def test_a_save_switching_format_killed_between_the_renames_names_the_previous_weights(tmp_path, monkeypatch):
    """Killed after the pickled weights replaced the safetensors ones, before the config: the refusal (with or without
    the pickle opt-in) names the interrupted save and the previous weights kept in the other format."""
    import gatera_plugin

    ids = torch.randint(3, 128, (2, 7))
    first = _trained(0)
    first.save_pretrained(tmp_path)
    real_replace = os.replace

    def die_before_config(src, dst):
        if str(dst).endswith("adapter_config.json"):
            raise KeyboardInterrupt("killed between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", die_before_config)
    with gatera_plugin.allow_pickle(), pytest.raises(KeyboardInterrupt):
        _trained(1).save_pretrained(tmp_path, safe_serialization=False)
    monkeypatch.undo()
    message = (r"adapter_model.bin does not match the checksum.*kept as adapter_model.safetensors.previous: rename it "
               r"to adapter_model.safetensors and remove adapter_model.bin")
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with gatera_plugin.allow_pickle(), pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    os.replace(tmp_path / "adapter_model.safetensors.previous", tmp_path / "adapter_model.safetensors")
    os.remove(tmp_path / "adapter_model.bin")
    torch.testing.assert_close(eval_logits(PeftModel.from_pretrained(tiny_llama(), tmp_path), ids), eval_logits(first, ids))


def test_truncated_weights_name_the_previous_copy_where_there_is_one(tmp_path):
    """Without renames a save killed while copying leaves the weights cut short and the previous ones as `.previous`:
    the refusal says so, as the checksum's does."""
    _trained(0).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    os.link(weights, tmp_path / "adapter_model.safetensors.previous")
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="corrupted or truncated.*kept as adapter_model.safetensors.previous"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def _a_save_would_wait(folder) -> bool:
    """Whether a save into `folder` would wait now: the exclusive lock it takes before its renames is not free."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@pytest.mark.parametrize("subfolder", [None, "sft"])
def test_transformers_own_adapter_loading_holds_the_folder_lock_until_the_weights_are_read(tmp_path, monkeypatch,
                                                                                           subfolder):
    """`model.load_adapter` (transformers') reads the config through PEFT, then the weights itself: a save must not land
    in between (it would pair its weights with the config read before)."""
    import peft

    first = _trained(0)
    folder = tmp_path / subfolder if subfolder else tmp_path
    first.save_pretrained(folder)
    real_inject = peft.inject_adapter_in_model
    writer_blocked = []

    def inject(*args, **kwargs):  # between transformers' config read and its weights read
        writer_blocked.append(_a_save_would_wait(folder))
        return real_inject(*args, **kwargs)

    monkeypatch.setattr(peft, "inject_adapter_in_model", inject)
    model = tiny_llama()
    try:
        model.load_adapter(str(tmp_path), adapter_kwargs={"subfolder": subfolder} if subfolder else None)
    except ValueError as error:
        if subfolder and "adapter model file not found" in str(error):  # (transformers 5.0)
            pytest.skip("this transformers' load_adapter does not find an adapter in `adapter_kwargs['subfolder']`")
        raise
    assert writer_blocked == [True]
    ids = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, eval_logits(first, ids))


# What a file system can lack (the call, its error there, the feature the warning names; None: no warning, because
# the save keeps every guarantee, e.g. `.previous` as a copy instead of a hard link).
LACKING = {
    "locks-lustre-noflock": ("flock", errno.ENOSYS, "file locks"),
    "locks-nfs-no-lockd": ("flock", errno.ENOLCK, "file locks"),
    "no-hard-links": ("link", errno.EPERM, None),
    "no-fsync": ("fsync", errno.EINVAL, "fsync"),
    "no-renames": ("replace", errno.ENOTSUP, "renaming files"),
}


def _refuse(monkeypatch, call, code):
    def refused(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl if call == "flock" else os, call, refused)


@pytest.mark.parametrize("case", list(LACKING))
def test_saves_and_loads_work_where_the_file_system_lacks_a_feature(tmp_path, monkeypatch, case):
    """Lustre without `-o flock`, NFS without a lock daemon, FUSE and bucket mounts: saving over an adapter and loading
    it work as PEFT's own save does there, with one warning per process naming what is lost (before: an OSError)."""
    from gatera_plugin import serialization

    call, code, feature = LACKING[case]
    ids = torch.randint(3, 128, (2, 7))
    _trained(0).save_pretrained(tmp_path)
    new = _trained(1)
    monkeypatch.setattr(serialization, "_warned_lacking", set())
    _refuse(monkeypatch, call, code)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new.save_pretrained(tmp_path)
        new.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    monkeypatch.undo()
    said = [str(w.message) for w in caught if "does not support" in str(w.message)]
    assert len(said) == (feature is not None), said
    assert feature is None or f"{tmp_path} does not support {feature}" in said[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    torch.testing.assert_close(eval_logits(loaded, ids), eval_logits(new, ids))


@pytest.mark.parametrize("code", [errno.EIO, errno.EPERM], ids=["EIO", "EPERM"])
def test_other_errors_while_saving_still_raise_and_keep_the_previous_adapter(tmp_path, monkeypatch, code):
    """Only the errors by which a file system says that it lacks a feature are worked around: an I/O error, or a
    rename refused for want of permission, is raised."""
    ids = torch.randint(3, 128, (2, 7))
    first = _trained(0)
    first.save_pretrained(tmp_path)
    _refuse(monkeypatch, "replace", code)
    with pytest.raises(OSError, match=os.strerror(code)):
        _trained(1).save_pretrained(tmp_path)
    monkeypatch.undo()
    torch.testing.assert_close(eval_logits(PeftModel.from_pretrained(tiny_llama(), tmp_path), ids), eval_logits(first, ids))


def test_without_renames_a_save_killed_before_the_config_keeps_the_previous_weights(tmp_path, monkeypatch):
    """Where files are replaced by copying, the copy goes to a new file: the old weights' `.previous` hard link keeps
    the old content (a copy into the old file would have overwritten the backup too), so the pair is refused at load
    and the first adapter can be restored, as after a rename."""
    import shutil

    ids = torch.randint(3, 128, (2, 7))
    first = _trained(0)
    first.save_pretrained(tmp_path)
    _refuse(monkeypatch, "replace", errno.ENOTSUP)
    real_copyfile = shutil.copyfile

    def die_before_config(source, destination, **kwargs):
        if str(destination).endswith("adapter_config.json"):
            raise KeyboardInterrupt("killed between the copies")
        return real_copyfile(source, destination, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", die_before_config)
    with pytest.warns(UserWarning, match="does not support renaming files"), pytest.raises(KeyboardInterrupt):
        _trained(1).save_pretrained(tmp_path)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="does not match the checksum.*kept as adapter_model.safetensors.previous"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    os.replace(tmp_path / "adapter_model.safetensors.previous", tmp_path / "adapter_model.safetensors")
    torch.testing.assert_close(eval_logits(PeftModel.from_pretrained(tiny_llama(), tmp_path), ids), eval_logits(first, ids))


@pytest.mark.parametrize("rank", [None, 0, 1], ids=["no-process-group", "rank-0", "rank-1"])
def test_a_save_of_ungathered_zero3_parameters_writes_nothing(tmp_path, monkeypatch, rank):
    """`model.save_pretrained` on a model partitioned by DeepSpeed ZeRO-3 (instead of `trainer.save_model`, which
    gathers) would write the rank's empty parts as the adapter. It is refused on rank 0 and skipped with a warning on
    the others, whose empty parts would otherwise overwrite rank 0's gathered adapter; the adapter there is kept."""
    import torch.distributed as dist

    ids = torch.randint(3, 128, (2, 7))
    first = _trained(0)
    first.save_pretrained(tmp_path)
    model = _trained(1)
    key = next(k for k in model.state_dict() if ".gatera_A." in k)
    partitioned = {**model.state_dict(), key: torch.empty(0)}  # what ZeRO-3 leaves on each rank outside a gather
    if rank is not None:
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_rank", lambda: rank)
    if rank == 1:
        with pytest.warns(UserWarning, match=r"1 empty tensor\(s\), e.g. .*gatera_A.*Rank 1 writes nothing"):
            model.save_pretrained(tmp_path, state_dict=partitioned)
    else:
        with pytest.raises(ValueError, match=r"1 empty tensor\(s\).*partitioned by DeepSpeed ZeRO-3.*trainer.save_model"):
            model.save_pretrained(tmp_path, state_dict=partitioned)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    torch.testing.assert_close(eval_logits(PeftModel.from_pretrained(tiny_llama(), tmp_path), ids), eval_logits(first, ids))


def test_save_keeps_other_files_and_updates_in_place(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    first, second = _trained(0), _trained(1)
    first.save_pretrained(tmp_path)
    second.save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert len(config["weights_sha256"]) == 64
    ids = torch.randint(3, 128, (2, 7))
    torch.testing.assert_close(eval_logits(PeftModel.from_pretrained(tiny_llama(), tmp_path), ids), eval_logits(second, ids))


def test_saving_over_another_methods_adapter_warns(tmp_path):
    from peft import LoraConfig

    get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="over the LORA adapter"):
        _trained().save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trained().save_pretrained(tmp_path)  # over our own adapter: no warning
    assert not [w for w in caught if "over the" in str(w.message)]
    (tmp_path / "adapter_config.json").write_text("{ broken")
    with pytest.warns(UserWarning, match="over the unreadable adapter"):
        _trained().save_pretrained(tmp_path)


def test_saving_over_another_methods_adapter_in_a_subfolder_warns_naming_it(tmp_path):
    """The folders a save writes configs into are the ones checked: a second adapter's subfolder, not the root it
    leaves alone."""
    from peft import LoraConfig

    lora = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    lora.add_adapter("other", LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path)  # root: "default", other/: "other", both LoRA
    gatera = _trained()
    gatera.add_adapter("other", GateRAConfig(r=4, target_modules=TARGETS))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gatera.save_pretrained(tmp_path, selected_adapters=["other"])
    replaced = [str(w.message) for w in caught if "over the" in str(w.message)]
    assert replaced == [f"Saving a GateRA adapter over the LORA adapter in {tmp_path / 'other'}."]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"  # left alone


# ------------------------------------------------------------------------------------------------ resume
class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _trainer(out, config, callbacks=(), base_dir=None):
    """The SFT run of the resume tests; `base_dir`: load the base from there and give it 2 new tokens (resized
    embeddings, which PEFT then saves in every checkpoint)."""
    torch.manual_seed(0)
    if base_dir is None:
        model = tiny_llama(init_std=0.2)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_dir)
        model.resize_token_embeddings(model.config.vocab_size + 2)
    args = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=8,
        learning_rate=2e-2, logging_steps=1, report_to="none", use_cpu=True, bf16=False, save_steps=4,
        save_strategy="steps", seed=0, max_length=32, disable_tqdm=True, lr_scheduler_type="linear",
    )
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": toy_texts(48)}),
                      processing_class=word_tokenizer(toy_texts(64)), peft_config=config, callbacks=list(callbacks))


@pytest.mark.slow
@pytest.mark.parametrize(
    "config,new_tokens",
    [
        (GateRAConfig(r=4, target_modules=TARGETS, entropy_weight=0.3), False),
        (GateRAConfig(r=4, target_modules=TARGETS, gate="threshold", keep_ratio=0.5, structure_gate=True), False),
        (GateRAConfig(r=4, target_modules=TARGETS, modules_to_save=["embed_tokens", "lm_head"]), True),
    ],
    ids=["sigmoid", "threshold-structure", "new-tokens"],
)
def test_stopped_and_resumed_run_equals_uninterrupted(tmp_path, config, new_tokens):
    """Same seed: stop after checkpoint-4, resume from it; losses, gate statistics and the final adapter (gates,
    thresholds, structure gates) equal the uninterrupted run's (tolerance: float summation order only). Also with new
    tokens (resized embeddings trained through `modules_to_save`), whose checkpoints hold PEFT's whole embedding
    wrappers: GateRA refused to resume from them before."""
    import copy

    base_dir = None
    if new_tokens:
        base_dir = tmp_path / "base"
        torch.manual_seed(0)
        tiny_llama(init_std=0.2).save_pretrained(base_dir)
    full = _trainer(tmp_path / "full", copy.deepcopy(config), base_dir=base_dir)
    full.train()
    stopped = _trainer(tmp_path / "part", copy.deepcopy(config), [StopAt(4)], base_dir=base_dir)
    stopped.train()
    assert sorted(p.name for p in (tmp_path / "part").glob("checkpoint-*")) == ["checkpoint-4"]
    if new_tokens:  # the checkpoint holds the resized embedding wrappers
        keys = load_file(tmp_path / "part" / "checkpoint-4" / "adapter_model.safetensors")
        assert keys["base_model.model.lm_head.original_module.weight"].shape[0] == 130
    resumed = _trainer(tmp_path / "part", copy.deepcopy(config), base_dir=base_dir)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-4"))

    def logs(trainer):
        return [h for h in trainer.state.log_history if "loss" in h]

    full_logs, resumed_logs = logs(full), logs(resumed)
    assert [h["step"] for h in resumed_logs] == list(range(1, 9))  # the resumed state carries steps 1-4 of the log
    for a, b in zip(full_logs[4:], resumed_logs[4:]):
        for key in a:
            if key == "loss" or key.startswith("gatera/"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    full.save_model(str(tmp_path / "full-final"))
    resumed.save_model(str(tmp_path / "resumed-final"))
    a, b = load_file(tmp_path / "full-final" / "adapter_model.safetensors"), load_file(
        tmp_path / "resumed-final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


# ------------------------------------------------------------------------------------------------ numerics
def _finite_step(model, input_ids, attention_mask=None, labels=None):
    model.train()
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    loss = out.loss if labels is not None else out.logits.float().pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    return loss


@pytest.mark.parametrize("bias", [1e4, -1e4])
def test_saturated_gates_exactly_0_or_1(bias):
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, entropy_weight=1.0,
                                                      init_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gatera_gate" in name and name.endswith("bias"):
                p.fill_(bias)
    gate = model.base_model.model.model.layers[0].self_attn.q_proj.gatera_gate["default"](torch.randn(3, 32))
    assert torch.all(gate == (1.0 if bias > 0 else 0.0))
    ids = torch.randint(3, 128, (2, 9))
    _finite_step(model, ids, labels=ids)
    stats = model.base_model.pop_gate_stats()
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert stats["gatera/entropy"] < 1e-4  # H at the clamp [1e-6, 1 - 1e-6]: 2e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gate,branch", [("sigmoid", "hira"), ("threshold", "lora"), ("sigmoid", "dora")])
def test_half_precision_bases(dtype, gate, branch):
    extra = {"lora_alpha": 8} if branch != "hira" else {}
    model = get_peft_model(tiny_llama().to(dtype), GateRAConfig(r=4, target_modules=TARGETS, gate=gate,
                                                                 branch=branch, init_weights=False, **extra))
    ids = torch.randint(3, 128, (2, 9))
    _finite_step(model, ids, labels=ids)


def test_empty_batch_and_empty_layer_input():
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, init_weights=False))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(0, 5, 32, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, 5, 32)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert model.base_model.penalty_run.token_scale("default", "sigmoid", 0.5) == 0.0  # no tokens: no division by 0


def test_sequences_that_are_all_padding():
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, entropy_weight=1.0,
                                                      init_weights=False))
    ids = torch.randint(3, 128, (3, 9))
    mask = torch.ones_like(ids)
    mask[1] = 0  # one sequence entirely padding
    labels = ids.masked_fill(mask == 0, -100)
    _finite_step(model, ids, mask, labels)
    model.zero_grad()
    _finite_step(model, ids, torch.zeros_like(ids))  # the whole batch padding: the penalty has no tokens to count


def test_very_long_sequence():
    model = get_peft_model(tiny_llama(max_positions=4096), GateRAConfig(r=4, target_modules=TARGETS,
                                                                        init_weights=False))
    ids = torch.randint(3, 128, (1, 4096))
    _finite_step(model, ids, labels=ids)


# ------------------------------------------------------------------------------------------------ config and weights agree
LORA = dict(branch="lora", lora_alpha=8)
# (source config, edit of adapter_config.json after the save, field the refusal must name)
EDITS = [
    ("drop-a-target", {}, {"target_modules": ["q_proj", "down_proj"]}, "target_modules"),
    ("gate-none", {}, {"gate": "none", "entropy_weight": 0.0}, "gate"),
    ("rank", {}, {"r": 8}, "r"),
    ("branch-removed", LORA, {"branch": None, "lora_alpha": None}, "branch"),  # None: the key is deleted
    ("lora-to-hira", LORA, {"branch": "hira", "lora_alpha": None}, "branch"),
    ("lora-alpha", LORA, {"lora_alpha": 32}, "lora_alpha"),
    ("structure-gate-off", {"structure_gate": True}, {"structure_gate": False, "structure_init": None,
                                                      "structure_weight": None}, "structure_gate"),
    ("sparse-threshold", {}, {"sparse_threshold": 0.5}, "sparse_threshold"),
    # the gates' initial values set hira_scaling="lora"'s scale: edited, they loaded unrefused as another model
    ("gate-bias-init", {}, {"gate_bias_init": 2.0}, "gate_bias_init"),
    ("structure-init", {"structure_gate": True}, {"structure_init": -2.0}, "structure_init"),
]


def _save_random(folder, seed=0, **kwargs):
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, **kwargs))
    torch.manual_seed(seed)
    randomize_adapters(model, scale=0.5)
    model.save_pretrained(folder)
    return model


def _edit_config(folder, changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        config.pop(key, None) if value is None else config.__setitem__(key, value)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("source,edit,field", [e[1:] for e in EDITS], ids=[e[0] for e in EDITS])
def test_a_config_edited_after_the_save_is_refused_naming_the_field(tmp_path, source, edit, field):
    """Each edit loaded "fine" before, with logits off by 1.2-4.6: the structure stamp names the edited field."""
    _save_random(tmp_path, **source)
    _edit_config(tmp_path, edit)
    with pytest.raises(ValueError, match=rf"adapter_config.json: field\(s\) .*`{field}`.*differ from what the save "
                                         r"recorded in `structure_stamp`"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


@pytest.mark.parametrize("replace", ["peft-type-edited", "lora-config-copied"])
def test_another_methods_config_beside_gatera_weights_is_refused_before_peft_builds_it(tmp_path, replace):
    """A GateRA folder whose config says another method: refused naming the file, before PEFT builds that method's
    model from it (an edited `peft_type` failed with a TypeError deep in PEFT's LoRA code)."""
    from peft import LoraConfig

    _save_random(tmp_path)
    if replace == "peft-type-edited":
        _edit_config(tmp_path, {"peft_type": "LORA"})
    else:
        get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS)).save_pretrained(tmp_path / "lora")
        (tmp_path / "adapter_config.json").write_text((tmp_path / "lora" / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match=r"adapter_config.json describes a LORA adapter, but "
                                         r"adapter_model.safetensors there holds GateRA weights"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_a_stamp_from_before_the_gate_inits_were_stamped_still_loads(tmp_path):
    """`gate_bias_init` and `structure_init` joined the stamp later: a stamp without them loads as before (nothing to
    compare), and 0 spelled as 0.0 is the same value."""
    saved = _save_random(tmp_path, structure_gate=True)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    for name in ("gate_bias_init", "structure_init"):
        del config["structure_stamp"][name]
    path.write_text(json.dumps(config))
    input_ids = torch.randint(3, 128, (2, 7))
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, saved.eval()(input_ids=input_ids).logits)
    _save_random(tmp_path / "spelled", gate_bias_init=0)
    _edit_config(tmp_path / "spelled", {"gate_bias_init": 0.0})
    PeftModel.from_pretrained(tiny_llama(), tmp_path / "spelled")


UNSTAMPED_EDITS = [
    ("drop-a-target", {}, {"target_modules": ["q_proj", "down_proj"]}, r"`target_modules`"),
    ("gate-none", {}, {"gate": "none", "entropy_weight": 0.0}, r"`gate`"),
    ("dora-to-lora", {"branch": "dora", "lora_alpha": 8}, {"branch": "lora"}, r"`branch`"),
    ("structure-gate-off", {"structure_gate": True}, {"structure_gate": False, "structure_init": None,
                                                      "structure_weight": None}, r"`structure_gate`"),
    ("gate-added", {"gate": "none"}, {"gate": "sigmoid", "entropy_weight": None}, r"lacks .*`gate`"),
]


@pytest.mark.parametrize("source,edit,field", [e[1:] for e in UNSTAMPED_EDITS], ids=[e[0] for e in UNSTAMPED_EDITS])
def test_adapters_without_a_stamp_still_have_their_tensor_set_checked(tmp_path, source, edit, field):
    """An adapter saved before the stamp existed: it warns, and every tensor the config does not describe (or lacks)
    is an error naming the weights file and the field."""
    _save_random(tmp_path, **source)
    _edit_config(tmp_path, {**edit, "structure_stamp": None})
    with pytest.warns(UserWarning, match=r"has no structure_stamp"), pytest.raises(ValueError, match=field):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_an_unstamped_adapter_loads_with_a_warning(tmp_path):
    source = _save_random(tmp_path)
    _edit_config(tmp_path, {"structure_stamp": None})
    ids = torch.randint(3, 128, (2, 7))
    with pytest.warns(UserWarning, match=r"has no structure_stamp.*Re-save"):
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(eval_logits(loaded, ids), eval_logits(source, ids))


def test_an_unknown_extra_tensor_is_an_error(tmp_path):
    from safetensors.torch import save_file

    from gatera_plugin.serialization import file_sha256

    _save_random(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    state = load_file(weights)
    state["base_model.model.model.layers.0.self_attn.k_proj.gatera_A"] = torch.zeros(4, 32)
    save_file(state, weights)
    _edit_config(tmp_path, {"weights_sha256": file_sha256(weights)})  # as a tool rewriting the weights would
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: its tensor names or shapes differ"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    _edit_config(tmp_path, {"structure_stamp": None})  # unstamped: the tensor-set check at load catches it
    with pytest.warns(UserWarning, match="no structure_stamp"), pytest.raises(
            ValueError, match=rf"{tmp_path}/adapter_model.safetensors holds 1 tensor\(s\) that its adapter_config.json "
                              r"does not describe.*k_proj.gatera_A.*`target_modules`"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_peft_type_in_lower_case_loads(tmp_path):
    from peft import PeftConfig

    source = _save_random(tmp_path)
    for spelling in ("gatera", "GateRA"):
        _edit_config(tmp_path, {"peft_type": spelling})
        assert isinstance(PeftConfig.from_pretrained(tmp_path), GateRAConfig)
        ids = torch.randint(3, 128, (2, 7))
        torch.testing.assert_close(eval_logits(PeftModel.from_pretrained(tiny_llama(), tmp_path), ids),
                                   eval_logits(source, ids))


# ------------------------------------------------------------------------------------------------ Hub adapters
HUB_REPO = "someone/gatera-adapter"


def _on_the_hub(saved, cache, subfolder=None):
    """Put the adapter folder `saved` into the Hugging Face cache `cache` as the Hub repository HUB_REPO (at main, in
    `subfolder`), as a download would: then, offline, PEFT loads it by repository id. Returns the snapshot folder."""
    commit = "0" * 40
    repo = cache / f"models--{HUB_REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit / (subfolder or "")
    snapshot.mkdir(parents=True)
    for path in saved.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    return snapshot


@pytest.mark.parametrize("subfolder", [None, "sft"])
def test_hub_adapters_get_the_checks_of_local_ones(tmp_path, monkeypatch, subfolder):
    """`PeftModel.from_pretrained(base, "user/repo")`, the usual way to share an adapter. Before, only local folders
    were checked: a Hub adapter whose config was edited afterwards (say `lora_alpha` in the Hub's web editor) loaded
    silently as another model. Now the adapter's local copy in the Hugging Face cache gets the same checks."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the cache only, never the network
    ids = torch.randint(3, 128, (2, 7))
    source = _save_random(tmp_path / "saved")
    cache = tmp_path / "cache"
    snapshot = _on_the_hub(tmp_path / "saved", cache, subfolder)
    options = {"cache_dir": str(cache), **({"subfolder": subfolder} if subfolder else {})}
    loaded = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS))
    if subfolder is None:  # (offline, PEFT 0.21.2 looks for the weights of a Hub subfolder in subfolder/subfolder/)
        loaded = PeftModel.from_pretrained(tiny_llama(), HUB_REPO, **options)
        torch.testing.assert_close(eval_logits(loaded, ids), eval_logits(source, ids))
        loaded.load_adapter(HUB_REPO, adapter_name="again", **options)  # the other way in
    _edit_config(snapshot, {"lora_alpha": 64})
    with pytest.raises(ValueError, match=r"snapshots/0+/(sft/)?adapter_config.json: field\(s\) `lora_alpha` differ"):
        PeftModel.from_pretrained(tiny_llama(), HUB_REPO, **options)
    with pytest.raises(ValueError, match=r"field\(s\) `lora_alpha` differ"):
        loaded.load_adapter(HUB_REPO, adapter_name="edited", **options)


@pytest.mark.parametrize("method", ["gatera", "lora"])
def test_hub_loads_fetch_little_beyond_peft_and_check_once(tmp_path, monkeypatch, method):
    """Counting `hf_hub_download` calls (online, each is a request): a Hub load through PeftModel.from_pretrained
    makes PEFT's own plus at most one for another method's adapter (its config, to learn the method) and two for a
    GateRA one (its config and weights, checked before PEFT builds anything); the reads nested in the load make none.
    Through AutoPeftModel, which reads the config first, the folder is checked once."""
    import huggingface_hub
    import peft.config
    import peft.peft_model
    import peft.utils.save_and_load
    from peft import AutoPeftModelForCausalLM, LoraConfig

    from gatera_plugin import serialization

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    tiny_llama().save_pretrained(tmp_path / "base")
    config = (GateRAConfig(r=4, target_modules=TARGETS) if method == "gatera"
              else LoraConfig(r=4, target_modules=TARGETS))
    model = get_peft_model(tiny_llama(), config)
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "saved")
    cache = tmp_path / "cache"
    _on_the_hub(tmp_path / "saved", cache)
    calls = {"ours": 0, "peft": 0}

    def counting(function, who):
        @functools.wraps(function)
        def download(*args, **kwargs):
            calls[who] += 1
            return function(*args, **kwargs)
        return download

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", counting(huggingface_hub.hf_hub_download, "ours"))
    for module in (peft.config, peft.utils.save_and_load, peft.peft_model):
        monkeypatch.setattr(module, "hf_hub_download", counting(module.hf_hub_download, "peft"))
    checks = []
    real_check = serialization._check_adapter_files
    monkeypatch.setattr(serialization, "_check_adapter_files", lambda folder: (checks.append(folder), real_check(folder)))
    PeftModel.from_pretrained(tiny_llama(), HUB_REPO, cache_dir=str(cache))
    assert calls["peft"] >= 2 and calls["ours"] == (2 if method == "gatera" else 1), calls
    assert len(checks) == (method == "gatera")
    serialization._passed_checks.clear()
    checks.clear()
    AutoPeftModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert len(checks) == (method == "gatera")


def test_a_repository_id_that_is_not_there_is_left_to_peft(tmp_path, monkeypatch):
    """A Hub id that cannot be fetched (no such repository, or offline and not cached) gets PEFT's own error."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json' at 'someone/gatera-adapter'"):
        PeftModel.from_pretrained(tiny_llama(), HUB_REPO, cache_dir=str(tmp_path))


# ------------------------------------------------------------------------------------------------ NaN / inf weights
def test_non_finite_weights_warn_at_save_and_at_load(tmp_path):
    """Decision: warn (naming the tensors), not refuse, at both ends: a diverged run's state can still be saved and
    inspected, and nothing saved is refused at load."""
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS))
    with torch.no_grad():
        model.base_model.model.model.layers[1].self_attn.v_proj.gatera_B["default"][0, 0] = float("nan")
        model.base_model.model.model.layers[0].mlp.down_proj.gatera_A["default"][1, 2] = float("inf")
    with pytest.warns(UserWarning, match=r"2 adapter tensor\(s\) hold NaN or inf, e.g. .*layers.0.mlp.down_proj."
                                         r"gatera_A.*layers.1.self_attn.v_proj.gatera_B"):
        model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"adapter_model.safetensors: 2 adapter tensor\(s\) hold NaN or inf"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


# ------------------------------------------------------------------------------------------------ pruning
def _structure_model(config):
    model = get_peft_model(tiny_llama(), config)
    with torch.no_grad():
        for i, (_, param) in enumerate(n for n in model.named_parameters() if "gatera_structure" in n[0]):
            param.fill_(-5.0 if i % 2 else 5.0)  # every other module ends closed
    return model


def test_pruning_leaves_a_model_sharing_the_config_alone(tmp_path):
    config = GateRAConfig(r=4, target_modules=TARGETS, structure_gate=True)
    first, second = _structure_model(config), _structure_model(config)
    result = first.base_model.prune_structure(0.5)
    assert len(result["pruned"]) == 3 and set(first.peft_config["default"].target_modules) == set(result["kept"])
    assert set(second.peft_config["default"].target_modules) == set(TARGETS)
    second.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert sum(1 for n, _ in loaded.named_parameters() if n.endswith("gatera_A.default")) == 6


def test_pruning_one_adapter_leaves_the_others_as_trainable_as_they_were(tmp_path):
    """Pruning adapter "b" re-activates the other adapters in the pruned modules: a frozen adapter (loaded for
    inference) stayed frozen everywhere else but became trainable there."""
    model = _structure_model(GateRAConfig(r=4, target_modules=TARGETS, structure_gate=True))
    model.save_pretrained(tmp_path / "x")
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "x", adapter_name="a")  # frozen
    model.load_adapter(tmp_path / "x", adapter_name="b")
    model.base_model.set_adapter(["a", "b"])
    for param in model.parameters():
        param.requires_grad_(False)
    targeted = list(model.base_model.targeted_module_names)
    result = model.base_model.prune_structure(0.5, adapter_name="b")
    assert len(result["pruned"]) == 3
    assert [name for name, param in model.named_parameters() if param.requires_grad] == []
    assert model.base_model.targeted_module_names == targeted  # adapter "a" still adapts the pruned modules


def test_pruning_structure_gates_that_went_nan_is_refused_naming_a_module(tmp_path):
    """σ(α) = NaN (a diverged run) is neither ≥ nor < the threshold: the module was in neither list, left out of
    `target_modules` but kept in the model, and the saved adapter failed to load, blaming an edited config."""
    from gatera_plugin.cli import main

    model = _structure_model(GateRAConfig(r=4, target_modules=TARGETS, structure_gate=True))
    with torch.no_grad():
        model.base_model.model.model.layers[1].self_attn.q_proj.gatera_structure["default"].alpha.fill_(float("nan"))
    model.save_pretrained(tmp_path / "full")
    message = r"structure gates of 1 module\(s\) hold NaN, e.g. 'model.layers.1.self_attn.q_proj' \(training diverged\)"
    with pytest.raises(ValueError, match=message):
        model.base_model.prune_structure(0.5)
    assert set(model.peft_config["default"].target_modules) == set(TARGETS)
    assert main(["prune", str(tmp_path / "full"), "--threshold", "0.5", "--out", str(tmp_path / "pruned")]) == 2
    assert not (tmp_path / "pruned").exists()


def test_pruning_every_module_is_refused(tmp_path):
    from gatera_plugin.cli import main

    model = _structure_model(GateRAConfig(r=4, target_modules=TARGETS, structure_gate=True))
    model.save_pretrained(tmp_path / "full")
    with pytest.raises(ValueError, match=r"`threshold`=1.0 would prune all 6 adapted modules \(the highest σ\(α\) is "
                                         r"0.9933\).*cannot be loaded"):
        model.base_model.prune_structure(1.0)
    assert main(["prune", str(tmp_path / "full"), "--threshold", "1.0", "--out", str(tmp_path / "pruned")]) == 2
    assert not (tmp_path / "pruned").exists()


def test_gatera_prune_reads_its_source_under_the_folder_lock_and_writes_a_readable_folder(tmp_path, monkeypatch):
    """A save landing in the source while it is read must wait (else the copy could pair one save's config with
    another's weights, and be stamped as sound); the output folder gets the mode `mkdir` gives, not mkdtemp's 0700."""
    from gatera_plugin.cli import main

    _structure_model(GateRAConfig(r=4, target_modules=TARGETS, structure_gate=True)).save_pretrained(tmp_path / "full")
    from safetensors import torch as safetensors_torch

    real_load = safetensors_torch.load_file
    writer_blocked = []

    def load_file(path, *args, **kwargs):
        writer_blocked.append(_a_save_would_wait(tmp_path / "full"))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(safetensors_torch, "load_file", load_file)
    old_umask = os.umask(0o022)
    try:
        assert main(["prune", str(tmp_path / "full"), "--threshold", "0.5", "--out", str(tmp_path / "pruned")]) == 0
    finally:
        os.umask(old_umask)
    assert writer_blocked == [True]
    assert (tmp_path / "pruned").stat().st_mode & 0o777 == 0o755


def test_gatera_prune_that_loses_a_race_for_its_out_folder_names_it_and_leaves_it_alone(tmp_path, monkeypatch, capsys):
    """Another writer fills `--out` while the pruned copy is written: one line naming `--out` (it named the hidden
    staging folder, in the OS's words), the other writer's files kept, no staging folder left."""
    from safetensors import torch as safetensors_torch

    from gatera_plugin.cli import main

    _structure_model(GateRAConfig(r=4, target_modules=TARGETS, structure_gate=True)).save_pretrained(tmp_path / "full")
    real_save = safetensors_torch.save_file

    def save_file(*args, **kwargs):
        (tmp_path / "pruned").mkdir()
        (tmp_path / "pruned" / "theirs.txt").write_text("the other writer's")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors_torch, "save_file", save_file)
    assert main(["prune", str(tmp_path / "full"), "--threshold", "0.5", "--out", str(tmp_path / "pruned")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'pruned'} was created by someone else" in err, err
    assert [p.name for p in (tmp_path / "pruned").iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "pruned"]


# ------------------------------------------------------------------------------------------------ cache_delta
def _cached_model():
    model = get_peft_model(tiny_llama(), GateRAConfig(r=4, target_modules=TARGETS, cache_delta=True, init_weights=False))
    return randomize_adapters(model, scale=0.5).eval()


@pytest.mark.parametrize("write", ["scale", "ema-swap", "base-weight"])
def test_cache_delta_sees_writes_through_data(write):
    """Writes through `.data` bump no version counter; eval must still use the new weights, not the cached update."""
    model = _cached_model()
    ids = torch.randint(3, 128, (2, 7))
    before = eval_logits(model, ids)  # fills the cache
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer._delta_cache
    with torch.no_grad():
        for name, param in model.named_parameters():
            if write == "scale" and "gatera_B" in name:
                param.data.mul_(-2.0)
            elif write == "ema-swap" and "gatera_A" in name:
                param.data.copy_(torch.randn_like(param))
        if write == "base-weight":
            layer.base_layer.weight.data.mul_(3.0)
    cached = eval_logits(model, ids)
    model.peft_config["default"].cache_delta = False  # the layers read this config: the uncached reference
    reference = eval_logits(model, ids)
    assert not torch.allclose(reference, before, atol=1e-3)
    torch.testing.assert_close(cached, reference, rtol=1e-5, atol=1e-5)


def test_an_update_cached_under_inference_mode_serves_a_later_forward_that_records_a_graph():
    """A pipeline's forward under `torch.inference_mode()` fills the cache; an input attribution in eval (a graph
    through x, frozen adapters) must not then fail on an inference tensor saved for backward."""
    model = _cached_model().requires_grad_(False)
    ids = torch.randint(3, 128, (2, 7))
    with torch.inference_mode():
        model(input_ids=ids)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    model(inputs_embeds=embeds).logits[:, -1].sum().backward()
    fresh = _cached_model().requires_grad_(False)
    fresh.load_state_dict(model.state_dict())
    expected = model.get_input_embeddings()(ids).detach().requires_grad_()
    fresh(inputs_embeds=expected).logits[:, -1].sum().backward()
    torch.testing.assert_close(embeds.grad, expected.grad)


def test_cache_delta_on_a_model_made_under_inference_mode():
    """Parameters made under `torch.inference_mode()` (a model loaded there) are inference tensors, which have no
    version counter for the cache's key to read."""
    ids = torch.randint(3, 128, (2, 7))
    reference = _cached_model()
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    with torch.inference_mode():
        model = _cached_model()
        model.load_state_dict(reference.state_dict())
        torch.testing.assert_close(model(input_ids=ids).logits, expected)
        torch.testing.assert_close(model(input_ids=ids).logits, expected)  # (from the cache)


def test_train_drops_the_cached_update():
    """`Linear(nn.Module, GateRALayer)` resolved train() to nn.Module.train, so the cache outlived eval."""
    model = _cached_model()
    eval_logits(model, torch.randint(3, 128, (2, 7)))
    layers = [m for m in model.modules() if hasattr(m, "_delta_cache")]
    assert len(layers) == 6 and all(layer._delta_cache for layer in layers)
    model.train()
    assert not any(layer._delta_cache for layer in layers)


def test_a_refused_adapter_leaves_another_tuners_layer_below_it_in_place():
    """A layer GateRA wrapped for a refused adapter alone is unwrapped to the layer it wrapped, which may be another
    tuner's (a LoRA layer injected before): `get_base_layer()` would go down to the bare `nn.Linear` and drop it."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["k_proj"]), tiny_llama(), adapter_name="lo")
    with pytest.raises(ValueError, match="GateRA cannot adapt target module of type LlamaRMSNorm"):
        get_peft_model(model, GateRAConfig(r=4, target_modules=["k_proj", "norm"]), adapter_name="ga")
    assert isinstance(model.model.layers[0].self_attn.k_proj, LoraLayer)


def test_another_methods_adapter_of_a_newer_peft_is_named_as_such_and_a_given_config_is_not_second_guessed(tmp_path):
    """With the plugin imported, every adapter load reads the config's `peft_type` first. A method that a newer PEFT
    added (a string this PEFT does not know) was told only to "restore the file or re-save it", as if it were broken;
    the message names both causes now. A config passed to the load (`config=`, transformers' `peft_config=`) is what
    PEFT uses, so the saved one's `peft_type` (unknown, or missing) no longer refuses a load that works without the
    plugin."""
    from peft import LoraConfig

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**saved, "peft_type": "SHINYNEW"}))
    with pytest.raises(ValueError, match=r"is 'SHINYNEW', not a PEFT method peft .* knows .*edited or damaged.*if "
                                         r"another PEFT release saved it .*load it with that release"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, config=LoraConfig(r=2, target_modules=["q_proj"]))
    torch.testing.assert_close(eval_logits(loaded.eval(), torch.arange(3, 9)[None]),
                               eval_logits(model, torch.arange(3, 9)[None]), rtol=0, atol=0)
    del saved["peft_type"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"field `peft_type` is None, not a PEFT method.*restore it"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    given = LoraConfig(r=2, target_modules=["q_proj"])
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, config=given).eval()
    input_ids = torch.randint(3, 128, (1, 6))
    torch.testing.assert_close(eval_logits(loaded, input_ids), eval_logits(model, input_ids), rtol=0, atol=0)
    base = tiny_llama()
    base.load_adapter(str(tmp_path), peft_config=LoraConfig(r=2, target_modules=["q_proj"]))
    torch.testing.assert_close(eval_logits(base, input_ids), eval_logits(model, input_ids), rtol=0, atol=0)
