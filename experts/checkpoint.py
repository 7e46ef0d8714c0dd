"""Checkpoints: a directory with safetensors weights, the config as JSON, the tokenizer and a
format version. Written atomically, loaded without unpickling anything.

Layout of a checkpoint directory::

    meta.json          {"format_version": 1, "kind": "lm", "config": {...}, "files": {name: sha256}, ...}
    model.safetensors  the weights
    tokenizer.json     the tokenizer (optional)
    <other>.safetensors / .json   extra state (optimizer, RNG, data position) for training resume

``meta.json`` is written last and lists every file with its SHA-256, so a directory with a
missing, truncated or corrupt file is refused with an error naming the file.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from experts.atomic import atomic_dir, recover_dir, sha256_file

FORMAT_VERSION = 1
META = "meta.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt or does not match what the caller expects."""


# ---- save / load -----------------------------------------------------------------------------
def save_checkpoint(
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    *,
    config: Mapping[str, Any],
    kind: str = "lm",
    tokenizer_file: str | Path | None = None,
    extra_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    extra_json: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write a checkpoint directory and return its path.

    ``state_dict`` goes to ``model.safetensors`` (tied weights are stored once);
    ``extra_tensors[name]`` to ``name.safetensors`` and ``extra_json[name]`` to ``name.json``.
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file(_dedupe_tied(state_dict), str(tmp / WEIGHTS))
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER)
        for name, tensors in (extra_tensors or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                      str(tmp / f"{name}.safetensors"))
        for name, obj in (extra_json or {}).items():
            (tmp / f"{name}.json").write_text(json.dumps(obj, indent=2, sort_keys=True))
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        body = {"format_version": FORMAT_VERSION, "kind": kind, "config": dict(config),
                "files": files, **dict(meta or {})}
        (tmp / META).write_text(json.dumps(body, indent=2, sort_keys=True))
    return path


def _dedupe_tied(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: keep the first name of each tied tensor."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            continue
        seen[key] = k
        out[k] = v.detach().contiguous().cpu()
    return out


def read_meta(path: str | Path, *, kind: str | None = None, verify: bool = True) -> dict[str, Any]:
    """Read and check ``meta.json``: format version, kind, and (with ``verify``) file hashes."""
    path = Path(path)
    meta_path = path / META
    if not path.exists():
        recover_dir(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (it does not exist or is a file)")
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: missing; {path} is not a complete hmoe checkpoint")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: corrupt JSON ({e})") from e
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format_version {version!r}, this hmoe reads {FORMAT_VERSION}")
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{meta_path}: kind {meta.get('kind')!r}, expected {kind!r}")
    if verify:
        for name, digest in meta.get("files", {}).items():
            f = path / name
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in {META} but missing")
            if sha256_file(f) != digest:
                raise CheckpointError(f"{f}: content does not match its SHA-256 in {META} "
                                      "(truncated or corrupt); restore it or retrain")
    return meta


def load_tensors(path: str | Path, name: str = WEIGHTS, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load one safetensors file of a checkpoint, with errors that name the file."""
    f = Path(path) / name
    if not f.is_file():
        raise CheckpointError(f"{f}: missing")
    try:
        return load_file(str(f), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f}: cannot be read as safetensors ({e}); it is truncated or corrupt") from e


def load_state_into(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], *, source: str | Path) -> None:
    """Load ``tensors`` into ``module`` strictly (tied weights may be absent), naming ``source`` on mismatch."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors and not _is_tied_alias(module, k, tensors)]
    unexpected = [k for k in tensors if k not in expected]
    bad_shape = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                 for k, v in tensors.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or bad_shape:
        raise CheckpointError(f"{source}: weights do not match the config: missing={missing[:5]} "
                              f"unexpected={unexpected[:5]} shape={bad_shape[:5]}")
    module.load_state_dict(dict(tensors), strict=False)


def _is_tied_alias(module: torch.nn.Module, key: str, tensors: Mapping[str, torch.Tensor]) -> bool:
    """True if ``key`` shares storage with a parameter that is present in ``tensors``."""
    params = dict(module.state_dict(keep_vars=True))
    ptr = params[key].data_ptr()
    return any(k in tensors for k, v in params.items() if k != key and v.data_ptr() == ptr)


def load_model(path: str | Path, *, kind: str, config_from_dict: Callable[[dict], Any],
               build: Callable[[Any], torch.nn.Module], device: str | torch.device = "cpu",
               verify: bool = True) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Load a checkpoint of ``kind``: config from ``meta.json``, weights strictly; eval mode."""
    meta = read_meta(path, kind=kind, verify=verify)
    try:
        config = config_from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(path) / META}: invalid {kind} config ({e})") from e
    model = build(config)
    load_state_into(model, load_tensors(path, device="cpu"), source=Path(path) / WEIGHTS)
    return model.to(device).eval(), config, meta


def load_lm(path: str | Path, *, device: str | torch.device = "cpu", verify: bool = True):
    """Load an LM checkpoint: returns ``(model, config, meta)``; the model is in eval mode."""
    from experts.config import ModelConfig
    from experts.model import Transformer

    return load_model(path, kind="lm", config_from_dict=ModelConfig.from_dict, build=Transformer,
                      device=device, verify=verify)


def save_lm(path: str | Path, model: torch.nn.Module, config: Any, *,
            tokenizer_file: str | Path | None = None, **kw: Any) -> Path:
    """Save an LM (``experts.model.Transformer``) with its ``ModelConfig``."""
    return save_checkpoint(path, model.state_dict(), config=config.to_dict(), kind="lm",
                           tokenizer_file=tokenizer_file, **kw)
