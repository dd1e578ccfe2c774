"""The role -> ACL table (no broker): least privilege by construction, and the kafka-acls lines
say exactly the bindings the admin API applies."""

from __future__ import annotations

import shlex

from pipeline.core.topics import RunTopics
from pipeline.transport.acls import Binding, kafka_acls_args, render_shell, run_bindings

ROLES = {"source": "src", "generate": "gen", "train": "trn", "read-only": "ro"}


def grants(user: str, operation: str, resource: str = "topic") -> set[str]:
    return {b.name for b in run_bindings("r1", ROLES)
            if b.principal == f"User:{user}" and b.operation == operation and b.resource == resource}  # fmt: skip


def test_each_role_writes_only_its_own_topics() -> None:
    run, ev = RunTopics("r1"), RunTopics("r1").eval
    assert grants("src", "WRITE") == {
        t for r in (run, ev) for t in (r.prompts, r.dlq, r.manifest, r.heartbeats)
    }
    assert grants("gen", "WRITE") == {
        t for r in (run, ev) for t in (r.samples, r.dlq, r.manifest, r.heartbeats)
    }
    assert grants("trn", "WRITE") == {t for r in (run, ev) for t in (r.ledger, r.dlq, r.heartbeats)}
    assert grants("ro", "WRITE") == set() and grants("ro", "CREATE") == set()
    assert grants("trn", "READ") == {
        t for r in (run, ev) for t in (r.samples, r.ledger, r.manifest, r.heartbeats)
    }
    assert grants("gen", "READ") == {
        t for r in (run, ev) for t in (r.prompts, r.ledger, r.manifest, r.heartbeats)
    }
    assert grants("src", "CREATE") == set(run.all() + ev.all())  # the source claims the run
    assert grants("gen", "CREATE") == grants("trn", "CREATE") == set()


def test_groups_and_transactional_ids_are_the_roles_own() -> None:
    assert grants("gen", "READ", "group") == {"r1.generators", "r1.eval.generators"}
    assert grants("trn", "READ", "group") == {"r1.trainers", "r1.eval.trainers"}
    assert grants("src", "WRITE", "transactional-id") == {"r1.source", "r1.eval.source"}
    generators = [
        b for b in run_bindings("r1", ROLES) if b.resource == "transactional-id" and b.principal == "User:gen"
    ]
    assert {b.name for b in generators} == {"r1.generate.", "r1.eval.generate."} and all(
        b.prefixed for b in generators
    )
    assert grants("trn", "WRITE", "transactional-id") == grants("ro", "READ", "group") == set()


def test_the_kafka_acls_lines_hold_exactly_the_bindings() -> None:
    bindings = run_bindings("r1", ROLES)
    parsed: set[Binding] = set()
    for line in render_shell(kafka_acls_args(bindings)).splitlines():
        args = shlex.split(line)
        assert args[:3] == ["--add", "--allow-principal", args[2]]
        ops = [args[i + 1] for i, a in enumerate(args) if a == "--operation"]
        resources = [(a[2:], args[i + 1]) for i, a in enumerate(args)
                     if a in ("--topic", "--group", "--transactional-id")]  # fmt: skip
        prefixed = "--resource-pattern-type" in args
        parsed |= {Binding(args[2], kind, name, op, prefixed) for kind, name in resources for op in ops}
    assert parsed == set(bindings)
