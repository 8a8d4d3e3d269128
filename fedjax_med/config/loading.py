"""Loads config files, applies ``--config.a.b=value`` overrides and validates.

A config file defines ``get_config()`` or ``get_config(arg)`` returning a ``ConfigDict``;
``path/to/file.py:arg`` passes ``arg`` (e.g. ``configs/quickstart.py:tiny``), and a built-in
name (a module of ``fedjax_med/configs``) stands for its file (``quickstart:tiny``). Override
values are parsed by the type of the field they replace, so ``--config.train.steps=10`` is an int
and ``--config.data.name=medmnist`` a string.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.machinery
import importlib.util
import inspect
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections

from fedjax_med.config import base, schema

OVERRIDE_PREFIX = "--config."
# The built-in configs: files of the fedjax_med.configs package, found by path (not imported), so
# the config layer imports nothing above it and an installed wheel needs no checkout.
BUILTIN_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def builtin_configs() -> dict[str, str]:
    """Built-in config name -> the first line of its docstring, sorted by name.

    Examples:
      >>> "quickstart" in builtin_configs()
      True
    """
    names = {}
    for path in sorted(BUILTIN_DIR.glob("[!_]*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        names[path.stem] = doc.strip().splitlines()[0] if doc.strip() else ""
    return names


def resolve_config_path(path: str) -> str:
    """``path`` if it is a file, else the built-in config named ``path`` (``quickstart``)."""
    if os.path.isfile(path):
        return path
    builtin = BUILTIN_DIR / f"{path}.py"
    if os.sep not in path and "/" not in path and builtin.is_file():
        return str(builtin)
    raise schema.ConfigError(
        f"config file '{path}' does not exist and is no built-in config "
        f"(built-in: {', '.join(builtin_configs())})"
    )


def parse_arg(arg: str, allowed: Sequence[str], config_file: str) -> frozenset[str]:
    """The options of ``FILE.py:ARG``: ``ARG`` is a comma-separated subset of ``allowed``.

    Every ``configs/*.py`` reads its variant through this one helper, so ``dp_sgd.py:patient,tiny``
    combines two variants and an unknown one fails naming the allowed values.

    Examples:
      >>> sorted(parse_arg("ddp,tiny", ("ddp", "tiny"), "configs/secagg_fedavg.py"))
      ['ddp', 'tiny']
      >>> parse_arg("", ("tiny",), "configs/fedavg.py")
      frozenset()
    """
    options = frozenset(a.strip() for a in arg.split(",") if a.strip())
    unknown = sorted(options - set(allowed))
    if unknown:
        raise ValueError(
            f"{config_file}: unknown argument {unknown[0]!r} (allowed: a comma-separated subset "
            f"of {tuple(allowed)})"
        )
    return options


@contextlib.contextmanager
def _config_file_errors(path: str):
    """Turns any error raised while running the user's config file into one naming the file."""
    try:
        yield
    except schema.ConfigError:
        raise
    except Exception as err:  # the file is user code: any error is the user's to fix
        raise schema.ConfigError(f"config file '{path}': {type(err).__name__}: {err}") from err


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Imports ``file.py[:arg]`` or ``name[:arg]`` (a built-in) and returns its ``get_config(...)``.

    A path that exists wins over a built-in name; the config is not yet validated.
    """
    path, _, arg = spec.partition(":")
    path = resolve_config_path(path)
    loader = importlib.machinery.SourceFileLoader("fedjax_med_user_config", path)  # any suffix
    module_spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(module_spec)
    with _config_file_errors(path):
        module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise schema.ConfigError(f"config file '{path}' must define get_config()")
    if arg and not inspect.signature(module.get_config).parameters:
        raise schema.ConfigError(
            f"config file '{path}': get_config() takes no argument, but ':{arg}' was given"
        )
    with _config_file_errors(path):
        config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise schema.ConfigError(
            f"get_config() in '{path}' must return an ml_collections.ConfigDict"
        )
    return config


def parse_value(text: str, default: Any, path: str) -> Any:
    """Parses ``text`` into the type of ``default`` (the field's current value)."""
    try:
        if isinstance(default, bool):
            lowered = text.lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, str):
            return text
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        kind = type(default).__name__
        raise schema.ConfigError(
            f"override --config.{path}={text!r} is not a valid {kind}"
        ) from None


def parse_free_value(text: str) -> Any:
    """Values under free-form sections: Python literals, else the plain string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Sequence[str]
) -> ml_collections.ConfigDict:
    """Applies ``--config.a.b=value`` strings in order; unknown fields are errors."""
    known = schema.known_fields()
    for item in overrides:
        if not item.startswith(OVERRIDE_PREFIX) or "=" not in item:
            raise schema.ConfigError(f"override {item!r} must look like --config.FIELD=VALUE")
        path, _, text = item[len(OVERRIDE_PREFIX) :].partition("=")
        free = next((f for f in schema.FREE_FORM if path.startswith(f + ".")), None)
        if path in schema.REPLACED_FIELDS:
            raise schema.ConfigError(
                f"config field '{path}' was replaced: {schema.REPLACED_FIELDS[path]}"
            )
        if free is None and path not in known:
            raise schema.ConfigError(
                f"unknown config field '{path}' in override{schema.suggest(path, known)}"
            )
        *parents, leaf = path.split(".")
        node = config
        for depth, name in enumerate(parents):
            if name not in node and free is not None and depth >= free.count("."):
                node[name] = ml_collections.ConfigDict()  # free-form sections grow on demand
            node = node[name]
        if free is not None:
            value = parse_free_value(text)
        else:
            value = parse_value(text, node[leaf] if leaf in node else known[path], path)
        with node.ignore_type():
            node[leaf] = value
    return config


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads, overrides and validates a config; the result is locked (no new keys)."""
    config = apply_overrides(load_config_file(spec), overrides)
    schema.validate(config)
    config.lock()
    return config


def to_json_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A plain JSON-serialisable dict of the resolved config."""
    return json.loads(config.to_json())


# Fields an earlier version kept elsewhere: old path -> (section, field) of the current config.
_MOVED_FIELDS = {
    ("federated", "secure_aggregation"): ("secure_aggregation", "method"),
    ("federated", "secagg_clip"): ("secure_aggregation", "clip"),
    ("federated", "secagg_dropout_rate"): ("secure_aggregation", "dropout_rate"),
    ("federated", "secagg_corrupted_fraction"): ("secure_aggregation", "corrupted_fraction"),
    ("federated", "distributed_dp"): ("secure_aggregation", "distributed_dp"),
}


def _upgraded(data: dict[str, Any]) -> dict[str, Any]:
    """A config saved by an earlier version in today's layout: moved fields in their new place,
    fields added since at their defaults (so the run's own values are kept, never changed)."""
    data = json.loads(json.dumps(data))
    # Replaced by Bell et al.'s parameters; an old run's value has no place in today's config.
    data.get("federated", {}).pop("secagg_threshold", None)
    for (section, name), (new_section, new_name) in _MOVED_FIELDS.items():
        if name in data.get(section, {}):
            data.setdefault(new_section, {})[new_name] = data[section].pop(name)

    def fill(saved, defaults):
        for key, value in defaults.items():
            if key not in saved:
                saved[key] = value
            elif isinstance(value, dict) and isinstance(saved[key], dict) and value:
                fill(saved[key], value)

    fill(data, to_json_dict(base.get_base_config()))
    return data


def from_json_dict(data: dict[str, Any]) -> ml_collections.ConfigDict:
    """Rebuilds and validates a config saved with :func:`to_json_dict` (by this or an earlier
    version: see :func:`_upgraded`)."""
    config = ml_collections.ConfigDict(_upgraded(data))
    schema.validate(config)
    config.lock()
    return config
