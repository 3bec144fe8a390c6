"""PEFT's adapter folder (adapter_config.json beside adapter_model.safetensors), read and
written as untrusted files: the config found and opened as a checkpoint's files are, the
weights' real path inside the folder (see :mod:`transferops._safetensors`), pickled
``adapter_model.bin`` never read, and the output written through
:class:`transferops._outdir.OutputFolder` (nothing half-written is left)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ._outdir import OutputFolder
from ._safetensors import CheckpointError, _allowed_roots, _shard_path, read_small, strict_json, write_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_CONFIG_LIMIT = 16 << 20
# LoRA config fields that add tensors or change a module's rank, scaling or forward, with the
# value that means "off": an adapter with any other value is refused.
LORA_OFF = {"use_dora": False, "lora_bias": False, "bias": "none", "rank_pattern": {}, "alpha_pattern": {},
            "modules_to_save": None, "trainable_token_indices": None, "target_parameters": None,
            "layer_replication": None, "use_qalora": False, "use_bdlora": None, "arrow_config": None}


def read_adapter_folder(folder) -> tuple[object, Path, Path]:
    """(the parsed config, the config's path, the weights' real path) of adapter folder
    ``folder``; a CheckpointError naming the file where one is missing or unsafe."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (expected a PEFT adapter folder with {CONFIG_FILE} and "
                              f"{WEIGHTS_FILE})")
    config_path = folder / CONFIG_FILE
    if not os.path.lexists(config_path):
        raise CheckpointError(f"{config_path}: missing; a PEFT adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    raw = read_small(folder, CONFIG_FILE, "the adapter config", _CONFIG_LIMIT)
    config = strict_json(raw, config_path, "the adapter config")
    weights_path = folder / WEIGHTS_FILE
    if not os.path.lexists(weights_path):
        pickled = " (adapter_model.bin is a pickle, which is not read: it can run code)" \
            if os.path.lexists(folder / "adapter_model.bin") else ""
        raise CheckpointError(f"{weights_path}: missing{pickled}; save the adapter with safe_serialization=True")
    return config, config_path, _shard_path(folder, WEIGHTS_FILE, _allowed_roots(folder), str(folder))


def write_adapter_folder(output: OutputFolder, tensors: dict[str, torch.Tensor], config: dict) -> list[Path]:
    """``tensors`` and ``config`` as PEFT's two files in ``output``, committed; the paths."""
    with output.create(WEIGHTS_FILE) as f:
        write_safetensors(f, tensors)
    with output.create(CONFIG_FILE) as f:
        f.write(json.dumps(config, indent=2, sort_keys=True).encode() + b"\n")
    return output.commit([WEIGHTS_FILE, CONFIG_FILE])
