"""Training state as safetensors + JSON (no pickles): RNG states, and nested state with tensors in it.

``rng_state`` / ``set_rng_state`` capture and restore the torch (and accelerator), numpy and Python
generators; ``split_tensors`` / ``join_tensors`` turn a nested dict/list holding tensors or numpy
arrays (a data iterator's position, an optimizer's state) into JSON with references plus a flat
dict of tensors, and back. The training loop's resume checkpoints are made of these.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"accel{i}"] = s
    rest = {"numpy": [np_kind, int(np_pos), int(np_has_gauss), float(np_gauss)],
            "python": [py_version, list(py_state), py_gauss]}
    return tensors, rest


def set_rng_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    accel = [tensors[k] for k in sorted(k for k in tensors if k.startswith("accel"))]
    if accel and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(accel)
    kind, pos, has_gauss, gauss = rest["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, py_gauss = rest["python"]
    random.setstate((version, tuple(state), py_gauss))


def split_tensors(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Replace tensors / arrays inside ``obj`` by ``{"__tensor__": key}`` references."""
    if isinstance(obj, torch.Tensor | np.ndarray):
        t = obj if isinstance(obj, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(obj))
        tensors[prefix or "_"] = t.detach().clone().contiguous().cpu()
        return {"__tensor__": prefix or "_", "__numpy__": isinstance(obj, np.ndarray)}
    if isinstance(obj, dict):
        return {str(k): split_tensors(v, tensors, f"{prefix}.{k}" if prefix else str(k)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [split_tensors(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        t = tensors[obj["__tensor__"]]
        return t.numpy() if obj.get("__numpy__") else t
    if isinstance(obj, dict):
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj
