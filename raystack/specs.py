"""Typed specs from YAML files plus flag overrides (litgpt-style): unknown keys and wrong types are
refused with the key's name, so a typo in a config never silently falls back to a default."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

from .errors import UserError
from .outputs import shown


#: the most of anything a spec or flag may ask to draw, sample or allocate (trials, samples, images)
MAX_COUNT = 100_000


def _check_type(name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # a section of a spec: its own spec
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise UserError(f"{name}: expected a mapping, got {shown(value)}")
        return build_spec(hint, value, source=name)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        sections = [a for a in args if isinstance(a, type) and dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and sections:  # a mapping can only be the section: its own errors are the clear ones
            return _check_type(name, value, sections[0])
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(name, value, a)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{name}: wrong type")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        return [_check_type(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{name}: expected a mapping, got {type(value).__name__}")
        return value
    if hint is dict and not isinstance(value, dict):
        raise UserError(f"{name}: expected a mapping, got {shown(value)}")
    if hint is list and not isinstance(value, list):
        raise UserError(f"{name}: expected a list, got {shown(value)}")
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise UserError(f"{name}: expected a path, got {type(value).__name__} {shown(value)}")
        from .outputs import check_local_path

        check_local_path(value, name)
        return Path(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{name}: expected true or false, got {shown(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{name}: expected an integer, got {shown(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{name}: expected a number, got {shown(value)}")
        if not math.isfinite(value):
            raise UserError(f"{name} {value}: must be a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f"{name}: expected a string, got {shown(value)}")
        return value
    return value


def check_finite_fields(spec) -> None:
    """Every float field of a spec must be a finite number: NaN passes `x > 0`-style checks and inf makes an
    optimizer write NaN into the weights, so neither may reach a run (named by its flag)."""
    for f in dataclasses.fields(spec):
        v = getattr(spec, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"--{f.name.replace('_', '-')} {v}: must be a finite number")


def build_spec(cls, values: dict, source: str = "spec"):
    """`cls(**values)` with every key known and every value of its field's type."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{source}: unknown key {shown(unknown[0])!r} (known: {', '.join(sorted(known))})")
    required = sorted(f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
                      and f.default_factory is dataclasses.MISSING and f.name not in values)
    if required:
        if source == "flags":
            raise UserError(f"--{required[0].replace('_', '-')} is required")
        raise UserError(f"{source}: missing key {required[0]!r}")
    def where(k: str) -> str:  # a flag is named as the user typed it
        return f"--{k.replace('_', '-')}" if source == "flags" else f"{source}: {k}"

    checked = {k: _check_type(where(k), v, hints[k]) for k, v in values.items()}
    return cls(**checked)


#: A spec or space file is a few kilobytes; these bounds stop a small file (YAML aliases) from expanding into
#: an object that eats the machine when it is copied, compared or printed.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000


def check_expanded_size(data, where: str) -> None:
    """Count the nodes of `data` as if every alias were expanded; refuse past MAX_YAML_NODES (stops early)."""
    count, stack = 0, [data]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise UserError(f"{where}: expands to more than {MAX_YAML_NODES} values (YAML aliases?); refused")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def read_yaml(path: Path, flag: str = "--config") -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {shown(str(path))}: no such file")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise UserError(f"{flag} {shown(str(path))}: larger than {MAX_YAML_BYTES // 1024} KiB; not a spec file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8", errors="replace"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{flag} {shown(str(path))}: not valid YAML{where}") from None
    if data is None:
        return {}
    check_expanded_size(data, f"{flag} {path}")
    if not isinstance(data, dict):
        raise UserError(f"{flag} {shown(str(path))}: expected a mapping of keys to values at the top level")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def apply_overrides(values: dict, overrides: list[str], flag: str = "--set") -> dict:
    """A copy of `values` with dotted `KEY.SUB=VALUE` overrides applied (VALUE read as YAML: 1, 0.3, [a, b])."""
    import copy

    import yaml

    out = copy.deepcopy(values)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} {shown(item)}: expected KEY=VALUE, e.g. harden.seed=1")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise UserError(f"{flag} {shown(item)}: the value is not valid YAML") from None
        check_expanded_size(value, f"{flag} {shown(item)}")
        *parents, leaf = [k.strip().replace("-", "_") for k in key.split(".")]
        node = out
        for k in parents:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise UserError(f"{flag} {shown(item)}: {k} is not a mapping")
            node = nxt
        node[leaf] = value
    return out


