"""Readers for the deployment files: a Dockerfile parser, .dockerignore matching, the compose file,
and a stand-in for Docker's build context (what the COPY instructions put in the image)."""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped,unused-ignore]

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"
PYPROJECT = ROOT / "pyproject.toml"


# -- Dockerfile -------------------------------------------------------------------------------------


@dataclass
class Instruction:
    """One Dockerfile instruction: its keyword, ``--flags``, and its arguments as written."""

    keyword: str
    rest: str
    flags: dict[str, str] = field(default_factory=dict)
    line: int = 0

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON-array form's items, or None for the shell form."""
        text = self.rest.strip()
        if not text.startswith("["):
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return None
        return value

    def words(self) -> list[str]:
        """The arguments split like a shell would (exec form: the array items)."""
        form = self.exec_form
        return form if form is not None else shlex.split(self.rest, comments=False)


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (enough for these checks)."""
    instructions: list[Instruction] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are removed by Docker too
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1])
            continue
        buffer.append(stripped)
        joined = " ".join(part.strip() for part in buffer if part.strip())
        buffer = []
        keyword, _, rest = joined.partition(" ")
        flags: dict[str, str] = {}
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            rest = rest.lstrip()
        instructions.append(Instruction(keyword.upper(), rest.strip(), flags, start))
    if buffer:
        raise ValueError("the Dockerfile ends inside a continued line")
    return instructions


def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions of the last build stage (from its FROM on)."""
    starts = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    assert starts, "the Dockerfile has no FROM"
    return instructions[starts[-1] :]


def build_args(instructions: list[Instruction]) -> dict[str, str]:
    """ARG names and their defaults ('' when none)."""
    args: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ARG":
            name, _, default = ins.rest.partition("=")
            args[name.strip()] = default.strip().strip('"')
    return args


def env_values(instructions: list[Instruction]) -> dict[str, str]:
    """ENV settings, in both the ``K=V K2=V2`` and the legacy ``K V`` forms."""
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword != "ENV":
            continue
        words = shlex.split(ins.rest)
        if words and "=" not in words[0]:
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value
    return env


# -- .dockerignore ----------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax (Go filepath.Match plus ``**``) as an anchored regex."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("^" + "".join(out) + "$")


class DockerIgnore:
    """Which context paths a .dockerignore leaves out: the last matching pattern wins, ``!`` re-includes,
    and a pattern matching a folder leaves out everything under it."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = os.path.normpath(line[1:].strip() if negate else line).lstrip("/")
            self.rules.append((negate, _pattern_regex(pattern)))

    def excluded(self, relpath: str) -> bool:
        parts = Path(relpath).parts
        result = False
        for negate, regex in self.rules:
            for n in range(1, len(parts) + 1):
                if regex.match("/".join(parts[:n])):
                    result = not negate
                    break
        return result


def dockerignore() -> DockerIgnore:
    return DockerIgnore(DOCKERIGNORE.read_text() if DOCKERIGNORE.exists() else "")


# -- compose ----------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    """The compose file as PyYAML reads it (anchors and ``<<`` merge keys resolved)."""
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment in mapping form (the list form ``K=V`` converted)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` substitution."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        have = env.get(name)
        if op in (":-", "-"):
            return have if have else arg or ""
        if op in (":?", "?"):
            if not have:
                raise KeyError(f"{name}: {arg}")
            return have
        return have or ""

    return _INTERPOLATION.sub(sub, value)


def volume_mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each short-form volume; long-form entries converted."""
    mounts = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            mode = "ro" if entry.get("read_only") else "rw"
            mounts.append((str(entry.get("source", "")), str(entry["target"]), mode))
            continue
        # The source may hold ${VAR:-./x}: split on the colons outside ${...}.
        parts, depth, cur = [], 0, ""
        for ch in str(entry):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == ":" and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        parts.append(cur)
        if len(parts) == 1:
            mounts.append(("", parts[0], "rw"))
        else:
            mounts.append((parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"))
    return mounts


def is_named_volume(source: str) -> bool:
    """A volume source that names a volume (not a host path, not empty)."""
    return bool(source) and not source.startswith(("/", ".", "~", "$"))


# -- sources ----------------------------------------------------------------------------------------

_ENV_NAME = r"[\"'](RETRIEVER_[A-Z0-9_]+)[\"']"
_ENV_READS = [
    re.compile(r"envvar\s*=\s*" + _ENV_NAME),
    re.compile(r"envvar\s*=\s*\[[^\]]*?" + _ENV_NAME),
    re.compile(r"environ(?:\.get|\.setdefault|\.pop)?\s*[\[(]\s*" + _ENV_NAME),
    re.compile(r"getenv\s*\(\s*" + _ENV_NAME),
]


def env_names_read_by_sources() -> dict[str, list[str]]:
    """``RETRIEVER_*`` names the package reads (typer ``envvar=`` options, ``os.environ``, ``os.getenv``),
    each with the files that read it. retriever/ and cli/ are searched (index/ too, for completeness);
    retriever/cli and retriever/index are links to cli/ and index/ and are not walked twice."""
    found: dict[str, set[str]] = {}
    for folder in ("retriever", "cli", "index"):
        for dirpath, dirnames, filenames in os.walk(ROOT / folder):
            dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink() and d != "__pycache__"]
            for name in filenames:
                if not name.endswith(".py"):
                    continue
                path = Path(dirpath) / name
                text = path.read_text(encoding="utf-8")
                for regex in _ENV_READS:
                    for m in regex.finditer(text):
                        found.setdefault(m.group(1), set()).add(str(path.relative_to(ROOT)))
    return {k: sorted(v) for k, v in sorted(found.items())}


def serve_command_options() -> dict[str, str | None]:
    """Each option of ``retriever serve`` (its long name) and the environment variable it reads, if any,
    taken from the command itself."""
    import typer.main

    from retriever.cli.app import app

    group: Any = typer.main.get_command(app)
    serve = group.commands.get("serve")
    assert serve is not None, "the CLI has no serve command"
    options: dict[str, str | None] = {}
    for param in serve.params:
        for opt in getattr(param, "opts", []):
            if opt.startswith("--"):
                envvar = getattr(param, "envvar", None)
                options[opt] = envvar if isinstance(envvar, str) or envvar is None else ",".join(envvar)
    return options
