"""Test helpers that several test modules share: read a topic, spawn stage processes."""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pipeline.core.errors import DecodeError
from pipeline.core.messages import AnyMessage, Prompt, decode, prompt_id_for
from pipeline.transport.kafka import KafkaSettings, PartitionReader

__all__ = (
    "read_messages",
    "make_prompts",
    "specstream_command",
    "spawn",
    "wait_exit",
    "condensed_hang",
    "wait_for_output",
    "one_error",
    "tree_state",
    "tmpfs",
)


def read_messages(
    settings: KafkaSettings,
    topic: str,
    partitions: Iterable[int],
    *,
    until: Callable[[list[tuple[int, AnyMessage]]], bool],
    timeout_s: float = 60.0,
    skip_undecodable: bool = False,
) -> list[tuple[int, AnyMessage]]:
    """Decoded (partition, message) pairs read from the start until ``until`` holds (bounded).

    ``skip_undecodable``: leave out records that are no message (a topic with injected strays)."""
    reader = PartitionReader(settings, topic, partitions=list(partitions), start="earliest")
    out: list[tuple[int, AnyMessage]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not until(out):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: condition not met in {timeout_s} s with {len(out)} records")
            for r in reader.poll(0.5):
                try:
                    out.append((r.partition, decode(r.value or b"")))
                except DecodeError:
                    if not skip_undecodable:
                        raise
        return out
    finally:
        reader.close()


def make_prompts(run_id: str, count: int, *, tokens: int = 16, vocab: int = 512) -> list[Prompt]:
    prompts = []
    for i in range(count):
        ids = [(i * 31 + j * 17 + 3) % vocab for j in range(tokens + i % 5)]
        mask = [0] * 4 + [1] * (len(ids) - 4)
        prompts.append(Prompt(run_id=run_id, prompt_id=prompt_id_for(i, ids), input_ids=ids, loss_mask=mask))
    return prompts


def specstream_command() -> str:
    """The ``specstream`` console script of this interpreter's environment (what users run)."""
    beside = Path(sys.executable).with_name("specstream")
    found = str(beside) if beside.is_file() else shutil.which("specstream")
    if found is None:
        raise RuntimeError("the specstream console script is not installed: pip install -e .")
    return found


def spawn(args: Sequence[str], *, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``specstream ARGS`` as a separate process (a real stage process)."""
    inherited = {k: v for k, v in os.environ.items() if k != "SPECSTREAM_CRASH_AT"}
    full_env = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(
        [specstream_command(), *args],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_exit(proc: subprocess.Popen[str], timeout_s: float = 180.0) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # specstream prints every thread's stack: what it waits on
        try:
            out, _ = proc.communicate(timeout=5)  # it goes on after printing them: then killed
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        raise AssertionError(f"process did not exit within {timeout_s} s:\n{condensed_hang(out)}") from None
    return proc.returncode, out


_THREAD = re.compile(r"^(?:Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):$", re.M)


def condensed_hang(out: str, budget: int = 12000) -> str:
    """What a hung process printed, made to fit a test report: the end of its log (what it did
    last) and the stacks of the threads that were doing something; a Kafka client's own network
    thread, parked in ``select`` with no frame of ours, is only counted. A hang in CI is then
    diagnosable from the report alone."""
    first = _THREAD.search(out)
    if first is None:
        return out[-budget:]
    log, stacks = out[: first.start()], out[first.start() :]
    starts = [m.start() for m in _THREAD.finditer(stacks)] + [len(stacks)]
    blocks = [stacks[a:b].strip() for a, b in zip(starts, starts[1:])]
    busy = [b for b in blocks if "/pipeline/" in b or "selectors.py" not in b]
    shown = "\n\n".join(busy)[-budget // 2 :]
    return f"{log[-(budget - len(shown)):]}\n{len(blocks) - len(busy)} Kafka client threads in select() not shown\n{shown}"


def wait_for_group(bootstrap: str, group_id: str, members: int, *, timeout_s: float = 90.0) -> None:
    """Until the consumer group is Stable with ``members`` members (bounded): a test that needs
    every worker in the group before any work arrives waits here instead of racing the joins."""
    from kafka.admin import KafkaAdminClient  # lazy: start-up, only the group tests need it
    from kafka.errors import KafkaError  # lazy: start-up, only the group tests need it

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    deadline = time.monotonic() + timeout_s
    group: object = None
    try:
        while True:
            try:
                group = admin.describe_groups([group_id])[group_id]
            except KafkaError as exc:  # e.g. the coordinator of a fresh broker is not up yet
                group = exc
            if isinstance(group, dict) and group["group_state"] == "Stable" and len(group["members"]) == members:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"group {group_id} not stable with {members} members in {timeout_s} s: {group}")
            time.sleep(0.2)  # polling the broker's view of the group, bounded by the deadline
    finally:
        admin.close()


def wait_for_output(proc: subprocess.Popen[str], pattern: str, timeout_s: float = 60.0) -> list[str]:
    """The process's output lines up to the first that matches ``pattern`` (bounded: a process
    that exits or stays silent past the deadline fails the test)."""
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(timeout=left):
                continue
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if re.search(pattern, line):
                return seen
    raise AssertionError(f"no line matching {pattern!r} within {timeout_s} s:\n{''.join(seen)[-4000:]}")


def one_error(out: str, *, launcher_traceback: bool = False) -> str:
    """The single `error:` line; no traceback (torchrun prints its own ChildFailedError one)."""
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert launcher_traceback or "Traceback" not in out, out
    return errors[0]


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time: equal before and after
    means nothing was written there."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Callable[..., None]]:
    """A real small filesystem mounted at ``path`` (a full or read-only disk for the fault tests);
    yields ``remount(*options)`` (``"ro"``, ``"size=64m"``...). Unmounted on the way out. Needs
    root and a kernel that lets this process mount (skips otherwise)."""
    import pytest  # lazy: start-up, only the fault tests mount

    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")

    def remount(*options: str) -> None:
        subprocess.run(["mount", "-o", ",".join(("remount", *options)), str(path)], check=True, timeout=30)

    try:
        yield remount
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)


def event_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in a TensorBoard log directory as (step, value) points, read the way
    TensorBoard reads them (orphaned points of a crashed attempt purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
