"""The local broker's security settings: a SASL listener and, with SCRAM, the standard authorizer.

``LocalKafka`` appends these to its ``server.properties`` (later keys win in a Java properties
file). Two shapes:

- PLAIN (``sasl_users``): users and passwords in the listener's JAAS line, no authorizer; for
  testing what a client with wrong credentials is told.
- SCRAM-SHA-512 (``scram_users``): the credentials live in the cluster metadata (written by
  ``kafka-storage format --add-scram`` when the storage is formatted, or later through the admin
  API), and KRaft's ``StandardAuthorizer`` enforces ACLs with ``allow.everyone.if.no.acl.found=false``:
  a principal can do only what an ACL grants (``pipeline.transport.acls``).

The broker's own traffic (inter-broker and broker-to-controller) stays on PLAINTEXT listeners
bound to 127.0.0.1, whose principal is ``User:ANONYMOUS``; the authorizer must let it fetch
metadata and act on the cluster, so ANONYMOUS is a super user. That is safe only because both
listeners are loopback: clients are told the SASL listener's address (``sasl_bootstrap``). A
multi-host cluster runs its inter-broker listener on SASL instead (see infra/).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pipeline.core.errors import BrokerError

__all__ = ("SCRAM_MECHANISM", "plain_properties", "scram_format_args", "scram_properties")

SCRAM_MECHANISM = "SCRAM-SHA-512"
_AUTHORIZER = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
# kafka-storage parses `[name=..,password=..]`: a comma, bracket, quote or space would split it.
_UNSAFE = frozenset(",[]=\"' \t\n")


def _listeners(bport: int, cport: int, sport: int) -> str:
    listeners = (
        f"PLAINTEXT://127.0.0.1:{bport},CONTROLLER://127.0.0.1:{cport},SASL_PLAINTEXT://127.0.0.1:{sport}"
    )
    return (
        f"listeners={listeners}\n"
        f"advertised.listeners={listeners}\n"
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT\n"
    )


def plain_properties(bport: int, cport: int, sport: int, users: Mapping[str, str]) -> str:
    """A third listener, SASL_PLAINTEXT with PLAIN, for ``users``; brokers still talk PLAINTEXT."""
    accounts = " ".join(f'user_{name}="{password}"' for name, password in users.items())
    return (
        _listeners(bport, cport, sport) + "sasl.enabled.mechanisms=PLAIN\n"
        "listener.name.sasl_plaintext.plain.sasl.jaas.config="
        f"org.apache.kafka.common.security.plain.PlainLoginModule required {accounts};\n"
    )


def scram_properties(bport: int, cport: int, sport: int, super_users: Iterable[str]) -> str:
    """A SASL_PLAINTEXT listener with SCRAM-SHA-512 and the standard authorizer (deny by default).

    ``User:ANONYMOUS`` is a super user: it is the broker itself, on its loopback-only PLAINTEXT
    inter-broker and controller listeners (see the module docstring)."""
    supers = ";".join(["User:ANONYMOUS", *(f"User:{name}" for name in super_users)])
    return (
        _listeners(bport, cport, sport) + f"sasl.enabled.mechanisms={SCRAM_MECHANISM}\n"
        f"listener.name.sasl_plaintext.{SCRAM_MECHANISM.lower()}.sasl.jaas.config="
        "org.apache.kafka.common.security.scram.ScramLoginModule required;\n"
        f"authorizer.class.name={_AUTHORIZER}\n"
        f"super.users={supers}\n"
        "allow.everyone.if.no.acl.found=false\n"
    )


def scram_format_args(users: Mapping[str, str]) -> list[str]:
    """``kafka-storage format`` arguments that store each user's SCRAM-SHA-512 credential."""
    args: list[str] = []
    for name, password in users.items():
        if not name or not password or _UNSAFE & set(name + password):
            raise BrokerError(
                f"SCRAM user {name!r}: an empty name or password, or one with a comma, bracket, quote or space, "
                "which kafka-storage's --add-scram cannot parse: use letters, digits and -_.@:/+"
            )
        args += ["--add-scram", f"{SCRAM_MECHANISM}=[name={name},password={password}]"]
    return args
