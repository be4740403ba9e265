"""The command line every job shares: ``[--config F] [section.key=value ...] [--summary-json PATH]
[--resume | --fresh] [--print-config]``, and ``--help`` listing every config section and key with its
comment from orchestration/config.py.

``load_job_config`` is where a job fails fast: a bad config, or (with the job's stages) anything the
preflight finds (launch.preflight), ends the job before Ray starts with every problem named, no traceback.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import logging
import os
import sys
import typing
from typing import Any

from pydantic import BaseModel

from orchestration import config as config_module
from orchestration.cluster import check_working_dir_outputs
from orchestration.config import Config, ConfigError, config_to_yaml, load_config


def _field_comments() -> dict[str, dict[str, str]]:
    """{section class name: {field: the comment lines just above it in config.py}}."""
    source = inspect.getsource(config_module)
    lines = source.splitlines()
    comments: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = comments.setdefault(node.name, {})
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                above, row = [], item.lineno - 2
                while row >= 0 and lines[row].strip().startswith("#"):
                    above.insert(0, lines[row].strip().lstrip("#").strip())
                    row -= 1
                fields[item.target.id] = " ".join(above)
    return comments


def _section_type(annotation) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def config_keys_help() -> str:
    """Every section and key of the config with its default and comment (the epilog of --help)."""
    comments = _field_comments()
    defaults = Config().model_dump(mode="json")
    out = ["configuration keys (section.key=value; defaults of the built-in config, presets override them):"]

    def walk(model: type[BaseModel], prefix: str, values: Any, depth: int) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            nested = _section_type(field.annotation)
            note = comments.get(model.__name__, {}).get(name, "")
            value = values.get(name) if isinstance(values, dict) else (None if field.is_required() else field.default)
            if nested is not None and typing.get_origin(field.annotation) is not dict:
                out.append(f"{'  ' * depth}{key}:" + (f"  # {note}" if note else ""))
                walk(nested, f"{key}.", value, depth + 1)
            else:
                shown = "(required)" if field.is_required() else json.dumps(value, default=str)
                out.append(f"{'  ' * depth}{key} = {shown}" + (f"  # {note}" if note else ""))

    walk(Config, "", defaults, 1)
    return "\n".join(out)


def job_parser(description: str, trains: bool = True) -> argparse.ArgumentParser:
    """Every job's command line: --config, section.key=value overrides, --print-config, --summary-json;
    with ``trains``, also --resume / --fresh (what a rerun of a run name does)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=config_keys_help())
    parser.add_argument("--config", default=None, help="YAML preset (default: jobs/configs/tiny.yaml)")
    parser.add_argument("--summary-json", default=None, metavar="PATH", help="write a JSON summary of the run here")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML (loadable with --config) and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    if not trains:
        return parser
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="rerunning a run_name with changed training settings: continue it with the new values")
    again.add_argument("--fresh", action="store_true",
                       help="rerunning a run_name: remove its checkpoints and start over (a new MLflow run)")
    return parser


SECRET_FIELDS = ("data.s3.access_key_id", "data.s3.secret_access_key")


def load_job_config(args, stages: tuple[str, ...] = ()) -> Config:
    """The job's config, loaded and checked; with ``stages``, also the preflight of those stages. Either
    failing ends the job here, before Ray starts, with every problem named (no traceback)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    secret_overrides = [o.split("=", 1)[0] for o in args.overrides if o.split("=", 1)[0] in SECRET_FIELDS]
    if secret_overrides:
        logging.getLogger(__name__).warning(
            "%s given on the command line: it stays in the process arguments (and in a `ray job submit`'s stored "
            "entrypoint); give credentials by the environment (AWS_ACCESS_KEY_ID, ...) or an instance profile",
            ", ".join(secret_overrides))
    try:
        config = load_config(args.config, args.overrides)
        check_working_dir_outputs(config)  # relative outputs inside `ray job submit`'s temporary copy
        if getattr(args, "print_config", False):
            sys.stdout.write(config_to_yaml(config))
            raise SystemExit(0)
        if stages:
            from orchestration.launch import preflight

            mode = "fresh" if getattr(args, "fresh", False) else "resume" if getattr(args, "resume", False) else "auto"
            preflight(config, stages, mode)
        return config
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None


def write_summary(path: str | None, summary: dict[str, Any]) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(summary, f, indent=1, default=str)
