"""Prompt sources: local jsonl, parquet, or a `datasets` save_to_disk directory (or a directory of jsonl /
parquet files). Every row is validated (schema.py) at load time, so a bad file fails before training starts."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .schema import DataValidationError, PromptSample, validate_row


@dataclass
class SourceConfig:
    path: str
    domain: str | None = None       # default domain for rows without one
    max_rows: int | None = None     # keep only the first max_rows valid rows


def _iter_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataValidationError(str(path), line_no, "<json>", f"invalid JSON: {e.msg}") from None


def _iter_parquet(path: Path) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq
    for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield i, row


def _iter_hf_disk(path: Path) -> Iterator[tuple[int, object]]:
    from datasets import load_from_disk
    ds = load_from_disk(str(path))
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # DatasetDict: take the 'train' split
        ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
    for i, row in enumerate(ds, start=1):
        yield i, row


def _files(path: Path) -> list[tuple[Path, callable]]:
    if path.is_file():
        if path.suffix in (".jsonl", ".json"):
            return [(path, _iter_jsonl)]
        if path.suffix == ".parquet":
            return [(path, _iter_parquet)]
        raise ValueError(f"{path}: unsupported file type (want .jsonl, .parquet or a datasets directory)")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() \
                or (path / "state.json").exists():
            return [(path, _iter_hf_disk)]
        found = sorted(path.glob("*.jsonl")) + sorted(path.glob("*.parquet"))
        if found:
            return [x for p in found for x in _files(p)]
    raise FileNotFoundError(f"no prompt data at {path}")


def load_source(src: SourceConfig | str) -> list[PromptSample]:
    src = SourceConfig(src) if isinstance(src, str) else src
    out: list[PromptSample] = []
    for file, reader in _files(Path(src.path)):
        for row_no, row in reader(file):
            out.append(validate_row(row, str(file), row_no, src.domain))
            if src.max_rows is not None and len(out) >= src.max_rows:
                return out
    return out


def load_sources(sources: list[SourceConfig | str]) -> dict[str, list[PromptSample]]:
    """-> {domain: samples in file order}."""
    by_domain: dict[str, list[PromptSample]] = {}
    for s in sources:
        for p in load_source(s):
            by_domain.setdefault(p.domain, []).append(p)
    return by_domain