def spec_to_dict(spec) -> dict:
    """A spec as plain YAML/JSON values (paths as strings): the one way a spec is serialised; `build_spec`
    (with its checks) is the one way back."""
    out = {}
    for f in dataclasses.fields(spec):
        v = getattr(spec, f.name)
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, (list, tuple)):
            v = [str(x) if isinstance(x, Path) else x for x in v]
        out[f.name] = v
    return out


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field (for --help texts and the YAML headers)."""
    import ast
    import inspect

    src = inspect.getsource(cls)
    tree = ast.parse(src)
    docs: dict[str, str] = {}
    body = tree.body[0].body
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(getattr(b, "value", None), ast.Constant):
            docs[a.target.id] = str(b.value.value).strip()
    return docs


def _optional_of(hint):
    """`X | None` / `Optional[X]` -> X; anything else unchanged."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


#: a `# Title ---` line in a spec's class body starts a section: the fields below it share a --help panel
_SECTION_LINE = re.compile(r"^\s*#\s*(?P<title>[^-\s#][^#]*?)\s*-{3,}\s*$")
FIRST_PANEL = "Options"


def field_sections(cls) -> dict[str, str]:
    """The section of each field: the title of the last `# Title ---` line above it in the class body
    (fields above any such line: FIRST_PANEL). The CLI groups the flags in one help panel per section."""
    import ast
    import inspect

    lines = inspect.getsource(cls).splitlines()
    marks = [(i + 1, m.group("title")) for i, line in enumerate(lines) if (m := _SECTION_LINE.match(line))]
    out = {}
    for node in ast.parse("\n".join(lines)).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above = [title for line, title in marks if line < node.lineno]
            out[node.target.id] = above[-1] if above else FIRST_PANEL
    return out


def field_default(f: dataclasses.Field):
    """A field's default value (a factory's product), or None when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def shown_default(value) -> str:
    """How --help shows a default: ` [default: VALUE]` as a flag takes it; nothing for an empty or unset one
    (whose help text says what happens)."""
    if value is None or value == [] or value == {}:
        return ""
    if isinstance(value, bool):
        value = "on" if value else "off"
    return f" \\[default: {value}]"  # escaped: the help text is rich markup


def cli_options(cls, skip: tuple = (), sections: tuple | None = None, overrides: dict | None = None) -> list:
    """One Typer option per field of the spec dataclass `cls`, configuration written once (litgpt-style): the
    flag is the field's name with dashes (a boolean's `--x/--no-x`; or its `metadata["flag"]`), the help text is
    the docstring under the field, the panel its section (`field_sections`), the default shown is the field's.
    The option's own default is None (unset: the config file's value or the field's default). `sections`: only
    the fields of these sections; `overrides`: {field: {"help": ..., "default": ...}} for one command."""
    import inspect
    from typing import Optional

    import typer

    docs = field_docs(cls)
    panels = field_sections(cls)
    hints = typing.get_type_hints(cls)
    overrides = overrides or {}
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip or (sections is not None and panels.get(f.name) not in sections):
            continue
        hint = _optional_of(hints[f.name])
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # e.g. a path or a URI: the spec checks it
            hint = str
        elif typing.get_origin(hint) is list and any(typing.get_origin(a) in (typing.Union, types.UnionType)
                                                     for a in typing.get_args(hint)):
            hint = list[str]
        dashed = f.name.replace("_", "-")
        decl = f.metadata.get("flag") or (f"--{dashed}/--no-{dashed}" if hint is bool else f"--{dashed}")
        own = overrides.get(f.name, {})
        default = own["default"] if "default" in own else field_default(f)
        help_text = " ".join(own.get("help", docs.get(f.name, "")).split()) + shown_default(default)
        out.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[hint],
                                     default=typer.Option(None, decl, help=help_text, show_default=False,
                                                          rich_help_panel=panels.get(f.name, FIRST_PANEL))))
    return out


def spec_options(cls, skip: tuple = (), sections: tuple | None = None, overrides: dict | None = None):
    """Decorator for a command `def cmd(own options..., **flags)`: its signature becomes its own options plus
    `cli_options(cls, ...)`; the flags the user gave arrive in `flags` (None where not given)."""
    import inspect

    def deco(fn):
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        fn.__signature__ = sig.replace(parameters=own + cli_options(cls, skip, sections, overrides))
        return fn

    return deco


def spec_from_cli(cls, config: Path | None, flags: dict, flag: str = "--config"):
    """The spec from `--config` (YAML keys = the flags) with the flags given on the command line on top."""
    values = read_yaml(config, flag) if config else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    return build_spec(cls, values, source=str(config) if config else "flags")
