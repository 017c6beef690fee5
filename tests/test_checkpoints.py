"""Resolving --model, --reference and --base-model: cheap checks with one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest

from pytest_sftsafety.backends.checkpoints import plan_models
from pytest_sftsafety.errors import ModelLoadError


def plan(*models, reference=None, base=None, allow_pickle=False):
    return plan_models(tuple(str(m) for m in models), str(reference) if reference else None,
                       str(base) if base else None, allow_pickle)


def copy(src, dst):
    """Copy an adapter, pointing its recorded (relative) base at the original base by absolute path."""
    shutil.copytree(src, dst)
    config_path = dst / "adapter_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = str((src / config["base_model_name_or_path"]).resolve())
        config_path.write_text(json.dumps(config))
    return dst


def test_adapter_resolves_its_recorded_base(toy_models):
    assert json.loads((toy_models.answer_all / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "../base"  # relative to the adapter folder, found there
    result = plan(toy_models.answer_all, toy_models.keeps_refusing)
    assert [c.kind for c in result.candidates] == ["adapter", "adapter"]
    assert result.base == str(toy_models.base.resolve()) and result.reference is None
    assert result.describe_reference().endswith("(adapter disabled)")


def test_error_messages(toy_models, tmp_path):
    cases = []
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((lambda: plan(empty), "neither adapter_config.json (a LoRA adapter) nor config.json"))
    cases.append((lambda: plan(toy_models.data_202503), "is a file; point it at a checkpoint folder"))
    no_weights = copy(toy_models.answer_all, tmp_path / "no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    cases.append((lambda: plan(no_weights), "adapter_config.json but no adapter_model.safetensors"))
    pickled = copy(toy_models.answer_all, tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    cases.append((lambda: plan(pickled), "only pickle weights (adapter_model.bin)"))
    orphan = copy(toy_models.answer_all, tmp_path / "orphan")
    config = json.loads((orphan / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (orphan / "adapter_config.json").write_text(json.dumps(config))
    cases.append((lambda: plan(orphan), "its base model '/"))
    cases.append((lambda: plan(orphan), "download it or pass --base-model PATH"))
    cases.append((lambda: plan(toy_models.answer_all, toy_models.mistral), "mixes LoRA adapters and full models"))
    cases.append((lambda: plan(toy_models.mistral), "pass --reference PATH (the model before fine-tuning)"))
    no_full_weights = copy(toy_models.mistral, tmp_path / "no_full_weights")
    (no_full_weights / "model.safetensors").unlink()
    cases.append((lambda: plan(no_full_weights, reference=no_full_weights), "config.json but no weights"))
    for make, message in cases:
        with pytest.raises(ModelLoadError) as exc:
            make()
        assert message in str(exc.value) and "\n" not in str(exc.value), (message, str(exc.value))


def test_base_override_and_pickle_permission(toy_models, tmp_path):
    orphan = copy(toy_models.answer_all, tmp_path / "orphan")
    config = json.loads((orphan / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "missing-org/missing-model"
    (orphan / "adapter_config.json").write_text(json.dumps(config))
    assert plan(orphan, base=toy_models.base).base == str(toy_models.base.resolve())
    pickled = copy(toy_models.answer_all, tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    assert plan(pickled, allow_pickle=True).candidates[0].pickle_weights


def test_fingerprints_follow_weights_and_tokenizer(toy_models, tmp_path):
    from pytest_sftsafety.backends.checkpoints import variant_fingerprint

    two = plan(toy_models.answer_all, toy_models.keeps_refusing)
    prints = {v: variant_fingerprint(two, v) for v in ("candidate:0", "candidate:1", "reference")}
    assert len(set(prints.values())) == 3
    assert variant_fingerprint(plan(toy_models.keeps_refusing), "reference") == prints["reference"]
    changed = copy(toy_models.answer_all, tmp_path / "changed")
    weights = changed / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert variant_fingerprint(plan(changed), "candidate:0") != prints["candidate:0"]
    assert variant_fingerprint(plan(changed), "reference") == prints["reference"]


def test_reference_identity_ignores_which_adapter_ships_the_tokenizer(toy_models, tmp_path):
    from pytest_sftsafety.backends.checkpoints import variant_fingerprint

    with_tokenizer = copy(toy_models.answer_all, tmp_path / "with_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (toy_models.base / name).is_file():
            shutil.copy(toy_models.base / name, with_tokenizer / name)
    other = copy(toy_models.keeps_refusing, tmp_path / "other")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (toy_models.base / name).is_file():
            shutil.copy(toy_models.base / name, other / name)
    first, second = plan(with_tokenizer), plan(other)
    assert variant_fingerprint(first, "reference") == variant_fingerprint(second, "reference")
    assert variant_fingerprint(first, "candidate:0") != variant_fingerprint(second, "candidate:0")


def test_auto_device_is_resolved_without_torch(monkeypatch):
    from pytest_sftsafety.config import resolved_device, resolved_dtype

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert resolved_device("auto") == "cpu" and resolved_dtype("auto", "cpu") == "float32"
    assert resolved_dtype("auto", "cuda:1") == "bfloat16" and resolved_device("cuda:1") == "cuda:1"


def test_asking_for_a_gpu_where_none_is_visible_says_so(monkeypatch):
    import torch

    from pytest_sftsafety.backends.hf import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hides every GPU, whatever the machine has
    with pytest.raises(ModelLoadError, match=r"^--device cuda: this machine has no visible GPU \(no NVIDIA device, "
                                             r"or CUDA_VISIBLE_DEVICES hides them all\); pass --device cpu"):
        pick_device("cuda")
    monkeypatch.setattr("pytest_sftsafety.backends.hf.cuda_visible", lambda: True)  # a device node is there
    with pytest.raises(ModelLoadError, match=r"a GPU is visible but (this torch build cannot use CUDA|torch cannot "
                                             r"reach it)"):
        pick_device("cuda")
