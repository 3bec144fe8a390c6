"""The files beside the weights that make a merged checkpoint a model folder that loads:
config.json and generation_config.json from the base, the tokenizer's files from the base or
``tokenizer_source``, a model card (README.md) naming the method, its arguments and inputs, and
the config that produced the merge (mergekit_config.yml). Source folders are as untrusted as
the checkpoints: files must resolve inside them (see :mod:`transferops._safetensors`)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ._safetensors import CheckpointError, read_small, strict_json

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")
MAX_FILE = 1 << 28  # the largest tokenizer.json files are tens of MB
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.float64: "float64"}


def _read(folder: Path, name: str) -> bytes | None:
    """File ``name`` of ``folder``, if there is one, read as an untrusted checkpoint's file."""
    return read_small(folder, name, name, MAX_FILE) if os.path.lexists(folder / name) else None


def _model_config(raw: bytes, path: Path, dtype: torch.dtype | None) -> bytes:
    """config.json with its dtype entry set to the written weights' dtype."""
    config = strict_json(raw, path, "the model config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if dtype in DTYPE_NAMES:
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = DTYPE_NAMES[dtype]
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def _card(method: str, args: dict, base: str, models: list[str], config_text: str | None) -> bytes:
    from . import __version__

    lines = ["---", "library_name: transformers", "tags:", "- merge", "- transferops", "---", "",
             f"# {method} merge", "", f"Merged with transferops {__version__}, method `{method}`.", "",
             f"- base: `{base}`", *[f"- model: `{m}`" for m in models], "", "Arguments:", "", "```json",
             json.dumps(args, indent=2, sort_keys=True), "```", ""]
    if config_text is not None:
        lines += ["The config that produced it (also in mergekit_config.yml):", "", "```yaml", config_text.rstrip(),
                  "```", ""]
    return "\n".join(lines).encode()


def write(folder, base: Path, tokenizer_source: Path | None, dtype: torch.dtype | None, method: str, args: dict,
          models: list[str], config_text: str | None) -> list[str]:
    """Stage the model files of a merge into ``folder`` (an OutputFolder); returns their names.
    Config files come from ``base`` when it is a folder, tokenizer files from
    ``tokenizer_source`` (default: ``base``)."""
    files: dict[str, bytes] = {}
    if base.is_dir():
        for name in CONFIG_FILES:
            raw = _read(base, name)
            if raw is not None:
                files[name] = _model_config(raw, base / name, dtype) if name == "config.json" else raw
    source = base if tokenizer_source is None else tokenizer_source
    if source.is_dir():
        for name in TOKENIZER_FILES:
            raw = _read(source, name)
            if raw is not None:
                files[name] = raw
    elif tokenizer_source is not None:
        raise CheckpointError(f"tokenizer_source {tokenizer_source}: not a folder")
    files["README.md"] = _card(method, args, str(base), models, config_text)
    if config_text is not None:
        files["mergekit_config.yml"] = config_text.encode()
    for name, raw in files.items():
        with folder.create(name) as f:
            f.write(raw)
    return list(files)
