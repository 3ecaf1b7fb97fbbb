"""Job files: one YAML file, validated before anything runs, with errors that name the file, the
field path and the bad value."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from recap.pipeline.errors import UserError
from recap.pipeline.stage import (JobFilePath, SourceStage, StageConfig, UnknownStage, available_stages,
                                  get_stage_class, source_stages)

DEFAULT_INPUT_KIND = "urls"  # job files from before input.kind existed are URL lists


class JobError(UserError, ValueError):
    """A bad job file or --set value. str() is the full, user-facing message."""


class StageEntry(BaseModel):
    name: str
    config: StageConfig


class JobSpec(BaseModel):
    # extra keys: the source stage's own section (`download:`), checked once the source is known
    model_config = ConfigDict(extra="allow")
    name: str = "job"
    seed: int = 0
    input: dict[str, Any]
    output: str
    stages: list[Any] = Field(default_factory=list)


class Job(BaseModel):
    """The resolved job: the input and every stage config validated by its own model."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    name: str
    seed: int
    input: BaseModel  # the source stage's InputConfig
    output: str
    stages: list[StageEntry]  # the source stage first
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


def resolve_job_paths(model: type[BaseModel], cfg: dict, base_dir: Path | None) -> dict:
    """Relative values of the model's job-file paths (``LocalPath`` fields), looked up beside the
    job file first, then in the working directory (where --set values and older job files point)."""
    if base_dir is None:
        return cfg
    out = dict(cfg)
    for name, field in model.model_fields.items():
        name = field.alias or name  # the key as the job file spells it
        value = out.get(name)
        if not isinstance(value, str) or "://" in value or Path(value).is_absolute():
            continue
        if any(isinstance(m, JobFilePath) for m in field.metadata):
            beside = base_dir / value
            if beside.exists() or not Path(value).exists():
                out[name] = str(beside)
    return out


def _source_for(spec: JobSpec, source: str) -> type[SourceStage]:
    kind = spec.input.get("kind", DEFAULT_INPUT_KIND)
    sources = source_stages()
    if kind not in sources:
        raise JobError(f"{source}: input.kind: unknown input kind {kind!r} (available: {', '.join(sorted(sources))})")
    return sources[kind]


def _validated(model: type[BaseModel], cfg: dict, source: str, path: str, base_dir: Path | None):
    try:
        return model.model_validate(resolve_job_paths(model, cfg, base_dir))
    except ValidationError as e:
        raise _errors(source, e, prefix=path) from None


def build_job(data: Any, source: str = "<job>", base_dir: Path | None = None) -> Job:
    """Validate a job given as plain data; ``base_dir`` is where its relative job-file paths live."""
    if not isinstance(data, dict):
        raise JobError(f"{source}: a job file is a YAML mapping (got {type(data).__name__})")
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as e:
        raise _errors(source, e) from None
    src = _source_for(spec, source)
    section = src.section()
    for key in spec.model_extra or {}:
        if key != section:
            raise JobError(f"{source}: {key}: unknown key (got {data[key]!r})"[:300])
    sec = data.get(section) or {}
    if not isinstance(sec, dict):
        raise JobError(f"{source}: {section}: expected a mapping of settings (got {sec!r})")
    inp = _validated(src.InputConfig, spec.input, source, "input", base_dir)
    entries: list[StageEntry] = [StageEntry(name=src.name, config=_validated(src.Config, sec, source, section, base_dir))]
    seen: set[str] = {src.name}
    for i, item in enumerate(spec.stages):
        name, cfg = _stage_entry(item, i, source)
        path = f"stages[{i}].{name}"
        try:
            cls = get_stage_class(name)
        except UnknownStage:
            raise JobError(f"{source}: {path}: unknown stage {name!r} (available: {', '.join(available_stages())})") from None
        if cls.kind == "source":
            raise JobError(f"{source}: {path}: stage {name!r} of kind 'source' cannot run here "
                           f"(the input's kind chooses the source: input.kind)")
        if name in seen:
            raise JobError(f"{source}: {path}: stage {name!r} appears twice")
        seen.add(name)
        entries.append(StageEntry(name=name, config=_validated(cls.Config, cfg, source, path, base_dir)))
    return Job(name=spec.name, seed=spec.seed, input=inp, output=spec.output, stages=entries, source_file=source)


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
    return build_job(data, path, base_dir=Path(path).resolve().parent)
