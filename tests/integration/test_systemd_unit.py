"""contrib/systemd/: the unit verifies, its exposure rating stays at or below 4.0, the sysusers.d file
creates the user it runs as, and docs/operations.md shows both files as they are."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "contrib" / "systemd" / "llamactl-proxy.service"
SYSUSERS = ROOT / "contrib" / "systemd" / "llamactl.conf"
EXEC = "/opt/llamactl/.venv/bin/llamactl"
MAX_EXPOSURE = 4.0

@pytest.fixture
def systemd_tools() -> None:
    """systemd-analyze and systemd-sysusers (.ci/run installs Debian's systemd): missing = a loud failure."""
    if shutil.which("systemd-analyze") is None or shutil.which("systemd-sysusers") is None:
        pytest.fail("systemd-analyze/systemd-sysusers are not installed (.ci/run installs Debian's systemd): "
                    "contrib/systemd/ would go unchecked", pytrace=False)


needs_systemd = pytest.mark.usefixtures("systemd_tools")


def _systemd(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120)


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_the_operations_guide_shows_both_files_as_they_are() -> None:
    guide = (ROOT / "docs" / "operations.md").read_text()
    for path in (UNIT, SYSUSERS):
        assert f"```ini\n{path.read_text()}```" in guide, f"docs/operations.md's copy of {path.name} differs"


@needs_systemd
def test_the_unit_verifies_once_its_program_exists(tmp_path: Path) -> None:
    program = tmp_path / "llamactl"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    text = UNIT.read_text()
    assert f"ExecStart={EXEC} " in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(f"ExecStart={EXEC} ", f"ExecStart={program} "))
    out = _systemd("systemd-analyze", "verify", str(copy))
    assert out.returncode == 0, out.stderr
    assert f"{copy.name}:" not in out.stderr, out.stderr  # no warning about the unit itself


@needs_systemd
def test_the_unit_exposure_is_at_most_4() -> None:
    out = _systemd("systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT))
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert found, out.stdout[-2000:] + out.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, out.stdout


def test_the_hardening_leaves_llamactl_what_it_uses() -> None:
    """What llama-server and llamactl need under the unit: sockets for clients and loopback, the GPUs,
    /proc/driver/nvidia for NVML, W+X memory for CUDA, the state dir writable and named to llamactl."""
    unit = _directives(UNIT.read_text())
    families = set(" ".join(unit["RestrictAddressFamilies"]).split())
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= families
    assert unit["ProtectSystem"] == ["strict"] and unit["UMask"] == ["0077"]
    assert unit["StateDirectory"] == ["llamactl"] and "LLAMACTL_STATE_DIR=/var/lib/llamactl" in unit["Environment"]
    assert {"char-nvidia-frontend rw", "char-nvidia-uvm rw"} <= set(unit["DeviceAllow"])
    for absent in ("MemoryDenyWriteExecute", "ProcSubset", "PrivateDevices", "DynamicUser", "LogsDirectory"):
        assert absent not in unit, absent
    # KillMode=mixed SIGKILLs every instance once the proxy exits: --keep-instances needs KillMode=process
    keeps = "--keep-instances" in unit["ExecStart"][0]
    assert unit["KillMode"] == (["process"] if keeps else ["mixed"])
    assert "KillMode=process" in (ROOT / "docs" / "operations.md").read_text()  # the variant that keeps them
    # only groups every NVIDIA host has: `render` is missing on many, and systemd then refuses to start
    assert set(" ".join(unit.get("SupplementaryGroups", [])).split()) <= {"video"}


@needs_systemd
def test_sysusers_creates_the_user_the_unit_runs_as(tmp_path: Path) -> None:
    (tmp_path / "etc" / "sysusers.d").mkdir(parents=True)
    shutil.copy(SYSUSERS, tmp_path / "etc" / "sysusers.d" / SYSUSERS.name)
    out = _systemd("systemd-sysusers", f"--root={tmp_path}")
    assert out.returncode == 0, out.stderr
    user = _directives(UNIT.read_text())["User"][0]
    passwd = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    assert user in passwd
    assert passwd[user][5] == "/var/lib/llamactl"  # the state directory is its home
    assert user in (tmp_path / "etc" / "group").read_text()
