"""One configuration story for every job: the library's dataclasses, filled from YAML and flags.

The dataclasses stay where their code lives and are the single source of truth, defaults included
(the reference recipe's): `ExtractConfig` (raycap.features) with its `EncoderConfig`
(raycap.models.encoder_config), `TrainJobConfig` (raycap.train) with `DecoderConfig` (raycap.models.decoders)
and `TrainConfig` (raycap.recipe), `EvaluateConfig` (raycap.evaluate), `DemoConfig` (raycap.demo),
`BulkConfig` (raycap.bulk). This module only fills them, so it imports none of them (and no Ray):

* a YAML file holds one section per job, keyed by field name, nested like the dataclasses
  (configs/coco.yaml: `extract`, `train`, `evaluate`, `bulk`);
* each field says how the command line sets it: `flag("--name", default, help=...)` gives it one
  flag (and `at_least=`/`above=`/`at_most=` its range, checked by `from_dict` and `check_bounds`),
  `nested(Factory)` offers a nested dataclass's flags, `file_only(default)` none;
* `JobParser` derives a job's flags from its dataclass and gives `--config FILE.yaml`: the file's
  section becomes the flags' defaults, explicit flags win. Precedence: reference defaults < YAML <
  flags. File-only fields are set from YAML alone. It also gives `--s3-endpoint URL`, process
  configuration rather than a field: parsing makes it the process's S3 endpoint
  (`raycap.storage.set_endpoint`) before an s3:// --config is read, and `raycap.runtime.init_ray`
  hands it to the job's Ray workers;
* `from_dict` builds a (nested) dataclass with type checks and errors naming the key
  ("unknown key 'lr_decy' in section train.train; known: ...");
* `print_config` prints the resolved section at job start as YAML, secrets redacted: the printout
  is itself a valid section to paste into a config file;
* `run_job` runs a job's `main`: a user error ends it with one line "error: ..." and exit 1, an
  unexpected one with its traceback (RAYCAP_TRACEBACK=1 shows tracebacks for all).

Serving is configured apart, in serve_config.yaml, because that file is Ray Serve's own format
(`ServeDeploySchema`, for `serve run`/`serve deploy`): its raycap parts are pydantic models in
raycap.serve, validated when the config is loaded: `AppArgs` (the application's `args`: request
limits) and `EncoderSettings`/`DecoderSettings` (each deployment's `user_config`: the checkpoint,
batching, the Encoder's bfloat16 on CPU). The checkpoint is the one setting shared with the other
jobs: train writes it, evaluate and serve read it, and the encoder config (arch, weights, grid,
image size) always comes from the checkpoint, never from serve settings, so a model is served with
the encoder it was trained on.
`jobs/serve.py --checkpoint` swaps the checkpoint without editing the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
import traceback
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, NoReturn, TypeVar

import yaml

T = TypeVar("T")

# Environment variables whose values never appear in printed configs.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAYCAP_API_TOKEN")
REDACTED = "***"
# Keys whose string values are secrets: ...secret..., ...token..., passwords, credentials, ...key.
_SECRET_KEY = re.compile(r"secret|token|passw|credential|(^|_)key$|apikey", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?<=://)([^/@:\s]+):([^/@\s]+)@")  # scheme://user:password@host
# Errors a user can act on from the message alone: bad values, missing or unreadable files,
# storage and network failures (their messages name the path or endpoint).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
VERBOSE_ENV = "RAYCAP_VERBOSE"  # set by --verbose: raycap.runtime then shows Ray's own logs in the output


class ConfigError(ValueError):
    """A config file or section that does not fit its dataclass; the message names the key."""


# --- building dataclasses from dicts -------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _known(names: Sequence[str], key: str) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; known: {', '.join(names)}"


def _convert(value: Any, tp: Any, where: str) -> Any:
    """`value` checked against (and lightly converted to) the type hint `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arm, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return origin(_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, value_tp = args or (Any, Any)
        return {_convert(k, key_tp, where): _convert(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        # YAML 1.1 (PyYAML) reads 4e-4 as a string: it wants a dot, as in 4.0e-4.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is Path and isinstance(value, str):
        return Path(value)
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return value
    return value  # a hint this module does not check (e.g. a TypeVar)


def from_dict(cls: type[T], data: Mapping[str, Any], section: str = "") -> T:
    """A `cls` dataclass from `data` (nested dataclasses from nested mappings), type-checked.

    Missing keys take the dataclass defaults; unknown keys, wrong types and the dataclass's own
    validation errors raise ConfigError naming the section and key (`section` prefixes the names).
    """
    where = section or cls.__name__
    if not isinstance(data, Mapping):
        raise ConfigError(f"section {where}: expected a mapping of {cls.__name__} fields, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown key {key!r} in section {where}{_known(list(fields), str(key))}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{where}.{name}")
            problem = _out_of_bounds(f, kwargs[name])
            if problem:
                raise ConfigError(f"{f.metadata[_FLAG]['name']} ({where}.{name}) {problem}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing key {name!r} in section {where}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"section {where}: {e}") from e


def _out_of_bounds(f: dataclasses.Field, value: Any) -> str | None:
    bounds = f.metadata.get(_BOUNDS)
    return bounds.problem(value) if bounds is not None and isinstance(value, (int, float)) else None


def check_bounds(config: Any) -> None:
    """ValueError naming the first field of the dataclass instance `config` outside its `flag` bounds;
    configs call it from __post_init__, so one built in Python is checked as one built from flags."""
    for f in dataclasses.fields(config):
        problem = _out_of_bounds(f, getattr(config, f.name))
        if problem:
            raise ValueError(f"{f.name} ({f.metadata[_FLAG]['name']}) {problem}")


# --- YAML files ----------------------------------------------------------------------------------


def load_yaml(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """A YAML config file (a local path or s3:// URI), or its `section` (an empty one gives {})."""
    path = str(path)
    if path.startswith("s3://"):
        from raycap import storage  # boto3 and pyarrow, only when needed

        text = storage.read_bytes(path).decode("utf-8")
    else:
        try:
            text = Path(path).expanduser().read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected sections (a mapping) at the top, got {type(data).__name__}")
    if section is None:
        return data
    if section not in data:
        raise ConfigError(f"config file {path} has no section {section!r}; its sections: {', '.join(map(str, data))}")
    content = data[section] or {}
    if not isinstance(content, dict):
        raise ConfigError(f"config file {path}: section {section!r} must be a mapping, got {content!r}")
    return content


def _nested_dataclass(tp: Any) -> type | None:
    """The dataclass in a hint like `EncoderConfig` or `EncoderConfig | None`, else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def flatten(cls: type | None, data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys for `data`, descending into mappings given for nested dataclass fields of `cls`:
    {"encoder": {"arch": "x"}} -> {"encoder.arch": "x"}. Other values (and unknown keys) are leaves."""
    hints = typing.get_type_hints(cls) if cls is not None else {}
    out = {}
    for key, value in data.items():
        inner = _nested_dataclass(hints.get(key))
        if inner is not None and isinstance(value, Mapping):
            out.update(flatten(inner, value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def unflatten(flat: Mapping[str, Any], section: str = "") -> dict[str, Any]:
    """The inverse of `flatten`: {"encoder.arch": "x"} -> {"encoder": {"arch": "x"}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                where = ".".join([section, *parents[: i + 1]]).strip(".")
                raise ConfigError(f"{where}: expected a mapping, got {node!r}")
        node[leaf] = value
    return out


# --- command lines -------------------------------------------------------------------------------

_FLAG, _NESTED, _FILE_ONLY = "raycap.flag", "raycap.nested", "raycap.file_only"  # field metadata keys
_KINDS = {_FLAG: "flag", _NESTED: "nested", _FILE_ONLY: "file_only"}
_BOUNDS = "raycap.bounds"  # a numeric field's range, checked by from_dict


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The values a numeric field accepts: >= at_least, > above, <= at_most (None: no limit)."""

    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None

    def problem(self, value: float) -> str | None:
        """What is wrong with `value` ("must be >= 1, got 0"), or None if it is in range."""
        for limit, ok, word in (
            (self.at_least, lambda v, x: v >= x, ">="),
            (self.above, lambda v, x: v > x, ">"),
            (self.at_most, lambda v, x: v <= x, "<="),
        ):
            if limit is not None and not ok(value, limit):
                return f"must be {word} {limit:g}, got {value!r}"
        return None


def flag(
    name: str,
    default: Any = dataclasses.MISSING,
    *,
    help: str | None = None,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    **argparse_kwargs: Any,
) -> Any:
    """A dataclass field that the job's command line sets with the flag `name` ("--num-workers").

    The field's type gives argparse's `type`, `nargs` (tuples), `choices` (Literal) and `action`
    (bools: store_true when False by default, --x/--no-x otherwise); `argparse_kwargs` add to them
    (choices, metavar, action="append"), and `one_of="group"` puts the flag in a required either-or
    group. A field without a default gets a required flag (the --config file may give it instead).
    `at_least`, `above` and `at_most` bound a number: from_dict refuses a value outside them, from
    flags or a file alike, naming the flag, before the job does any work.
    """
    metadata: dict[str, Any] = {_FLAG: {"name": name, "help": help, **argparse_kwargs}}
    if (at_least, above, at_most) != (None, None, None):
        metadata[_BOUNDS] = Bounds(at_least, above, at_most)
    return dataclasses.field(default=default, metadata=metadata)


def nested(default_factory: Callable[[], Any]) -> Any:
    """A nested dataclass field whose own fields' flags are the job's (dest `field.inner`)."""
    return dataclasses.field(default_factory=default_factory, metadata={_NESTED: True})


def file_only(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A field deliberately without a flag: set from the --config file's section alone."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_FILE_ONLY: True})


def flag_kind(f: dataclasses.Field) -> str | None:
    """How the command line treats a field: "flag", "nested" (its own fields' flags), "file_only",
    or None when its dataclass does not say (a dataclass that is no job's config)."""
    return next((kind for key, kind in _KINDS.items() if key in f.metadata), None)


def _default(f: dataclasses.Field, parent: Any) -> Any:
    """The field's default: the parent default's value (a nested field's), else the field's own."""
    if parent is not None:
        return getattr(parent, f.name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _type_kwargs(tp: Any, default: Any, spec: Mapping[str, Any]) -> dict[str, Any]:
    """add_argument keywords that the type hint `tp` implies, where `spec` (the field's) does not say."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None: an optional X
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return {"action": "store_true" if default is False else argparse.BooleanOptionalAction}
    if origin is typing.Literal:
        return {"choices": list(args)}
    if origin in (tuple, list):
        item = args[0] if args else str
        many = {} if "action" in spec else {"nargs": "+"}
        return {**many, **({"type": item} if item in (int, float) else {})}
    return {"type": tp} if tp in (int, float) else {}


def _shows_default(action: argparse.Action) -> bool:
    return bool(action.option_strings) and not action.required and action.default not in (None, argparse.SUPPRESS)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the job's docstring as written and shows each flag's default (the reference's, or
    the --config file's when --config comes before --help)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if not _shows_default(action) or "%(default)" in (action.help or ""):
            return action.help
        return f"{action.help} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse as every raycap command uses it: defaults shown in --help, abbreviations refused, and
    a usage error is one line, "error: ...", exit status 1, like every other user error of a job."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (`{self.prog} --help` lists every flag)", file=sys.stderr, flush=True)
        sys.exit(1)


class JobParser(Parser, Generic[T]):
    """An ArgumentParser whose flags come from the job's dataclass `cls`, with `--config FILE.yaml`
    (whose `section` gives the flags' defaults), `--s3-endpoint URL` and `--verbose` (VERBOSE_ENV).

    Each field made with `flag` is one flag, its `dest` the field's dotted path (`num_encoders`,
    `encoder.arch` for a `nested` field's), so flag names stay short and the YAML keys are the
    field names. `overrides` changes a flag's add_argument keywords by dest, for a job that takes
    more than its dataclass does (train's `--model both`). Required flags stop being required when
    the file gives their value. Parsing adjusts the parser to the file, so build one parser per
    parse; it also applies --s3-endpoint to the process. Abbreviated flags are refused (`--epoch` is
    not `--epochs`). Without a `section` there is no --config (jobs/serve.py has its own).
    """

    def __init__(
        self,
        description: str | None,
        section: str | None,
        cls: type[T] | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(description=description, **kwargs)
        self.section, self.cls = section, cls
        if section is not None:
            self.add_argument(
                "--config",
                metavar="FILE.yaml",
                help=f"YAML file (or s3:// URI) whose '{section}:' section sets defaults; flags override it",
            )
        self.add_argument(
            "--s3-endpoint",
            metavar="URL",
            help="S3-compatible server for every s3:// URI of the job, --config and Ray workers included "
            "(default: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else AWS)",
        )
        self.add_argument(
            "--verbose", action="store_true", dest="show_ray_logs",
            help="also show Ray's own logs, warnings and progress bars (always in Ray's log files, "
            "/tmp/ray/session_latest/logs)",
        )
        self._own = {a.dest for a in self._actions}  # help, config, s3_endpoint, show_ray_logs: not fields
        if cls is not None:
            overrides = {k: dict(v) for k, v in (overrides or {}).items()}
            self._add_flags(cls, "", None, overrides, {})
            if overrides:
                raise ValueError(f"{cls.__name__} has no flag for the overrides of {', '.join(overrides)}")

    def _add_flags(
        self, cls: type, prefix: str, parent: Any, overrides: dict[str, dict[str, Any]], groups: dict[str, Any]
    ) -> None:
        """One flag per `flag` field of `cls`, descending into `nested` fields (`parent`: their
        default, whose values are the nested flags' defaults)."""
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            dest, default = prefix + f.name, _default(f, parent)
            kind = flag_kind(f)
            if kind == "nested":
                self._add_flags(hints[f.name], f"{dest}.", default, overrides, groups)
            if kind != "flag":
                continue
            spec = {k: v for k, v in f.metadata[_FLAG].items() if k != "name"}
            kwargs = {**_type_kwargs(hints[f.name], default, spec), **spec, **overrides.pop(dest, {})}
            one_of = kwargs.pop("one_of", None)
            if default is dataclasses.MISSING:
                kwargs["required"] = one_of is None
            else:
                kwargs.setdefault("default", list(default) if isinstance(default, tuple) else default)
            if one_of is not None and one_of not in groups:
                groups[one_of] = self.add_mutually_exclusive_group(required=True)
            target = groups[one_of] if one_of is not None else self
            target.add_argument(f.metadata[_FLAG]["name"], dest=dest, **kwargs)

    def parse_values(self, argv: Sequence[str] | None = None) -> dict[str, Any]:
        """The resolved section as nested dicts: reference defaults < YAML < explicit flags.

        Repeatable (append) flags replace the file's list, and a flag of a mutually exclusive group
        replaces the file's value for every member of that group.
        """
        argv = list(sys.argv[1:] if argv is None else argv)
        pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        pre.add_argument("--s3-endpoint")
        pre.add_argument("--verbose", action="store_true")
        if self.section is not None:
            pre.add_argument("--config")
        process = pre.parse_known_args(argv)[0]
        if process.verbose:
            os.environ[VERBOSE_ENV] = "1"
        if process.s3_endpoint:
            from raycap import storage  # boto3 and pyarrow, only when needed

            storage.set_endpoint(process.s3_endpoint)
        config_file = getattr(process, "config", None)
        from_file = flatten(self.cls, load_yaml(config_file, self.section)) if config_file else {}

        # argparse keeps its actions and groups in private lists; they are stable since Python 3.2.
        actions = [a for a in self._actions if a.dest not in self._own]
        groups = [g._group_actions for g in self._mutually_exclusive_groups]
        defaults = {a.dest: a.default for a in actions}  # the reference's, before the file's replace them
        for action in actions:
            if action.dest in from_file:
                action.default, action.required = from_file[action.dest], False
            if "." in action.dest and action.metavar is None and action.choices is None and action.option_strings:
                action.metavar = action.dest.rsplit(".", 1)[-1].upper()
            if action.help is None and _shows_default(action):  # argparse prints no line without help
                action.help = "default: %(default)s"
        for group, members in zip(self._mutually_exclusive_groups, groups):
            if any(a.dest in from_file for a in members):
                group.required = False
        # argparse leaves attributes already on the namespace alone, so starting from None (which
        # append and count actions also take for empty) the flags given are those not None.
        parsed = self.parse_args(argv, argparse.Namespace(**{a.dest: None for a in actions}))
        given = {a.dest: getattr(parsed, a.dest) for a in actions if getattr(parsed, a.dest) is not None}
        for members in groups:
            if any(a.dest in given for a in members):
                for a in members:
                    from_file.pop(a.dest, None)
        return unflatten({**defaults, **from_file, **given}, self.section or "")

    def parse_config(self, argv: Sequence[str] | None = None) -> T:
        """The job's dataclass from defaults < YAML < flags (every flag's dest must be a field)."""
        if self.cls is None:
            raise TypeError("parse_config needs the parser's dataclass: JobParser(..., cls=...)")
        return from_dict(self.cls, self.parse_values(argv), self.section or "")


# --- printing ------------------------------------------------------------------------------------


def to_plain(value: Any) -> Any:
    """Dataclasses, pydantic models, tuples and paths as YAML-safe dicts, lists and strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "model_dump"):  # pydantic (serve settings)
        return to_plain(value.model_dump(mode="json"))
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def redact(value: Any, key: str = "") -> Any:
    """`value` with secrets replaced by ***: string values of secret-like keys, passwords in URLs,
    and the values of SECRET_ENV wherever they appear."""
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if not isinstance(value, str) or not value:
        return value
    if _SECRET_KEY.search(key):
        return REDACTED
    for name in SECRET_ENV:
        secret = os.environ.get(name)
        if secret:
            value = value.replace(secret, REDACTED)
    return _URL_PASSWORD.sub(rf"\1:{REDACTED}@", value)


def format_config(section: str, cfg: Any) -> str:
    """`cfg` (a dataclass, pydantic model or dict) as a YAML `section:`, secrets redacted."""
    return yaml.safe_dump({section: redact(to_plain(cfg))}, sort_keys=False, default_flow_style=False)


def print_config(section: str, cfg: Any) -> str:
    """Print the resolved config at job start (a valid config-file section) and return the text."""
    text = format_config(section, cfg)
    print(f"[raycap] config:\n{text}", end="", flush=True)
    return text


# --- running jobs --------------------------------------------------------------------------------


def _root_cause(error: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (RayTaskError keeps it as `cause`)."""
    while isinstance(getattr(error, "cause", None), BaseException):
        error = error.cause  # type: ignore[attr-defined]
    return error


def run_job(main: Callable[[], object]) -> NoReturn:
    """Run a job's `main()` and exit: 0 on success, 1 on failure, 130 on Ctrl-C.

    User errors (USER_ERRORS: bad values, missing files, denied access) print one line,
    "error: <message>", to stderr; anything else prints its traceback (as do all errors with
    RAYCAP_TRACEBACK=1). Usage errors (`Parser.error`) end the same way, before main runs.
    """
    try:
        main()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the job's last line of defence
        cause = _root_cause(e)
        if isinstance(cause, USER_ERRORS) and not os.environ.get("RAYCAP_TRACEBACK"):
            print(f"error: {cause}", file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
            print(f"error: {type(cause).__name__}: {cause}", file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(0)
