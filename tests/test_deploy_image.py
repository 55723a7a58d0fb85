"""deploy/docker/Dockerfile built with podman and run: `rotator --help`, and `rotator dev`
answering /readyz inside a read-only container.

The default base (python:3.12-slim) lives on a registry this machine cannot reach, so
the base is a Debian root filesystem that mmdebstrap makes from the host's own apt
sources (python3 and its venv module) and `podman import` turns into an image; the
Dockerfile is built unchanged with BASE set to it."""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploying import DEPLOY, ROOT, run, tool
from tests.helpers import wait_for

# One worker builds the image (the module fixture) and runs every test on it.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900), pytest.mark.xdist_group("image")]

# The sandbox this runs in lets no process raise its limits, and the OCI runtime sets
# them before it starts the container; crun also refuses this host's mixed cgroup v1/v2
# layout, which runc accepts.
RUNTIME = ["--runtime", "runc"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def apt_sources() -> list[str]:
    """The host's apt source files, for mmdebstrap to use as they are."""
    candidates = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    return [
        str(p)
        for p in candidates
        if p.suffix in {".list", ".sources"} and p.is_file() and p.read_text().strip()
    ]


def suite() -> str:
    release = Path("/etc/os-release").read_text()
    match = re.search(r"^VERSION_CODENAME=(\w+)$", release, re.M)
    assert match, release
    return match[1]


def host_pip_mounts() -> list[str]:
    """The host's CA store and pip configuration, so that pip inside the build reaches the
    package index the way pip on this machine does."""
    mounts = ["/etc/ssl/certs"] + [p for p in ("/etc/pip.conf",) if Path(p).is_file()]
    return [arg for path in mounts for arg in ("-v", f"{path}:{path}:ro")]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    podman, mmdebstrap = tool("podman"), tool("mmdebstrap")
    tool("runc")
    tag = uuid.uuid4().hex[:12]
    base, built = f"localhost/rotator-test-base:{tag}", f"localhost/rotator-test:{tag}"
    rootfs = tmp_path_factory.mktemp("base") / "rootfs.tar"
    excluded = ["/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*"]
    run(
        mmdebstrap,
        "--quiet",
        "--variant=minbase",
        "--include=python3,python3-venv",
        *(f"--dpkgopt=path-exclude={path}" for path in excluded),
        suite(),
        str(rootfs),
        *apt_sources(),
    )
    try:
        run(podman, "import", "--quiet", str(rootfs), base)
        rootfs.unlink()
        run(
            podman,
            "build",
            "--quiet",
            "--isolation=chroot",
            "--network=host",
            "--layers=false",
            *host_pip_mounts(),
            "--build-arg",
            f"BASE={base}",
            "--build-arg",
            "EXTRAS=[dev]",
            "-f",
            str(DEPLOY / "docker" / "Dockerfile"),
            "-t",
            built,
            str(ROOT),
        )
        yield built
    finally:
        subprocess.run([podman, "rmi", "--force", built, base], capture_output=True, check=False)


def podman(*args: str) -> list[str]:
    return [tool("podman"), *RUNTIME, *args]


def test_the_image_runs_rotator_as_an_unprivileged_user(image: str) -> None:
    config = json.loads(run(*podman("image", "inspect", image)))[0]["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["rotator"]
    out = run(*podman("run", "--rm", "--network=none", *LIMITS, image, "--help"))
    assert out.startswith("usage: rotator")
    assert run(*podman("run", "--rm", "--network=none", *LIMITS, "--entrypoint", "id", image)) == (
        "uid=10001(rotator) gid=10001(rotator) groups=10001(rotator)\n"
    )


def test_rotator_dev_runs_in_a_read_only_container(image: str) -> None:
    """As the Kubernetes manifests run it: read-only root, no capabilities, no new
    privileges, no network but its own loopback."""
    confined = ["--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges"]
    container = run(
        *podman("run", "--detach", *confined, "--network=none", *LIMITS, image, "dev")
    ).strip()
    try:

        def readyz_port() -> str | None:
            logs = run(*podman("logs", container))
            match = re.search(r"http://127\.0\.0\.1:(\d+)/readyz", logs)
            return match[1] if match else None

        port = wait_for(readyz_port, timeout=60, what="rotator dev's health endpoint")
        probe = (
            "import json, urllib.request; "
            f"print(urllib.request.urlopen('http://127.0.0.1:{port}/readyz').read().decode())"
        )

        def ready() -> dict[str, object] | None:
            done = subprocess.run(
                podman("exec", container, "python3", "-c", probe),
                capture_output=True,
                text=True,
                check=False,
            )
            return dict(json.loads(done.stdout)) if done.returncode == 0 else None

        report = wait_for(ready, timeout=60, what="rotator dev ready in the container")
        assert report["role"] == "leader", report
        run(*podman("stop", "--time=20", container))
        assert run(*podman("inspect", "--format={{.State.ExitCode}}", container)).strip() == "0"
    finally:
        subprocess.run(podman("rm", "--force", container), capture_output=True, check=False)
