"""Typed configs: YAML in, `--set a.b=c` overrides, one-line errors naming the bad key, YAML out next to every run.

Every config is a pydantic model with `extra="forbid"`, so a misspelt key is an error, not a silent default.
A job's run options (`Options`: prepare's, the batch jobs') are pydantic too, checked when they are built.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from genart.errors import UserError, one_line

C = TypeVar("C", bound=BaseModel)


def _number_not_bool(annotation: Any) -> bool:
    """Whether a field of this type takes an int or float and no bool (`int`, `float | None`, `int | tuple[...]`)."""
    kinds = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    return bool({int, float} & set(kinds)) and bool not in kinds


class Section(BaseModel):
    """Base of every config section: unknown keys are rejected, values are validated on assignment."""

    # coerce_numbers_to_str: `name: 2024` (YAML or --set) is the text "2024" for a str key, not a type error.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), coerce_numbers_to_str=True)
    # Keys renamed since configs and checkpoints were written, old name -> field: the old name still loads.
    renamed: ClassVar[dict[str, str]] = {}
    # Keys a resume may change: they name where something came from (a file the checkpoint holds a copy of), not
    # what shapes the weights, so a moved dataset can still be resumed.
    resume_free: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def current_keys(cls, data: Any) -> Any:
        """`data` with renamed keys under today's names (with both names the later key wins, as a `--set` override
        is added after the YAML's keys), and no bool where a number goes."""
        if not isinstance(data, dict):
            return data
        out = {}
        for key, value in data.items():
            key = cls.renamed.get(key, key)
            field = cls.model_fields.get(key)
            # `max_steps: true` is a slip, not 1 step (pydantic's lax mode takes a bool for a number): handed on as
            # the text it was written as, it fails as any other text would, under its own key
            if isinstance(value, bool) and field is not None and _number_not_bool(field.annotation):
                value = str(value).lower()
            out[key] = value
        return out


@dataclass(frozen=True)
class Rule:
    """An `Options` field's one-line error when its value breaks the field's constraint or validator; `{value}` is
    the value given. Annotated beside the constraint: `Annotated[int, Field(ge=1), Rule("--num {value}: ...")]`."""

    message: str


class Options(BaseModel):
    """Base of a job's options (how `genart prepare` or a batch job runs), built from CLI flags or by code.

    Each rule is declared once, as its field's constraint or validator, and checked when the options are built:
    a broken one is a UserError of one line (the field's Rule), so the CLI prints it and exits 2 before any work.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **values: Any):
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise UserError(type(self)._explain(exc.errors()[0])) from None

    @classmethod
    def _explain(cls, err: dict) -> str:
        name = str(err["loc"][0]) if err["loc"] else ""
        field = cls.model_fields.get(name)
        rule = next((m for m in field.metadata if isinstance(m, Rule)), None) if field else None
        if rule is not None:
            return rule.message.format(value=err.get("input"))
        where = f"{cls.__name__}.{name}" if name else cls.__name__
        if err["type"] == "extra_forbidden":
            return f"{where}: unknown option"
        return f"{where}: {err['msg']} (got {err.get('input')!r})"


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], value). Lists and mappings (`[1, 2]`, `{a: 1}`) are read as YAML; a scalar is
    read as YAML only where that gives back what was typed (`3`, `0.5`, `true`, `null`), and otherwise stays the
    text, which pydantic converts for a number or bool key and a str key keeps as written."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_steps=100")
    path, text = key.strip().split("."), raw.strip()
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return path, text
    if isinstance(value, (list, dict)):  # only in flow style: `photos: 2023` and `- a` are text someone typed
        return path, value if text[0] in "[{" else text
    return path, value if _typed_as_read(value, text) else text


def _typed_as_read(value: Any, text: str) -> bool:
    """Whether YAML's reading of a scalar is the plain one a user means. PyYAML reads YAML 1.1, where yes/no/on/off
    are booleans and 0755 (octal: 493), 1:30 (90), 1_000 and 0x1F are numbers; ` #` starts a comment (`my pics #2`
    -> `my pics`), `&a` is an anchor, 2024-01-02 a date, and 2024.10 the float 2024.1 (a str key got "2024.1")."""
    if value is None:
        return text in ("null", "Null", "NULL", "~")
    if isinstance(value, bool):
        return text.lower() in ("true", "false")
    if isinstance(value, int):
        digits = text.lstrip("+-")
        return digits.isdigit() and (len(digits) == 1 or digits[0] != "0")
    if isinstance(value, float):
        return repr(value) == text.lstrip("+") or repr(value) == text
    if isinstance(value, str):  # quotes force a string: run.name="'0755'"
        return value == text or (len(text) >= 2 and text[0] in "'\"" and text[-1] == text[0])
    return False  # dates, timestamps, binary: the text

def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Apply `--set` overrides to a plain dict, creating intermediate sections as needed."""
    for item in overrides:
        set_key(data, *parse_override(item))
    return data


def set_key(data: dict, path: list[str], value: Any) -> dict:
    """data[path[0]][path[1]]... = value, creating intermediate sections as needed (what one `--set` does)."""
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping from a local file; a missing or malformed file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({one_line(exc, with_type=False)})") from None
    except (OSError, UnicodeDecodeError) as exc:  # e.g. a checkpoint or an image passed for the config
        raise UserError(f"{path}: cannot be read as a YAML text file ({one_line(exc)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config sections at the top level")
    return data


def validate(cls: type[C], data: dict, source: str = "config") -> C:
    """Build `cls` from a dict, turning pydantic's report into one line that names the first bad key."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = _user_key(err, data)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
            # a whole section's input (a rule across its keys) would print every key: the message names the keys
            msg = f"{msg} (got {err['input']!r})"
        more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise UserError(f"{source}: {loc + ': ' if loc else ''}{msg}{more}") from None


# pydantic's names for the member types of a union it tried: int, str, tuple[int, int], function-after[...]
_TYPE_TAG = re.compile(r"^(int|float|str|bool|none|dict|list|[a-z-]+\[.*\])$")


def _user_key(err: dict, data: Any) -> str:
    """The error's key as the user wrote it: pydantic's location walked through the data, leaving out the parts it
    adds, a union's member tag ('dcgan' in model.dcgan.lr) and, below a plain value, the member type it tried
    ('int' in scaling.num_workers.int). A key that is not in the data (missing, or written under an old name) stays."""
    parts, node, walking = [], data, True
    for part in err["loc"]:
        if not walking:
            parts.append(str(part))
        elif isinstance(node, dict):
            if part in node:
                parts.append(str(part))
                node = node[part]
            elif node.get("family") != part and not _TYPE_TAG.match(str(part)):  # a union's tag, or the type it
                parts.append(str(part))  # tried for a mapping given where a number goes ({a: 1}: 'int')
                walking = False
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            parts.append(str(part))
            node = node[part]
    return ".".join(parts)


def load(cls: type[C], path: str | Path | None = None, overrides: Iterable[str] = (), base: dict | None = None) -> C:
    """Load a config: `base` dict, then the YAML file, then `--set` overrides, validated as `cls`."""
    data: dict = dict(base or {})
    if path is not None:
        data = _deep_merge(data, read_yaml(path))
    overrides = list(overrides)
    data = apply_overrides(data, overrides)
    source = str(path) if path else "config"
    return validate(cls, data, source=f"{source} + --set" if overrides else source)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def to_yaml(cfg: BaseModel) -> str:
    """The resolved config as YAML, every default spelt out, for writing next to a run."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
