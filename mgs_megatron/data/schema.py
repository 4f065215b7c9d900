"""Prompt-row schema and validation.

A row (jsonl line, parquet row, or `datasets` row) must have:
  - `prompt` (non-empty str) OR `messages` (non-empty list of {"role": str, "content": str}, roles in
    system/user/assistant/tool); if both are given, `messages` wins;
  - `domain` (non-empty str), unless the source sets a default domain;
  - the domain's ground-truth fields (DOMAIN_FIELDS; register more with `register_domain_fields`):
      math: `answer` (str or number);
      if:   `instruction_id_list` (list[str]) and `kwargs` (list of dict/None, same length), every id known to the
            IFEval checkers and its kwargs the ones its checker takes (rewards/ifeval.py `check_instruction`);
      chat: nothing.
  - optional `id` (str/int); extra fields are kept and reach the reward as `sample`.
Errors are `DataValidationError`s naming file, row (1-based; for jsonl the line number) and field (or only the
file, for a file-level problem: unsupported type, no rows).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

_ROLES = {"system", "user", "assistant", "tool"}
log = logging.getLogger(__name__)


class DataValidationError(ValueError):
    def __init__(self, file: str, row: Optional[int], field_name: Optional[str], message: str):
        self.file, self.row, self.field = file, row, field_name
        where = f"row {row}: field '{field_name}': " if row is not None else ""
        super().__init__(f"{file}: {where}{message}")


@dataclass
class PromptSample:
    uid: str                      # "<file>:<row>" unless the row has an `id`
    domain: str
    prompt: str | None
    messages: list[dict] | None
    fields: dict = field(default_factory=dict)   # the whole row (ground truth and extras)

    def as_messages(self) -> list[dict]:
        return [dict(m) for m in self.messages] if self.messages else [{"role": "user", "content": self.prompt}]


def _is_str(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != ""


def _check_answer(row: dict, err: Callable[[str, str], Exception]) -> None:
    v = row.get("answer")
    if v is None or (isinstance(v, str) and not v.strip()) or not isinstance(v, (str, int, float)) \
            or isinstance(v, bool):
        raise err("answer", "required for domain 'math': a non-empty string or a number")


def _check_if(row: dict, err: Callable[[str, str], Exception]) -> None:
    ids = row.get("instruction_id_list")
    if not isinstance(ids, (list, tuple)) or not ids or not all(_is_str(x) for x in ids):
        raise err("instruction_id_list", "required for domain 'if': a non-empty list of instruction ids")
    kw = row.get("kwargs")
    if not isinstance(kw, (list, tuple)) or len(kw) != len(ids):
        raise err("kwargs", f"required for domain 'if': a list of {len(ids)} dicts (one per instruction)")
    for j, k in enumerate(kw):
        if k is not None and not isinstance(k, dict):
            raise err("kwargs", f"item {j} is {type(k).__name__}, expected a dict or null")
    check = _instruction_checker()
    if check is None:
        return
    prompt = row.get("prompt") if isinstance(row.get("prompt"), str) else next(
        (m.get("content", "") for m in reversed(row.get("messages") or []) if isinstance(m, dict)
         and m.get("role") == "user"), "")
    for j, (iid, k) in enumerate(zip(ids, kw)):
        try:
            check(iid, k, prompt)
        except KeyError as e:
            raise err("instruction_id_list", f"item {j}: {e.args[0]}") from None
        except ValueError as e:
            raise err("kwargs", f"item {j}: {e}") from None


_CHECKER: list = []


def _instruction_checker() -> Optional[Callable[[str, Any, str], None]]:
    """rewards.ifeval.check_instruction, or None (warned once) where the IFEval checkers cannot be imported."""
    if not _CHECKER:
        try:
            from mgs_megatron.rewards.ifeval import check_instruction, load_ifeval

            load_ifeval()
            _CHECKER.append(check_instruction)
        except ImportError as e:
            log.warning("IF rows' instruction ids are not checked: the IFEval checkers do not import (%s)", e)
            _CHECKER.append(None)
    return _CHECKER[0]


DOMAIN_FIELDS: dict[str, Callable[[dict, Callable[[str, str], Exception]], None]] = {
    "math": _check_answer, "if": _check_if, "chat": lambda row, err: None}


def register_domain_fields(domain: str, check: Callable[[dict, Callable[[str, str], Exception]], None]) -> None:
    """`check(row, err)` raises `err(field, message)` for a bad row of `domain`."""
    DOMAIN_FIELDS[domain] = check


def validate_row(row: Any, file: str, row_no: int, default_domain: str | None = None,
                 strict_domains: bool = False) -> PromptSample:
    """Validate one row -> PromptSample. Unknown domains pass (no ground-truth check) unless strict_domains."""
    def err(fld: str, msg: str) -> DataValidationError:
        return DataValidationError(file, row_no, fld, msg)

    if not isinstance(row, dict):
        raise err("<row>", f"expected an object, got {type(row).__name__}")
    domain = row.get("domain", default_domain)
    if domain is None and default_domain is not None:
        domain = default_domain
    if not _is_str(domain):
        raise err("domain", "required: a non-empty string")
    messages = row.get("messages")
    prompt = row.get("prompt")
    if messages is not None:
        if not isinstance(messages, (list, tuple)) or not messages:
            raise err("messages", "a non-empty list of {role, content}")
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise err("messages", f"item {j} must be {{'role': one of {sorted(_ROLES)}, 'content': str}}")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif not _is_str(prompt):
        raise err("prompt", "required (a non-empty string) unless 'messages' is given")
    check = DOMAIN_FIELDS.get(domain)
    if check is None and strict_domains:
        raise err("domain", f"unknown domain {domain!r}; known: {sorted(DOMAIN_FIELDS)}")
    if check is not None:
        check(row, err)
    uid = str(row["id"]) if row.get("id") is not None else f"{file}:{row_no}"
    fields = dict(row)
    fields["domain"] = domain
    return PromptSample(uid, domain, prompt if messages is None else None, messages, fields)
