"""Job files: one YAML file, validated before anything runs, with errors that name the file, the
field path and the bad value."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from recap.pipeline.stage import StageConfig, UnknownStage, available_stages, get_stage_class

SOURCE_STAGE = "download"


class JobError(ValueError):
    """A bad job file or --set value. str() is the full, user-facing message."""


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(..., description="URL list: txt, csv, tsv, json, jsonl or parquet (local path or fsspec URL)")
    format: str = Field("auto", description="auto (from the extension), txt, csv, tsv, json, jsonl, parquet")
    url_col: str = "url"
    caption_col: str | None = "caption"
    save_additional_columns: list[str] | None = Field(
        None, description="extra columns to keep; None keeps every other column (img2dataset keeps only those named)")
    max_caption_chars: int = Field(16384, ge=1, description="longer captions are truncated, with a ledger note")

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        allowed = {"auto", "txt", "csv", "tsv", "json", "jsonl", "parquet"}
        if v not in allowed:
            raise ValueError(f"must be one of {sorted(allowed)}")
        return v


class StageEntry(BaseModel):
    name: str
    config: StageConfig


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    name: str = "job"
    seed: int = 0
    input: InputSpec
    output: str
    download: dict[str, Any] = Field(default_factory=dict)
    stages: list[Any] = Field(default_factory=list)


class Job(BaseModel):
    """The resolved job: every stage config validated by its own model."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    name: str
    seed: int
    input: InputSpec
    output: str
    stages: list[StageEntry]  # the source stage (download) first
    source_file: str = "<job>"

    def resolved(self) -> dict:
        """The job as plain data, every default filled in (for the manifest)."""
        return {
            "name": self.name,
            "seed": self.seed,
            "input": self.input.model_dump(mode="json"),
            "output": self.output,
            "stages": [{e.name: e.config.model_dump(mode="json")} for e in self.stages],
        }


# -- --set overrides ------------------------------------------------------------------------------

def apply_set(data: dict, assignment: str, source: str) -> None:
    """Apply one ``a.b.c=value`` override; the value is YAML. Numeric parts index lists."""
    if "=" not in assignment:
        raise JobError(f"--set {assignment!r}: expected KEY=VALUE (e.g. download.timeout=5)")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise JobError(f"--set {key}: value {raw!r} is not valid YAML: {e}") from None
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise JobError(f"--set {assignment!r}: empty key")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = _child(node, part)
        if nxt is None:
            nxt = {}
            _assign(node, part, nxt, key)
        elif not isinstance(nxt, dict | list):
            raise JobError(f"--set {key}: {'.'.join(parts[: i + 1])} is {nxt!r}, not a mapping")
        node = nxt
    _assign(node, parts[-1], value, key)


def _child(node: Any, part: str) -> Any:
    if isinstance(node, list):
        idx = int(part) if part.lstrip("-").isdigit() else None
        return node[idx] if idx is not None and -len(node) <= idx < len(node) else None
    return node.get(part)


def _assign(node: Any, part: str, value: Any, key: str) -> None:
    if isinstance(node, list):
        if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
            raise JobError(f"--set {key}: {part!r} is not an index of a list of {len(node)}")
        node[int(part)] = value
    else:
        node[part] = value


# -- loading --------------------------------------------------------------------------------------

def _fmt_loc(loc: tuple) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<top>"


def _errors(source: str, err: ValidationError, prefix: str = "") -> JobError:
    lines = []
    for e in err.errors():
        loc = _fmt_loc(tuple(e["loc"]))
        path = f"{prefix}.{loc}" if prefix and loc != "<top>" else (prefix or loc)
        value = e.get("input")
        shown = repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        what = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{source}: {path}: {what} (got {shown})" if e["type"] != "missing" else f"{source}: {path}: field required")
    return JobError("\n".join(lines))


def _stage_entry(item: Any, idx: int, source: str) -> tuple[str, dict]:
    if isinstance(item, str):
        return item, {}
    if isinstance(item, dict) and len(item) == 1:
        name, cfg = next(iter(item.items()))
        if cfg is None:
            cfg = {}
        if not isinstance(cfg, dict):
            raise JobError(f"{source}: stages[{idx}].{name}: expected a mapping of settings (got {cfg!r})")
        return str(name), cfg
    raise JobError(f"{source}: stages[{idx}]: expected `name` or `{{name: {{settings}}}}` (got {item!r})")


def build_job(data: Any, source: str = "<job>") -> Job:
    if not isinstance(data, dict):
        raise JobError(f"{source}: a job file is a YAML mapping (got {type(data).__name__})")
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as e:
        raise _errors(source, e) from None
    entries: list[StageEntry] = []
    seen: set[str] = set()
    names = [(SOURCE_STAGE, spec.download, SOURCE_STAGE)]
    for i, item in enumerate(spec.stages):
        name, cfg = _stage_entry(item, i, source)
        names.append((name, cfg, f"stages[{i}].{name}"))
    for name, cfg, path in names:
        try:
            cls = get_stage_class(name)
        except UnknownStage:
            raise JobError(f"{source}: {path}: unknown stage {name!r} (available: {', '.join(available_stages())})") from None
        if (cls.kind == "source") != (path == SOURCE_STAGE):
            raise JobError(f"{source}: {path}: stage {name!r} of kind {cls.kind!r} cannot run here")
        if name in seen:
            raise JobError(f"{source}: {path}: stage {name!r} appears twice")
        seen.add(name)
        try:
            entries.append(StageEntry(name=name, config=cls.Config.model_validate(cfg)))
        except ValidationError as e:
            raise _errors(source, e, prefix=path) from None
    return Job(name=spec.name, seed=spec.seed, input=spec.input, output=spec.output, stages=entries, source_file=source)


def load_job(path: str | Path, sets: list[str] = (), output: str | None = None) -> Job:
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise JobError(f"{path}: cannot read job file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise JobError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise JobError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise JobError(f"{path}: a job file is a YAML mapping (got {type(data).__name__})")
    for s in sets:
        apply_set(data, s, path)
    if output is not None:
        data["output"] = output
    return build_job(data, path)
