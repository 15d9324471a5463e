"""Command-line options derived from the pydantic settings models: one declaration of each option.

A field of PipelineSettings (or PredictionSettings...) becomes `--field-name`; its type gives the parser's
type, its `Literal` the choices, its description the help, its default the shown default. Only the flags a
user gives reach the model (argparse.SUPPRESS), so pydantic's defaults and validation are the only ones.
`transfer-flow run`, `demo`, `compare`, `predict`, `serve` and the UI form all read the same fields.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Collection
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

# Presentation only: how a value is written on the command line where the type alone says too little.
METAVARS = {
    "backbone": "NAME",
    "weights": "imagenet|none|PATH",
    "dask_address": "tcp://HOST:PORT",
    "output": "DIR",
    "refresh": "STAGE",
}
SHORT_FLAGS = {"output": "-o"}
TYPE_METAVARS = {int: "N", float: "F", str: "VALUE"}


def flag(name: str) -> str:
    """The command-line spelling of a settings field: `image_size` → `--image-size`."""
    return "--" + name.replace("_", "-")


def _unwrap_optional(annotation: Any) -> Any:
    """`int | None` → int (an empty value means "the default"); other annotations unchanged."""
    if get_origin(annotation) in (Union, types.UnionType):
        present = [a for a in get_args(annotation) if a is not type(None)]
        if len(present) == 1:
            return present[0]
    return annotation


def _help(field: FieldInfo, shown_default: Any) -> str:
    text = (field.description or "").rstrip(".").replace("%", "%%")
    if shown_default not in (None, [], False):
        text += f" (default: {shown_default})"
    return text


def add_settings_options(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    *,
    exclude: Collection[str] = (),
    metavars: dict[str, str] | None = None,
) -> None:
    """Add one flag per field of `model` (except `exclude`, which the command declares itself)."""
    metavars = {**METAVARS, **(metavars or {})}
    fields = sorted(model.model_fields.items(), key=lambda item: not item[1].is_required())  # required first
    for name, field in fields:
        if name in exclude:
            continue
        annotation = _unwrap_optional(field.annotation)
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": _help(field, default)}
        if field.is_required():
            kwargs["required"] = True
        if annotation is bool:
            kwargs["action"] = "store_true"
        elif get_origin(annotation) is list:
            (item,) = get_args(annotation)
            kwargs["action"] = "append"
            kwargs["help"] += "; repeatable"
            if get_origin(item) is Literal:
                kwargs["choices"] = get_args(item)
            else:
                kwargs["type"] = item
            kwargs["metavar"] = metavars.get(name, TYPE_METAVARS.get(item, "VALUE"))
        elif get_origin(annotation) is Literal:
            kwargs["choices"] = get_args(annotation)
            if name in metavars:  # a long list of choices reads better in the help text than in the usage line
                kwargs["metavar"] = metavars[name]
                kwargs["help"] = f"{kwargs['help']}; one of {', '.join(kwargs['choices'])}"
        else:
            kwargs["type"] = annotation
            kwargs["metavar"] = metavars.get(name, TYPE_METAVARS.get(annotation, "VALUE"))
        flags = [flag(name), *([SHORT_FLAGS[name]] if name in SHORT_FLAGS else [])]
        parser.add_argument(*flags, **kwargs)


def given_settings(args: argparse.Namespace, model: type[BaseModel], **fixed: Any) -> dict[str, Any]:
    """The fields of `model` that the command line set (plus `fixed`), for `model.model_validate`."""
    return {**{k: v for k, v in vars(args).items() if k in model.model_fields}, **fixed}


# What a pipeline command does not take as a flag: the dataset is positional; `wait` and `overwrite` are
# declared per command (`serve` runs unattended and always waits; `demo` writes only its own folder).
PIPELINE_POSITIONAL = {"dataset"}


def add_pipeline_options(parser: argparse.ArgumentParser, *, exclude: Collection[str] = ()) -> None:
    """The pipeline's options (every field of PipelineSettings but the dataset) on a command."""
    from transfer_flow.flows.settings import PipelineSettings

    add_settings_options(parser, PipelineSettings, exclude={*PIPELINE_POSITIONAL, *exclude})
