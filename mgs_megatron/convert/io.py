"""Files: atomic output directories, sharded safetensors reading / writing with an index json, HF side files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
# Files copied with a model: its config and everything a tokenizer / generation needs.
HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                 "chat_template.jinja", "chat_template.json")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `target`; rename it to `target` on success, delete it on any failure.

    Nothing appears at `target` unless the body finished (rename is atomic on one filesystem).
    """
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise FileExistsError(f"output {str(target)!r} already exists (pass overwrite=True / --overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():  # overwrite: move the old one aside first so a crash never leaves neither
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class SafetensorsDir:
    """Read-only view of a directory of safetensors shards (with or without an index json); lazy, mmap-backed."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = self.path / INDEX
        if index.exists():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in {str(self.path)!r}")
            self.weight_map = {}
            for f in files:
                with safe_open(self.path / f, "pt") as h:
                    self.weight_map.update({k: f for k in h.keys()})
        self._handles: dict[str, object] = {}

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} not found in {str(self.path)!r}")
        f = self.weight_map[name]
        if f not in self._handles:
            self._handles[f] = safe_open(self.path / f, "pt")
        return self._handles[f].get_tensor(name)

    def nbytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in set(self.weight_map.values()))


def write_sharded(out: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int = 2 << 30,
                  prefix: str = "model", metadata: dict | None = None) -> dict[str, str]:
    """Write (name, tensor) pairs into <prefix>-0000i-of-0000N.safetensors + the index json; returns weight_map."""
    shards: list[list[str]] = []
    buf: dict[str, torch.Tensor] = {}
    size, total = 0, 0
    tmp_names: list[str] = []
    seen: set[str] = set()

    def flush():
        nonlocal buf, size
        if buf:
            name = f".{prefix}-part{len(tmp_names):05d}.safetensors"
            save_file(buf, str(out / name), metadata={"format": "pt"})
            tmp_names.append(name)
            shards.append(list(buf))
            buf, size = {}, 0

    for name, t in tensors:
        if name in seen:
            raise ValueError(f"tensor {name!r} written twice")
        seen.add(name)
        nbytes = t.numel() * t.element_size()
        if buf and size + nbytes > max_shard_bytes:
            flush()
        buf[name] = t.contiguous()
        size += nbytes
        total += nbytes
    flush()
    weight_map = {}
    for i, (tmp, names) in enumerate(zip(tmp_names, shards)):
        final = f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(out / tmp, out / final)
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total, **(metadata or {})}, "weight_map": weight_map}
    (out / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return weight_map


def copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in HF_SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def read_config(path: Path) -> dict:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{str(cfg)!r} not found")
    return json.loads(cfg.read_text())
