"""Find out what a --model argument is (adapter or full model) without importing torch.

These checks are cheap, so the plugin runs them at start-up: a wrong path fails before any
model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Checkpoint:
    """A resolved model argument: ``kind`` is "adapter", "full" or "served" (a model name on a server, whose
    ``identity`` is what the server says about it); ``base`` is set for adapters."""

    spec: str
    kind: str
    path: str
    base: str | None = None
    pickle_weights: bool = False
    identity: str = ""


def _hub_file(repo: str, filename: str) -> Path | None:
    """A file of a hub repo from the local cache or the hub; None when it cannot be had."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, filename))
    except Exception:  # offline, gated, missing: the caller words the error
        return None


def _check_full_weights(folder: Path, label: str, allow_pickle: bool) -> bool:
    """True when the folder holds pickle weights only (allowed by the caller)."""
    names = {p.name for p in folder.iterdir()}
    if any(n in names for n in SAFE_WEIGHTS) or any(n.endswith(".safetensors") for n in names):
        return False
    if any(n in names for n in PICKLE_WEIGHTS) or any(n.endswith((".bin", ".pt", ".pth")) for n in names):
        if allow_pickle:
            return True
        raise ModelLoadError(f"{label}: {folder} has only pickle weights (.bin), which can run code when "
                             f"loaded; convert them to safetensors or pass --allow-pickle if you trust them")
    raise ModelLoadError(f"{label}: {folder} has config.json but no weights (model.safetensors); "
                         f"is the checkpoint complete?")


def resolve(spec: str, label: str, base_override: str | None, allow_pickle: bool) -> Checkpoint:
    """Resolve a model argument; ``label`` (e.g. ``--model``) names it in errors."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return _adapter(spec, path, label, base_override, allow_pickle)
        if (path / "config.json").is_file():
            pickled = _check_full_weights(path, label, allow_pickle)
            return Checkpoint(spec=spec, kind="full", path=str(path.resolve()), pickle_weights=pickled)
        raise ModelLoadError(f"{label} {spec}: the folder has neither adapter_config.json (a LoRA adapter) "
                             f"nor config.json (a full model); point it at a saved checkpoint folder")
    if path.exists():
        raise ModelLoadError(f"{label} {spec}: is a file; point it at a checkpoint folder")
    if not HUB_ID.match(spec) or spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"{label} {spec}: no such folder; give a checkpoint folder or a hub id ORG/NAME")
    adapter_cfg = _hub_file(spec, "adapter_config.json")
    if adapter_cfg is not None:
        return _adapter(spec, adapter_cfg.parent, label, base_override, allow_pickle)
    if _hub_file(spec, "config.json") is not None:
        return Checkpoint(spec=spec, kind="full", path=spec)
    raise ModelLoadError(f"{label} {spec}: no such folder, and no hub model of that id could be had (not in the "
                         f"local cache, hub offline or gated); give a checkpoint folder or download the model first")


def _adapter(spec: str, folder: Path, label: str, base_override: str | None, allow_pickle: bool) -> Checkpoint:
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ModelLoadError(f"{label} {spec}: adapter_config.json is not valid JSON ({exc}); "
                             f"re-save the adapter") from None
    names = {p.name for p in folder.iterdir()}
    pickled = False
    if "adapter_model.safetensors" not in names:
        if "adapter_model.bin" in names and allow_pickle:
            pickled = True
        elif "adapter_model.bin" in names:
            raise ModelLoadError(f"{label} {spec}: the adapter has only pickle weights (adapter_model.bin); "
                                 f"convert them to safetensors or pass --allow-pickle if you trust them")
        else:
            raise ModelLoadError(f"{label} {spec}: adapter_config.json but no adapter_model.safetensors; "
                                 f"is the adapter completely saved?")
    base = base_override or cfg.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{label} {spec}: adapter_config.json names no base model; pass --base-model PATH")
    base_path = Path(base).expanduser()
    beside = folder / base_path  # a relative base recorded next to the adapter, e.g. "../base"
    if not (base_path / "config.json").is_file() and not base_path.is_absolute() and (beside / "config.json").is_file():
        base_path = beside
    if not base_path.is_dir() and (not HUB_ID.match(base) or _hub_file(base, "config.json") is None):
        hint = "" if base_override else " or pass --base-model PATH"
        raise ModelLoadError(f"{label} {spec}: its base model '{base}' cannot be found (no such folder, and "
                             f"not in the local hub cache while offline); download it{hint}")
    return Checkpoint(spec=spec, kind="adapter", path=str(folder.resolve()),
                      base=str(base_path.resolve()) if base_path.is_dir() else base, pickle_weights=pickled)


@dataclass(frozen=True)
class ModelPlan:
    """What to load: candidates share one base when they are adapters; the reference is either that
    base with the adapters switched off (``reference is None``) or a checkpoint of its own."""

    candidates: tuple[Checkpoint, ...]
    reference: Checkpoint | None
    base: str | None

    def describe_reference(self) -> str:
        return f"{self.base} (adapter disabled)" if self.reference is None else self.reference.spec


def plan_models(models: tuple[str, ...], reference: str | None, base_override: str | None,
                allow_pickle: bool, need_reference: bool = True) -> ModelPlan:
    if not models:
        raise ModelLoadError("no --model given; pass --model PATH (a LoRA adapter or model folder)")
    candidates = tuple(resolve(m, "--model", base_override, allow_pickle) for m in models)
    kinds = {c.kind for c in candidates}
    if len(kinds) > 1:
        raise ModelLoadError("--model mixes LoRA adapters and full models; check them in separate runs")
    base = None
    if kinds == {"adapter"}:
        bases = sorted({c.base for c in candidates if c.base})
        if len(bases) > 1:
            raise ModelLoadError(f"--model adapters have different bases ({', '.join(bases)}); check them in "
                                 f"separate runs, or pass --base-model if they really share one")
        base = bases[0]
        if Path(base).is_dir():
            _check_full_weights(Path(base), f"base model {base}", allow_pickle)
    ref = resolve(reference, "--reference", base_override, allow_pickle) if reference else None
    if ref is None and base is None and need_reference:
        raise ModelLoadError(f"--model {models[0]} is a full model, so there is no adapter to switch off: "
                             f"pass --reference PATH (the model before fine-tuning)")
    return ModelPlan(candidates=candidates, reference=ref, base=base)


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
_HASH_CHUNK = 1 << 22


def has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_source(plan: ModelPlan, variant: str) -> str:
    """The folder (or hub id) whose tokenizer a variant uses: the adapter's own, else its base's."""
    if plan.base is not None and (variant != "reference" or plan.reference is None):
        folders = [c.path for c in plan.candidates[:1] if has_tokenizer(c.path)]
        return folders[0] if folders else plan.base
    ckpt = plan.reference if variant == "reference" else plan.candidates[int(variant.split(":")[1])]
    if ckpt.kind == "adapter" and not has_tokenizer(ckpt.path):
        return ckpt.base
    return ckpt.path


def weights_source(plan: ModelPlan, variant: str) -> tuple[str, str]:
    """The folder (or hub id) whose weights and config.json a variant runs on, and how to name it: the shared
    base of the adapters (also for the reference they switch off), an adapter checkpoint's base, or a full
    model itself."""
    if plan.base is not None and (variant != "reference" or plan.reference is None):
        return plan.base, f"base model {plan.base}"
    ckpt = plan.reference if variant == "reference" else plan.candidates[int(variant.split(":")[1])]
    if ckpt.kind == "adapter":
        return ckpt.base, f"base model {ckpt.base}"
    return ckpt.path, ckpt.spec


def model_config(source: str) -> dict | None:
    """A model's config.json as plain data, from its folder or the local hub cache; None when it cannot be
    read (loading the model then says why)."""
    path = Path(source) / "config.json" if Path(source).is_dir() else _hub_file(source, "config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path is not None else None
    except (OSError, ValueError, RecursionError):
        return None
    return config if isinstance(config, dict) else None


def file_sha256(path: Path, cache: dict[tuple[str, int, int], str] | None = None) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so large weights are read once."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if cache is not None and key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    if cache is not None:
        cache[key] = digest.hexdigest()
    return digest.hexdigest()


def source_fingerprint(source: str, cache: dict | None = None) -> str:
    """What a model folder holds (every file's name and sha256), or a hub id with its cached revision."""
    folder = Path(source)
    if not folder.is_dir():
        config = _hub_file(source, "config.json")  # from the local cache when offline
        revision = config.parent.name if config is not None and config.parent.parent.name == "snapshots" else "?"
        return f"hub:{source}@{revision}"
    parts = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() not in (".md", ".txt"):
            parts.append(f"{path.name}:{file_sha256(path, cache)}")
    snapshot = folder.parent.name if folder.parent.name == "snapshots" else ""
    return hashlib.sha256("\n".join([snapshot, *parts]).encode()).hexdigest()


TOKENIZER_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "chat_template", "vocab", "merges",
                      "spiece", "sentencepiece")


