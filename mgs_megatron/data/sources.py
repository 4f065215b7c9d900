"""Prompt sources: local jsonl, parquet, or a `datasets` save_to_disk directory (or a directory of jsonl /
parquet files). Every row is validated (schema.py) at load time, so a bad file fails before training starts; so
does a source with no rows at all, while an empty file among others is named in a warning."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .schema import DataValidationError, PromptSample, validate_row

log = logging.getLogger(__name__)


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
        raise DataValidationError(str(path), None, None, f"unsupported file type {path.suffix or '(none)'!r} (want "
                                  f".jsonl, .json, .parquet or a datasets directory)")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() \
                or (path / "state.json").exists():
            return [(path, _iter_hf_disk)]
        found = sorted(path.glob("*.jsonl")) + sorted(path.glob("*.parquet"))
        if found:
            return [x for p in found for x in _files(p)]
        raise DataValidationError(str(path), None, None, "a folder with no .jsonl or .parquet files (and not a "
                                  "datasets directory)")
    raise DataValidationError(str(path), None, None, "does not exist")


def _source(src) -> SourceConfig:
    if isinstance(src, SourceConfig):
        return src
    if isinstance(src, dict):
        try:
            return SourceConfig(**src)
        except TypeError as e:
            raise DataValidationError(str(src.get("path")), None, None, f"source entry {src!r}: {e}") from None
    return SourceConfig(str(src))


def _load(src: SourceConfig, empty: list[str]) -> list[PromptSample]:
    out: list[PromptSample] = []
    for file, reader in _files(Path(src.path)):
        n = len(out)
        for row_no, row in reader(file):
            out.append(validate_row(row, str(file), row_no, src.domain))
            if src.max_rows is not None and len(out) >= src.max_rows:
                return out
        if len(out) == n:
            empty.append(str(file))
    return out


def _load_all(sources: list) -> list[PromptSample]:
    empty: list[str] = []
    rows = [p for s in sources for p in _load(_source(s), empty)]
    if sources and not rows:
        raise DataValidationError(", ".join(empty) or str(sources), None, None, "no prompt rows (empty file)")
    for f in empty:
        log.warning("%s: no prompt rows (empty file); training on the other sources", f)
    return rows


def load_source(src: SourceConfig | dict | str) -> list[PromptSample]:
    """One source's validated rows; an empty file in it is named in a warning, a source without rows is an error."""
    return _load_all([src])


def load_sources(sources: list[SourceConfig | dict | str]) -> dict[str, list[PromptSample]]:
    """-> {domain: samples in file order}. No rows in any source: DataValidationError naming the empty files; an
    empty file among others: a warning naming it."""
    by_domain: dict[str, list[PromptSample]] = {}
    for p in _load_all(list(sources)):
        by_domain.setdefault(p.domain, []).append(p)
    return by_domain
