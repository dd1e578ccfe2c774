"""Least privilege for one run: the role -> ACL table, the one source of truth.

``specstream acls`` prints these bindings as Kafka's own ``kafka-acls`` arguments (what
``infra/acls.sh`` runs) or applies them through the admin API (``KafkaAdmin.create_acls``).
A broker with ``allow.everyone.if.no.acl.found=false`` then lets each principal do only this:

- source: CREATE the run's topics (it claims the run: ``claim_run``), WRITE prompts, DLQ and
  manifest, its transactional id ``<run>.source`` and its group ``<run>.source`` (the offsets
  that hold its counts, committed on prompts: so READ on prompts too, which Kafka asks of any
  offset commit).
- generate: READ prompts in group ``<run>.generators``, WRITE samples, DLQ and manifest
  (partition claims), transactional ids ``<run>.generate.*`` (prefixed: one per worker id);
  READ the ledger (backpressure: how far the trainers have consumed).
- train: READ samples and ledger, WRITE ledger and DLQ, group ``<run>.trainers`` (advisory
  offsets for lag).
- read-only (status, audit): READ every topic of the run, DESCRIBE its groups.

Every stage also DESCRIBEs the run's topics, READs the manifest and heartbeats, WRITEs its
heartbeats and DESCRIBEs ``<run>.source`` (the source's counts). The held-out eval sub-run
``<run>.eval`` gets the same grants. Topic names are literal, so a principal of one run sees
nothing of another.

Who creates the topics: the source, as ``claim_run`` does (CREATE on the run's own topic names,
nothing wider). ``specstream topics apply`` (which also alters topic configs) is an operator's
command: run it with the admin's credentials, not a role's.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from pipeline.core.topics import RunTopics

__all__ = ("ROLES", "Binding", "kafka_acls_args", "principal", "run_bindings")

ROLES = ("source", "generate", "train", "read-only")


@dataclass(frozen=True, order=True)
class Binding:
    """ALLOW ``operation`` on one resource (``topic``, ``group``, ``transactional-id``) to a principal."""

    principal: str
    resource: str
    name: str
    operation: str
    prefixed: bool = False


def principal(user: str) -> str:
    """``User:<name>`` (a name given with its type is kept)."""
    return user if ":" in user else f"User:{user}"


def _role_grants(role: str, run: RunTopics) -> Iterator[tuple[str, str, str, bool]]:
    """(resource, name, operation, prefixed) for one role on one (sub-)run."""
    if role == "read-only":
        for topic in run.all():
            yield from (("topic", topic, "READ", False), ("topic", topic, "DESCRIBE", False))
        for group in (run.source_group, run.generator_group, run.trainer_group):
            yield "group", group, "DESCRIBE", False
        return
    for topic in run.all():
        yield "topic", topic, "DESCRIBE", False
    yield from (("topic", run.manifest, "READ", False), ("topic", run.heartbeats, "READ", False))
    yield "topic", run.heartbeats, "WRITE", False
    yield "group", run.source_group, "DESCRIBE", False
    if role == "source":
        for topic in run.all():
            yield "topic", topic, "CREATE", False
        for topic in (run.prompts, run.dlq, run.manifest):
            yield "topic", topic, "WRITE", False
        yield "topic", run.prompts, "READ", False  # its transactions commit group offsets on prompts
        yield from _transactional(f"{run.run_id}.source", prefixed=False)
        yield "group", run.source_group, "READ", False
    elif role == "generate":
        yield "topic", run.prompts, "READ", False
        yield "topic", run.ledger, "READ", False  # backpressure: how far the trainers have consumed
        for topic in (run.samples, run.dlq, run.manifest):
            yield "topic", topic, "WRITE", False
        yield from _transactional(f"{run.run_id}.generate.", prefixed=True)
        yield "group", run.generator_group, "READ", False
    elif role == "train":
        yield from (("topic", run.samples, "READ", False), ("topic", run.ledger, "READ", False))
        yield from (("topic", run.ledger, "WRITE", False), ("topic", run.dlq, "WRITE", False))
        yield "group", run.trainer_group, "READ", False
    else:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")


def _transactional(name: str, *, prefixed: bool) -> Iterator[tuple[str, str, str, bool]]:
    yield from (
        ("transactional-id", name, "WRITE", prefixed),
        ("transactional-id", name, "DESCRIBE", prefixed),
    )


def run_bindings(run_id: str, users: Mapping[str, str]) -> list[Binding]:
    """Every ALLOW binding for run ``run_id`` (and its eval sub-run), for ``users`` by role."""
    out: set[Binding] = set()
    for role, user in users.items():
        for run in (RunTopics(run_id), RunTopics(run_id).eval):
            for resource, name, operation, prefixed in _role_grants(role, run):
                out.add(Binding(principal(user), resource, name, operation, prefixed))
    return sorted(out)


def kafka_acls_args(bindings: list[Binding]) -> list[list[str]]:
    """``kafka-acls --add`` argument lists, one per principal, resource kind, pattern and
    operation set (the tool grants every operation on every resource it is given)."""
    grouped: dict[tuple[str, str, bool, str], list[str]] = {}
    for b in bindings:
        grouped.setdefault((b.principal, b.resource, b.prefixed, b.name), []).append(b.operation)
    by_ops: dict[tuple[str, str, bool, tuple[str, ...]], list[str]] = {}
    for (who, resource, prefixed, name), ops in grouped.items():
        by_ops.setdefault((who, resource, prefixed, tuple(sorted(ops))), []).append(name)
    lines = []
    for (who, resource, prefixed, operations), names in sorted(by_ops.items()):
        args = ["--add", "--allow-principal", who]
        for op in operations:
            args += ["--operation", op]
        for name in sorted(names):
            args += [f"--{resource}", name]
        if prefixed:
            args += ["--resource-pattern-type", "prefixed"]
        lines.append(args)
    return lines


def render_shell(lines: list[list[str]]) -> str:
    """One shell-quoted argument list per line."""
    return "".join(shlex.join(args) + "\n" for args in lines)
