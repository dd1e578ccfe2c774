"""The broker's runtime jars, assembled once from Maven Central into the cache (no tarball).

``install()`` runs Maven over ``infra/kafka/pom.xml`` to copy Apache Kafka's runtime jars, and its
command-line tools (``kafka-tools``), into ``$SPECSTREAM_HOME/kafka-<version>/libs`` (atomically: a
half-copied folder is never taken for a complete one). The local broker needs only the broker's
jars (``libs_ready``), so an older install without the tools still starts it offline;
``specstream broker install`` completes such an install (``tools_ready``) in place.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from pipeline.core.errors import BrokerError

__all__ = ("KAFKA_VERSION", "home_dir", "libs_dir", "install", "libs_ready", "tools_ready")

logger = logging.getLogger(__name__)

KAFKA_VERSION = "4.3.1"
_NO_MAVEN = (
    "the Kafka broker jars are not installed and `mvn` is not on PATH: install Maven "
    "(e.g. `apt-get install maven`) and run `specstream broker install`, or use a broker you "
    "already run by setting KAFKA_BOOTSTRAP_SERVERS=host:port"
)


def home_dir() -> Path:
    """Cache and state live under ``$SPECSTREAM_HOME`` (default ``~/.cache/specstream``)."""
    return Path(os.environ.get("SPECSTREAM_HOME", Path.home() / ".cache" / "specstream"))


def libs_dir(version: str = KAFKA_VERSION) -> Path:
    """Where the broker jars of ``version`` are installed."""
    return home_dir() / f"kafka-{version}" / "libs"


def _pom_path() -> Path:
    """The POM ships in the wheel (``pipeline/_infra``) or sits in the source checkout."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "_infra" / "kafka" / "pom.xml", package.parent / "infra/kafka/pom.xml"):
        if candidate.is_file():
            return candidate
    raise BrokerError("infra/kafka/pom.xml not found: reinstall specstream")


def libs_ready(libs: Path, version: str) -> bool:
    """Whether a complete jar set for this version is in ``libs``."""
    return (libs / f"kafka_2.13-{version}.jar").is_file() and any(libs.glob("log4j-slf4j-impl-*.jar"))


def tools_ready(libs: Path, version: str) -> bool:
    """Whether Kafka's command-line tools are in ``libs`` too (installs before them lack them)."""
    return libs_ready(libs, version) and (libs / f"kafka-tools-{version}.jar").is_file()


def install(version: str = KAFKA_VERSION, *, force: bool = False) -> Path:
    """Copy the broker's runtime jars and the tools from Maven Central into the cache (once; an
    install without the tools is completed); return the dir."""
    libs = libs_dir(version)
    if tools_ready(libs, version) and not force:
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(_NO_MAVEN)
    staging = Path(tempfile.mkdtemp(prefix="libs-", dir=_mkdir(libs.parent)))
    cmd = [
        mvn, "-B", "-q", "-f", str(_pom_path()), "package",
        f"-Dkafka.version={version}", f"-Dlibs.dir={staging}",
        f"-Dproject.build.directory={staging.parent / 'mvn-target'}",
    ]  # fmt: skip
    logger.info("assembling Kafka %s jars from Maven Central into %s", version, libs)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0 or not tools_ready(staging, version):
        shutil.rmtree(staging, ignore_errors=True)
        raise BrokerError(
            f"mvn could not assemble Kafka {version} (exit {proc.returncode}):\n"
            f"{(proc.stdout + proc.stderr)[-3000:]}"
        )
    if libs.exists():
        shutil.rmtree(libs)
    staging.rename(libs)  # atomic: a half-copied folder is never taken for a complete one
    return libs


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