def tokenizer_fingerprint(source: str, cache: dict | None = None) -> str:
    """The tokenizer files alone (not the weights beside them), so a new adapter that ships the base's
    tokenizer does not change the reference's identity."""
    folder = Path(source)
    if not folder.is_dir():
        return source_fingerprint(source, cache)
    parts = [f"{p.name}:{file_sha256(p, cache)}" for p in sorted(folder.iterdir())
             if p.is_file() and p.name.startswith(TOKENIZER_PREFIXES)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def variant_fingerprint(plan: ModelPlan, variant: str, cache: dict | None = None) -> str:
    """Identity of the weights and tokenizer that produce a variant's answers."""
    ckpt = plan.reference if variant == "reference" else plan.candidates[int(variant.split(":")[1])]
    if ckpt is not None and ckpt.kind == "served":  # weights out of reach: the server's word for them
        return hashlib.sha256(f"served\n{ckpt.identity}".encode()).hexdigest()
    if plan.base is not None and (variant != "reference" or plan.reference is None):
        weights = [f"base={source_fingerprint(plan.base, cache)}"]
        if variant != "reference":
            weights.append(f"adapter={source_fingerprint(ckpt.path, cache)}")
    else:
        weights = [f"{ckpt.kind}={source_fingerprint(ckpt.path, cache)}"]
        if ckpt.kind == "adapter":
            weights.append(f"base={source_fingerprint(ckpt.base, cache)}")
    weights.append(f"tokenizer={tokenizer_fingerprint(tokenizer_source(plan, variant), cache)}")
    return hashlib.sha256("\n".join(weights).encode()).hexdigest()
