"""Kafka, behind the contract of ``pipeline.core.topics``: the only module that imports kafka-python.

- ``KafkaSettings``: where the broker is and the client options; the transport factories.
- ``kafka_client_options``: Kafka's own property names (``security.protocol``, ``sasl.username``,
  ``ssl.cafile``...) or kafka-python's, to kafka-python's; an unknown name is refused by name.
- ``KafkaAdmin``: create and check a run's topics, end offsets and group offsets.
- ``TransactionalProducer``: begin, send, commit *with consumed offsets* (consume-transform-
  produce, exactly once), abort. A restart with the same transactional id fences the old one.
- ``PlainProducer``: idempotent, for records that need no transaction (ledger, trainer DLQ).
- ``PartitionReader``: a ``read_committed`` consumer with manual assignment (trainer ranks,
  replay, status) or group subscription (generator workers); seek, pause, resume, commit with
  metadata.

Callers see ``Record``, plain ints and ``TransportError``/``FencedError``; kafka-python's types
and exceptions never leak out of this module.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn, TypeVar, Unpack

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import (
    ACL,
    AbortTransactionSpec,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    AlterConfigOp,
    ConfigResource,
    ConfigResourceType,
    OffsetSpec,
    ResourcePattern,
    ResourceType,
    ScramMechanism,
    TransactionState,
    UserScramCredentialUpsertion,
)
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import (
    AuthorizationError,
    ClusterAuthorizationFailedError,
    CommitFailedError,
    GroupAuthorizationFailedError,
    IllegalGenerationError,
    IllegalSaslStateError,
    InvalidReplicationFactorError,
    InvalidProducerEpochError,
    KafkaError,
    KafkaTimeoutError,
    OffsetOutOfRangeError,
    ProducerFencedError,
    SaslAuthenticationFailedError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailedError,
    UnknownMemberIdError,
    UnsupportedSaslMechanismError,
)
from kafka.net.sasl import SASL_MECHANISMS
from kafka.protocol.consumer.offsets import IsolationLevel
from kafka.structs import OffsetAndMetadata

from pipeline.core.errors import BrokerError, ConfigError, RunMismatchError, SpecstreamError, StreamError
from pipeline.core.partition_wait import end_hanging
from pipeline.core.topic_plan import TopicPolicy, TopicSpec, run_topic_plan
from pipeline.core.topics import (
    MAX_RECORD_BYTES,
    Committed,
    FencedError,
    ReaderOptions,
    Record,
    RunTopics,
    Start,
    TransportError,
)
from pipeline.transport.acls import Binding
from pipeline.transport.group_join import finish_unfinished_joins
from pipeline.transport.outage import DEFAULT_OUTAGE_BUDGET_S, OUTAGE, bounded, ride_out
from pipeline.transport.transaction_log import TOPIC as TRANSACTION_LOG
from pipeline.transport.transaction_log import (
    TransactionStep,
    coordinator_partition,
    decided,
    decode_key,
    decode_value,
)

__all__ = (
    "KafkaSettings",
    "KafkaAdmin",
    "TransactionalProducer",
    "PlainProducer",
    "PartitionReader",
    "kafka_client_options",
)

_FENCED = (ProducerFencedError, InvalidProducerEpochError, CommitFailedError, IllegalGenerationError,
           UnknownMemberIdError)  # fmt: skip


_DENIED_KINDS = (
    (TopicAuthorizationFailedError, "topic", "READ or WRITE"),
    (GroupAuthorizationFailedError, "consumer group", "READ"),
    (TransactionalIdAuthorizationFailedError, "transactional id", "WRITE"),
    (ClusterAuthorizationFailedError, "cluster", "the cluster operation"),
)


def denied(
    exc: BaseException, user: str | None, operation: str = "", names: Iterable[str] = ()
) -> BrokerError:
    """An ACL refusal as one line: whom the broker refused, which permission on which resource, the fix.

    kafka-python names the resource (a topic set or a name) but not the operation: the caller
    that knows it (a producer: WRITE) says it, else the usual one for that kind of resource. A
    refusal kafka-python wrapped in a plain ``KafkaError`` (a transaction's offset commit) is
    known by the error's name in its text, without the resource's name."""
    text = str(exc)
    found = next(((t, k, op) for t, k, op in _DENIED_KINDS if isinstance(exc, t) or t.__name__ in text), None)
    kind, usual = (found[1], found[2]) if found else ("resource", "access")
    raw = exc.args[0] if exc.args and found and isinstance(exc, found[0]) else ""
    if isinstance(raw, (set, frozenset, list, tuple)):
        names = names or raw
    elif raw and not names and " " not in str(raw).strip():  # a name, not a request's text
        names = (str(raw).strip("{}' "),)
    name = ", ".join(sorted(names))
    short = " ".join(text.split()) if len(text) < 200 else type(exc).__name__
    what = f"{kind} {name}" if name else f"a {kind} (the broker said: {short})"
    who = f"principal User:{user}" if user else "this client (no SASL user)"
    return BrokerError(
        f"not authorized: the Kafka broker refused {who} {operation or usual} on {what}: "
        "no ACL grants it; run this stage with its own role's credentials, or grant the role that permission "
        "(`specstream acls`, infra/acls.sh)"
    )


def _user_of(settings: KafkaSettings | None) -> str | None:
    return None if settings is None else settings.client_options.get("sasl_plain_username")


def _fenced_error(error: BaseException, text: str) -> FencedError:
    """``FencedError`` for one of kafka-python's fencing errors; ``same_id``: our producer epoch
    was bumped (a newer instance, or the broker's timeout abort), not our group generation."""
    return FencedError(text, same_id=isinstance(error, (ProducerFencedError, InvalidProducerEpochError)))


def _translation(
    exc: KafkaError, settings: KafkaSettings | None = None, operation: str = "", names: Iterable[str] = ()
) -> Exception:
    """kafka-python's exception as the contract's: ``FencedError`` or ``TransportError``; an ACL
    refusal is a ``BrokerError`` (a setting is wrong: retrying cannot help)."""
    if isinstance(exc, _FENCED):
        return _fenced_error(exc, f"{type(exc).__name__}: {exc}")
    if isinstance(exc, AuthorizationError) or "AuthorizationFailedError" in str(exc):
        return denied(exc, _user_of(settings), operation, names)
    return TransportError(f"{type(exc).__name__}: {exc}", retriable=bool(exc.retriable))


@contextlib.contextmanager
def _translated(
    settings: KafkaSettings | None = None, operation: str = "", names: Iterable[str] = ()
) -> Iterator[None]:
    """Raise :func:`_translation` of any kafka-python error in the block."""
    try:
        yield
    except KafkaError as exc:
        raise _translation(exc, settings, operation, names) from exc


logger = logging.getLogger(__name__)
_R = TypeVar("_R")

_CLIENTS: tuple[type[Any], ...] = (KafkaProducer, KafkaConsumer, KafkaAdminClient)
_KNOWN = frozenset(name for client in _CLIENTS for name in client.DEFAULT_CONFIG)
# Kafka (Java client / librdkafka) property names whose kafka-python name is not simply the one
# with underscores for dots.
_ALIASES = {
    "sasl.username": "sasl_plain_username",
    "sasl.password": "sasl_plain_password",
    "ssl.ca.location": "ssl_cafile",
    "ssl.certificate.location": "ssl_certfile",
    "ssl.key.location": "ssl_keyfile",
    "ssl.key.password": "ssl_password",
    "ssl.crl.location": "ssl_crlfile",
    "ssl.cipher.suites": "ssl_ciphers",
    "ssl.endpoint.identification.algorithm": "ssl_check_hostname",
}
# Set by specstream itself: exactly-once and the run's layout depend on them.
_OWNED = {
    "bootstrap_servers": "set broker.bootstrap_servers instead",
    "transaction_timeout_ms": "set broker.transaction_timeout_ms instead",
    "session_timeout_ms": "set broker.session_timeout_ms instead",
    **dict.fromkeys(
        ("transactional_id", "group_id", "isolation_level", "enable_auto_commit", "enable_idempotence",
         "auto_offset_reset", "allow_auto_create_topics", "linger_ms", "retry_backoff_ms", "max_request_size",
         "max_poll_records", "max_poll_interval_ms", "heartbeat_interval_ms", "max_partition_fetch_bytes",
         "key_serializer", "value_serializer", "key_deserializer", "value_deserializer"),
        "remove it: specstream sets it for exactly-once delivery",
    ),
}  # fmt: skip
_PYTHON_OBJECTS = frozenset(
    {"ssl_context", "selector", "kafka_client", "metric_reporters", "sasl_oauth_token_provider", "socket_options",
     "partitioner", "default_offset_commit_callback"}
)  # fmt: skip


def kafka_client_options(options: Mapping[str, Any], *, key: str = "client_options") -> dict[str, Any]:
    """Client options by kafka-python's names, from Kafka's property names or kafka-python's.

    An option no kafka-python client knows, one specstream sets itself, one that needs a Python
    object, or one given twice is a ``ConfigError`` naming ``<key>.<option>`` and the fix.
    """
    out: dict[str, Any] = {}
    for name, value in options.items():
        where = f"{key}.{name}"
        native = _ALIASES.get(name, name.replace(".", "_").replace("-", "_"))
        if native not in _KNOWN:
            raise ConfigError(where, "is not a Kafka client option", _closest_option(name))
        if native in _OWNED:
            raise ConfigError(where, "is not a client option you can set here", _OWNED[native])
        if native in _PYTHON_OBJECTS:
            raise ConfigError(where, "takes a Python object, which a config file cannot hold", "remove it")
        if native in out:
            raise ConfigError(where, f"sets {native} a second time", "keep one of the two spellings")
        if name == "ssl.endpoint.identification.algorithm":
            value = str(value).lower() == "https"
        _check_value(where, native, value)
        out[native] = value
    _check_sasl(key, out)
    return out


_CHOICES = {
    "security_protocol": ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    "sasl_mechanism": tuple(sorted(SASL_MECHANISMS)),
}


def _check_value(where: str, native: str, value: Any) -> None:
    """The value's type is the one of kafka-python's default; an enumerated option takes one of its values.

    kafka-python does not refuse a wrong value when a client is made: it fails on its network
    thread and the bootstrap times out, as if no broker answered.
    """
    choices = _CHOICES.get(native)
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value).upper(), choices, n=1, cutoff=0.6)
        hint = f"did you mean `{close[0]}`? " if close else ""
        raise ConfigError(where, f"{value!r} is not one of {', '.join(choices)}", f"{hint}use one of those")
    default = next(c.DEFAULT_CONFIG[native] for c in _CLIENTS if native in c.DEFAULT_CONFIG)
    if isinstance(default, bool):
        fits, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, (int, float)):
        fits, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        fits, kind = isinstance(value, str), "a string"
    else:  # None, lists, classes: kafka-python's own checks
        return
    if not fits:
        raise ConfigError(
            where, f"is {value!r} but takes {kind}", f"write {kind} (kafka-python's default: {default!r})"
        )


def _check_sasl(key: str, options: Mapping[str, Any]) -> None:
    """A SASL protocol needs a mechanism; PLAIN and SCRAM need a username and a password."""
    protocol = options.get("security_protocol", "PLAINTEXT")
    mechanism = options.get("sasl_mechanism")
    if protocol.startswith("SASL") and mechanism is None:
        raise ConfigError(f"{key}.sasl.mechanism", f"is required with security.protocol {protocol}",
                          f"set it to the broker's mechanism ({', '.join(_CHOICES['sasl_mechanism'])})")  # fmt: skip
    if mechanism is not None and not protocol.startswith("SASL"):
        raise ConfigError(f"{key}.security.protocol", f"is {protocol}, so sasl.mechanism {mechanism} is never used",
                          "set security.protocol to SASL_SSL or SASL_PLAINTEXT")  # fmt: skip
    if mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        for option, native in (
            ("sasl.username", "sasl_plain_username"),
            ("sasl.password", "sasl_plain_password"),
        ):
            if not options.get(native):
                raise ConfigError(f"{key}.{option}", f"is required with sasl.mechanism {mechanism}",
                                  f"set it (a secret as ${{VAR}}: `{option}: ${{KAFKA_PASSWORD}}`)")  # fmt: skip


def _closest_option(name: str) -> str:
    spellings = {n.replace("_", "."): n for n in _KNOWN} | dict.fromkeys(_KNOWN) | dict.fromkeys(_ALIASES)
    close = difflib.get_close_matches(name, list(spellings), n=1, cutoff=0.6)
    if close:
        return f"did you mean `{close[0]}`?"
    return "use Kafka's property names (security.protocol, sasl.mechanism, sasl.username, ssl.cafile, ...)"


@dataclass(frozen=True)
class KafkaSettings:
    """Where the broker is, plus client options (security: SASL/SSL), by kafka-python's names."""

    bootstrap_servers: str
    client_options: Mapping[str, Any] = field(default_factory=dict)
    request_timeout_ms: int = 30_000
    bootstrap_timeout_ms: int = 15_000
    #: Where the address came from (a config key, a flag, an environment variable): named when
    #: no broker answers there.
    origin: str = ""
    #: How long every client rides out an unreachable broker before the process gives up.
    outage_budget_s: float = DEFAULT_OUTAGE_BUDGET_S
    rebalance_callbacks_may_wait: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "client_options", kafka_client_options(self.client_options))

    # The transport factories: components take "a transport" (this, or pipeline.memory.MemoryBroker
    # for single-process runs without Kafka) and open their clients through these.

    def admin(self) -> KafkaAdmin:
        """Topic administration and offset queries on this cluster."""
        return KafkaAdmin(self)

    def transactional_producer(
        self,
        transactional_id: str,
        *,
        linger_ms: int = 5,
        transaction_timeout_ms: int = 60_000,
        writes: Collection[str] = (),
    ) -> TransactionalProducer:
        """An exactly-once producer; fences any earlier instance with the same id."""
        return TransactionalProducer(
            self, transactional_id, linger_ms=linger_ms, transaction_timeout_ms=transaction_timeout_ms,
            writes=writes,
        )  # fmt: skip

    def plain_producer(self, *, linger_ms: int = 5) -> PlainProducer:
        """An idempotent producer for records that need no transaction."""
        return PlainProducer(self, linger_ms=linger_ms)

    def reader(self, topic: str, **options: Unpack[ReaderOptions]) -> PartitionReader:
        """A ``read_committed`` consumer of fixed partitions, or a member of ``group_id``."""
        return PartitionReader(self, topic, **options)

    def ride_out(
        self, call: Callable[[], _R], what: str, *, also_retry: tuple[type[BaseException], ...] = ()
    ) -> _R:
        """``call()`` in the contract's errors, retried through a broker outage up to the budget."""

        def translated() -> _R:
            with _translated(self):
                return call()

        return ride_out(translated, what=what, where=self.bootstrap_servers, budget_s=self.outage_budget_s,
                        also_retry=also_retry)  # fmt: skip

    def common(self, client: type[Any]) -> dict[str, Any]:
        """Options for one kafka-python client class: the ones it knows (e.g. no consumer settings
        for a producer)."""
        options = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "request_timeout_ms": self.request_timeout_ms,
            "bootstrap_timeout_ms": self.bootstrap_timeout_ms,
            # A restarted broker is found within 5 s (kafka-python's 30 s cap outlasts many restarts).
            "reconnect_backoff_max_ms": 5_000,
            **dict(self.client_options),
        }
        return {k: v for k, v in options.items() if k in client.DEFAULT_CONFIG}


_Client = TypeVar("_Client")


def _connect(factory: Callable[[], _Client], settings: KafkaSettings) -> _Client:
    """Open a kafka-python client; a bootstrap that fails becomes one BrokerError line that says why.

    A process that has reached the broker before rides out an outage here too (a client opened
    mid-run, while the broker restarts); at start, or with no outage budget, a failure is an error at
    once, worded by what the client saw.
    """
    if _reached.is_set() and settings.outage_budget_s > 0:
        refused: list[BrokerError] = []

        def attempt() -> _Client | None:
            try:
                return _connect_once(factory, settings)
            except _Refused as exc:  # wrong credentials: waiting cannot help
                refused.append(exc)
                return None

        client = settings.ride_out(attempt, "connecting", also_retry=(BrokerError,))
        if refused:
            raise refused[-1]
        assert client is not None
        return client
    client = _connect_once(factory, settings)
    _reached.set()
    return client


_reached = threading.Event()  # set once any client of this process has reached the broker


class _Refused(BrokerError):
    """The broker answered and refused the credentials (or the SASL mechanism): not an outage."""


def _connect_once(factory: Callable[[], _Client], settings: KafkaSettings) -> _Client:
    seen = _ConnectionErrors()
    network = logging.getLogger("kafka.net")
    network.addHandler(seen)
    try:
        return factory()
    except KafkaTimeoutError as exc:
        if "bootstrap" not in str(exc):
            raise
        raise _bootstrap_failure(settings, seen.errors, lost_answers=seen.lost_answers) from None
    finally:
        network.removeHandler(seen)


class _ConnectionErrors(logging.Handler):
    """What went wrong on kafka-python's network thread: it logs each failed bootstrap attempt
    (wrong password, wrong protocol) and retries until the timeout, which is all it raises."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[BaseException] = []
        self.lost_answers: set[int] = set()  # SASL requests whose connection closed before their answer

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.args, tuple):
            self.errors.extend(arg for arg in record.args if isinstance(arg, BaseException))
            for arg in record.args:
                self.lost_answers |= _unanswered_sasl(arg)


_SASL_HANDSHAKE = 17  # the API key of SaslHandshake, the request that names the mechanism
_SASL_AUTHENTICATE = 36  # the API key of SaslAuthenticate, the request that carries the credentials


def _unanswered_sasl(connection: object) -> set[int]:
    """The SASL requests (API keys) that ``connection``, a kafka-python connection logged as it is
    lost, still waited to have answered. A Kafka broker refuses a mechanism or credentials by
    answering, then closing the connection; under load the close can come first and the client sees
    only a disconnect (Kafka 4.3 seen here: a wrong password about 1 run in 4 on a busy 2-core
    machine; a mechanism the listener lacks, once in CI, on every retry)."""
    pending = getattr(getattr(connection, "parser", None), "in_flight_requests", ())
    keys = {getattr(header, "request_api_key", None) for header in list(pending)}
    return {key for key in keys if key in (_SASL_HANDSHAKE, _SASL_AUTHENTICATE)}


_LOOPBACK = ("127.", "localhost", "::1", "[::1]", "0.0.0.0")


def _bootstrap_failure(
    settings: KafkaSettings, errors: list[BaseException], *, lost_answers: Collection[int] = ()
) -> BrokerError:
    """Why no client could be made: authentication, a protocol mismatch, or no broker at all.

    A refusal the broker answered is a ``_Refused``: waiting cannot help. ``lost_answers``: SASL
    requests whose connection closed before their answer, which is how a refusal looks when the
    broker's close overtakes its answer. That inferred refusal is a plain BrokerError, because a
    broker going down mid-login looks the same: a process that reached the broker rides it out."""
    where = settings.bootstrap_servers
    first = {type(e): e for e in reversed(errors)}
    auth = first.get(SaslAuthenticationFailedError)
    if auth is not None:
        said = str(auth.args[0]).removeprefix("SaslAuthenticationFailedError: ") if auth.args else "refused"
        return _Refused(_authentication_failed(settings, said))
    if UnsupportedSaslMechanismError in first:
        return _Refused(_mechanism_not_enabled(settings, ""))
    if IllegalSaslStateError in first:
        return _Refused(
            f"the Kafka broker at {where}{_origin(settings)} answered, but that listener does not speak SASL: set "
            "broker.client_options.security.protocol to the listener's (PLAINTEXT or SSL), or use its SASL listener"
        )
    if lost_answers and _answers(where):
        if _SASL_AUTHENTICATE in lost_answers:
            return BrokerError(_authentication_failed(settings, _CLOSED_AT_LOGIN))
        return BrokerError(_mechanism_not_enabled(settings, _CLOSED_AT_HANDSHAKE))
    return BrokerError(_unreached(settings, errors))


_CLOSED_AT_LOGIN = "it closed the connection on receiving the credentials, as Kafka does when it refuses them"
_CLOSED_AT_HANDSHAKE = (
    "it closed the connection on receiving the SASL handshake, as Kafka does when the listener lacks the mechanism"
)


def _origin(settings: KafkaSettings) -> str:
    return f" (from {settings.origin})" if settings.origin else ""


def _authentication_failed(settings: KafkaSettings, said: str) -> str:
    options = settings.client_options
    user = options.get("sasl_plain_username")
    return (
        f"the Kafka broker at {settings.bootstrap_servers}{_origin(settings)} answered, but authentication failed"
        + (f" for user {user!r}" if user else "")
        + f" (SASL {options.get('sasl_mechanism')}): {said}: check broker.client_options "
        "sasl.username and sasl.password (and sasl.mechanism) against the broker's users"
    )


def _mechanism_not_enabled(settings: KafkaSettings, said: str) -> str:
    return (
        f"the Kafka broker at {settings.bootstrap_servers}{_origin(settings)} answered, but its listener does not "
        f"enable SASL mechanism {settings.client_options.get('sasl_mechanism')}: "
        + (f"{said}: " if said else "")
        + "set broker.client_options.sasl.mechanism to one it enables"
    )


def _unreached(settings: KafkaSettings, errors: list[BaseException]) -> str:
    """No answer at all: nothing listens, or something that is not the Kafka listener configured."""
    where = settings.bootstrap_servers
    origin = _origin(settings)
    options = settings.client_options
    hosts = [server.strip().rpartition(":")[0] for server in where.split(",")]
    failures = [e for e in errors if not isinstance(e, KafkaTimeoutError)]  # the timeout is what we explain
    notes = [f"from {settings.origin}"] if settings.origin else []
    if failures:
        notes.append(f"last error: {failures[-1]}")
    origin_and_last = f" ({'; '.join(notes)})" if notes else ""
    if not _answers(where):
        if all(host.startswith(_LOOPBACK) for host in hosts):
            return (
                f"no Kafka broker answers at {where}{origin}: start the local broker with `specstream broker "
                "start`, or use a running broker's address"
            )
        return (
            f"no Kafka broker answers at {where}{origin_and_last}: check the address, that the broker is up, and "
            "that this machine can reach it (firewall, VPN, DNS)"
        )
    return (
        f"something at {where} accepts connections, but no Kafka handshake completed within "
        f"{options.get('bootstrap_timeout_ms', settings.bootstrap_timeout_ms) / 1000:.0f} s{origin_and_last}: check that it is a Kafka listener and that "
        f"broker.client_options.security.protocol ({options.get('security_protocol', 'PLAINTEXT')}) is the listener's"
    )


def _answers(servers: str, timeout_s: float = 2.0) -> bool:
    """Whether any bootstrap address accepts a TCP connection (bounded: ``timeout_s`` each)."""
    for server in servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
                return True
        except (OSError, ValueError):
            continue
    return False


class KafkaAdmin:
    """Topic administration and offset queries for one run."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self._admin: KafkaAdminClient = _connect(
            lambda: KafkaAdminClient(**settings.common(KafkaAdminClient)), settings
        )

    def __enter__(self) -> KafkaAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._admin.close()

    def topics(self) -> set[str]:
        return self.settings.ride_out(lambda: set(self._admin.list_topics()), "listing topics")

    def _described(self, topic: str) -> dict[str, Any] | None:
        described = self.settings.ride_out(
            lambda: self._admin.describe_topics([topic]), f"describing {topic}"
        )
        for entry in described:
            if entry.get("error_code", 0) == 0 and entry.get("name") == topic:
                return dict(entry)
        return None

    def partition_count(self, topic: str) -> int | None:
        entry = self._described(topic)
        return None if entry is None else len(entry.get("partitions", []))

    def topic_id(self, topic: str) -> str | None:
        """The broker's id of this incarnation of the topic (a re-created topic gets a new one)."""
        entry = self._described(topic)
        return None if entry is None else str(entry.get("topic_id") or "") or None

    def ensure_topics(
        self,
        specs: Mapping[str, int | TopicSpec],
        *,
        configs: Mapping[str, Mapping[str, str]] | None = None,
    ) -> list[str]:
        """Create missing topics; refuse existing ones whose partition count differs.

        A ``TopicSpec`` also gives the replicas and configs (``configs`` then adds to them).
        Returns the topics that were created (an empty list means they all existed).
        """
        wanted = {name: s if isinstance(s, TopicSpec) else TopicSpec(s) for name, s in specs.items()}
        configs = configs or {}
        existing = self.topics()
        missing = {name: s for name, s in wanted.items() if name not in existing}
        for name, spec in wanted.items():
            if name in existing:
                have = self.partition_count(name)
                if have != spec.partitions:
                    raise RunMismatchError(
                        f"topic {name} exists with {have} partitions, this run needs {spec.partitions}"
                        + (" (Kafka cannot decrease a topic's partitions)" if (have or 0) > spec.partitions else "")
                        + ": use another run id, or delete the old run's topics"
                    )
        if missing:
            request = {
                name: {
                    "num_partitions": spec.partitions,
                    # None: the broker's default.replication.factor
                    "replication_factor": spec.replication_factor or -1,
                    "configs": {**spec.configs, **configs.get(name, {})},
                }
                for name, spec in missing.items()
            }
            try:
                with _translated(self.settings, "CREATE", missing):
                    self._admin.create_topics(request, wait_for_metadata=True)
            except TransportError as exc:
                if isinstance(exc.__cause__, InvalidReplicationFactorError):
                    raise self._replication_error(max(s.replication_factor or 0 for s in missing.values())) from None
                if not isinstance(exc.__cause__, TopicAlreadyExistsError):
                    raise
                return self.ensure_topics(specs, configs=configs)  # a concurrent creator won the race
        return sorted(missing)

    def _replication_error(self, asked: int) -> ConfigError:
        brokers = len(self.settings.ride_out(self._admin.describe_cluster, "describing the cluster").get("brokers", []))
        return ConfigError(
            "topics.replication_factor",
            f"{asked} replicas asked, but the cluster has {brokers} broker(s)",
            f"set it to at most {brokers} (null: the broker's default), or add brokers",
        )

    def ensure_run_topics(self, topics: RunTopics, partitions: int, policy: TopicPolicy | None = None) -> list[str]:
        """The run's topics as :func:`run_topic_plan` says (default: keep everything, the
        manifest and heartbeats compacted)."""
        return self.ensure_topics(run_topic_plan(topics, partitions, policy))

    def replication_factor(self, topic: str) -> int | None:
        """Replicas of the topic's first partition (None: no such topic)."""
        entry = self._described(topic)
        parts = (entry or {}).get("partitions") or []
        return len(parts[0].get("replica_nodes") or []) if parts else None

    def topic_configs(self, topic: str, keys: Iterable[str]) -> dict[str, str | None]:
        """The topic's effective values of ``keys`` (defaults included)."""
        resource = ConfigResource(ConfigResourceType.TOPIC, topic)
        found = self.settings.ride_out(
            lambda: self._admin.describe_configs([resource], config_filter="all"), f"configs of {topic}"
        )
        entries = found.get("topic", {}).get(topic, {}) if isinstance(found, dict) else {}
        return {k: (entries.get(k) or {}).get("value") for k in keys}

    def alter_topic_configs(self, topic: str, values: Mapping[str, str]) -> None:
        """Set these configs on the topic (incremental: the topic's other configs stay)."""
        resource = ConfigResource(
            ConfigResourceType.TOPIC, topic, configs={k: (AlterConfigOp.SET, v) for k, v in values.items()}
        )
        with _translated(self.settings, "ALTER_CONFIGS"):
            self._admin.alter_configs([resource], incremental=True)

    def create_acls(self, bindings: Iterable[Binding]) -> int:
        """Add ALLOW bindings (an existing one is kept); the count added. Needs an admin principal
        (a super user, or ALTER on the cluster)."""
        acls = [
            ACL(b.principal, "*", ACLOperation[b.operation], ACLPermissionType.ALLOW,
                ResourcePattern(ResourceType[b.resource.upper().replace("-", "_")], b.name,
                                ACLResourcePatternType.PREFIXED if b.prefixed else ACLResourcePatternType.LITERAL))
            for b in bindings
        ]  # fmt: skip
        with _translated(self.settings, "ALTER"):
            result = self._admin.create_acls(acls)
        failed = result.get("failed", [])
        if failed:
            acl, error = failed[0][:2]
            raise (
                denied(error, _user_of(self.settings), "ALTER")
                if isinstance(error, AuthorizationError)
                else BrokerError(f"creating {len(failed)} ACLs failed, the first ({acl}): {error}")
            )
        return len(acls)

    def upsert_scram_users(self, users: Mapping[str, str]) -> None:
        """Create or change SCRAM-SHA-512 credentials (a password is sent, never logged)."""
        changes = [UserScramCredentialUpsertion(u, ScramMechanism.SCRAM_SHA_512, p) for u, p in users.items()]
        with _translated(self.settings, "ALTER"):
            errors = self._admin.alter_user_scram_credentials(changes)
        bad = {user: error for user, error in errors.items() if error}
        if bad:
            raise BrokerError(f"storing SCRAM credentials failed: {bad}")

    def delete_topics(self, names: Iterable[str]) -> None:
        names = [n for n in names if n in self.topics()]
        if names:
            with _translated(self.settings, "DELETE"):
                self._admin.delete_topics(names)

    def group_ids(self) -> set[str]:
        """Every consumer group the cluster knows (with committed offsets or members)."""
        groups = self.settings.ride_out(lambda: self._admin.list_groups(), "the consumer groups")
        return {g["group_id"] for g in groups}

    def delete_groups(self, group_ids: Iterable[str]) -> None:
        """Delete consumer groups and their committed offsets; one that has members is an error."""
        group_ids = list(group_ids)
        if not group_ids:
            return
        with _translated(self.settings, "DELETE"):
            results = self._admin.delete_groups(group_ids)
        failed = {g: why for g, why in results.items() if why not in ("OK", "GroupIdNotFoundError")}
        if failed:
            raise BrokerError(f"deleting consumer groups failed: {failed} (a group with members is in use)")

    def end_offsets(
        self, topic: str, partitions: Iterable[int], *, committed_only: bool = True
    ) -> dict[int, int]:
        """Per partition, the offset after the last record (``read_committed``: the LSO)."""
        isolation = IsolationLevel.READ_COMMITTED if committed_only else IsolationLevel.READ_UNCOMMITTED
        specs = {TopicPartition(topic, p): OffsetSpec.LATEST for p in partitions}
        result = self.settings.ride_out(
            lambda: self._admin.list_partition_offsets(specs, isolation_level=isolation),
            f"end offsets of {topic}",
        )
        return {tp.partition: _offset_of(value) for tp, value in result.items()}

    def group_offsets(self, group_id: str, topic: str) -> dict[int, Committed]:
        result = self.settings.ride_out(
            lambda: self._admin.list_group_offsets({group_id: None}).get(group_id, {}),
            f"offsets of group {group_id}",
        )
        return {
            tp.partition: Committed(om.offset, om.metadata or "")
            for tp, om in result.items()
            if tp.topic == topic and om.offset >= 0
        }


    def end_hanging_transactions(self, topics: Iterable[str], idle_s: float) -> list[str]:
        """End, as their coordinator ended them, the transactions these topics' partitions (and the
        group offsets topic) still hold open although their coordinator is done with them; one line
        for the log per transaction.

        Kafka 4.3 on one node, restarted after a SIGKILL, runs its coordinators on its old
        registration until the controller expires that session (``broker.session.timeout.ms``):
        the markers they send meanwhile cannot reach the node's own listener, and once the old
        registration is fenced its partitions have no leader and the markers are skipped ("likely
        deleted already"). Both a transaction that timed out while it was down (aborted) and one
        committed just before the kill (completed from the log) are left open on their partitions
        for ever, holding back read_committed readers and stable offset fetches. One is ended here
        only when its producer has not written to the partition for ``idle_s``, its coordinator holds
        no live transaction of that producer on it, and the coordinator's log says how it ended
        (``transaction_log.decided``); the marker is the one the coordinator failed to write.
        One whose end the log does not show is left open and said so: a wrong guess loses or
        repeats what it carried.
        """
        suspects = self._idle_open_transactions([*topics, "__consumer_offsets"], idle_s)
        if not suspects:
            return []
        pids = sorted({state.producer_id for _, state in suspects})
        listed = self.settings.ride_out(lambda: self._admin.list_transactions(producer_id_filters=pids),
                                        "listing transactions")  # fmt: skip
        by_pid = {row.producer_id: row for rows in listed.values() for row in rows}
        live = [row.transactional_id for row in by_pid.values() if row.state in _LIVE_TRANSACTION]
        described = self.settings.ride_out(lambda: self._admin.describe_transactions(live), "describing transactions")
        steps: dict[str, list[TransactionStep] | str] = {}
        ended = []
        for tp, state in suspects:
            row = by_pid.get(state.producer_id)
            held = described.get(row.transactional_id) if row is not None else None
            if held is not None and tp in held.topic_partitions:
                continue  # its coordinator still ends it: not hanging
            if (tp, state) not in self._idle_open_transactions([tp.topic], idle_s, [tp.partition]):
                continue  # ended, or written to, since it was read: not hanging
            start = state.current_transaction_start_offset
            named = f"{row.transactional_id}: {row.state.value}" if row else "unknown: no transaction"
            where = (f"{tp.topic}-{tp.partition}: records from offset {start} of producer {state.producer_id} "
                     f"(epoch {state.producer_epoch}, transactional id {named})")  # fmt: skip
            if row is not None and row.transactional_id not in steps:
                steps[row.transactional_id] = self._logged_steps(row.transactional_id)
            logged = steps.get(row.transactional_id, "no transactional id has this producer") if row else None
            committed = None if not isinstance(logged, list) else decided(
                logged, tp.topic, tp.partition, state.producer_id, state.producer_epoch)  # fmt: skip
            if committed is None:
                why = logged if isinstance(logged, str) else "its coordinator's log does not say how it ended"
                ended.append(f"a transaction its coordinator ended is left open ({why}): {where}; an "
                             "administrator who knows it was not committed ends it with `kafka-transactions "
                             f"abort --topic {tp.topic} --partition {tp.partition} --start-offset {start}`")  # fmt: skip
                continue
            spec = AbortTransactionSpec(tp, state.producer_id, state.producer_epoch, state.coordinator_epoch)
            self.settings.ride_out(lambda spec=spec: self._write_marker(spec, committed),
                                   f"ending a transaction on {tp.topic}")  # fmt: skip
            outcome = "committed" if committed else "aborted"
            ended.append(f"{outcome} a transaction its coordinator had {outcome} but left open: {where}")
        return ended

    def _logged_steps(self, transactional_id: str) -> list[TransactionStep] | str:
        """Every step the transaction coordinator logged for ``transactional_id``, oldest first;
        why not, where the log cannot be read (e.g. not authorised)."""
        count = self.partition_count(TRANSACTION_LOG)
        if not count:
            return f"{TRANSACTION_LOG} is not described"
        tp = TopicPartition(TRANSACTION_LOG, coordinator_partition(transactional_id, count))
        options = {"enable_auto_commit": False, **self.settings.common(KafkaConsumer)}
        try:
            consumer = _connect(lambda: KafkaConsumer(**options), self.settings)
        except SpecstreamError as exc:
            return f"its log not read: {exc}"
        try:
            consumer.assign([tp])
            consumer.seek_to_beginning(tp)
            end = consumer.end_offsets([tp])[tp]
            found, patience = [], self.settings.request_timeout_ms / 1000
            last_progress = time.monotonic()
            while consumer.position(tp) < end:
                batch = consumer.poll(timeout_ms=500).get(tp, [])
                if batch:
                    last_progress = time.monotonic()
                elif time.monotonic() - last_progress > patience:
                    return f"its log not read: no record of {tp.topic}-{tp.partition} for {patience:.0f} s"
                for record in batch:
                    step = decode_value(record.value) if decode_key(record.key) == transactional_id else None
                    if step is not None:
                        found.append(step)
            return found
        except KafkaError as exc:  # e.g. not authorised to read the internal topic
            return f"its log not read: {exc}"
        finally:
            consumer.close()

    def _write_marker(self, spec: AbortTransactionSpec, committed: bool) -> None:
        """Write a commit or abort marker for one producer's open transaction on one partition.
        kafka-python's admin writes abort markers only (``abort_transaction``); a commit marker is
        the same WriteTxnMarkers request with the other result, sent the same way (its internals,
        pinned by the ``<3.1`` requirement, exercised by ``tests/faults/test_hanging_transaction.py``)."""
        admin = self._admin

        async def write() -> None:
            leaders = await admin._async_get_leader_for_partitions([spec.topic_partition])
            request = admin._abort_transaction_request(spec)
            request.markers[0].transaction_result = committed
            response = await admin._manager.send(request, node_id=next(iter(leaders)))
            admin._abort_transaction_process_response(response, spec)

        admin._manager.run(write)

    def _idle_open_transactions(
        self, topics: Iterable[str], idle_s: float, partitions: Iterable[int] | None = None
    ) -> list[tuple[TopicPartition, Any]]:
        """(partition, producer state) of every transaction open on these partitions whose producer
        last wrote there ``idle_s`` or more ago. A topic the broker will not describe is skipped."""
        found = []
        now_ms = time.time() * 1000
        for topic in dict.fromkeys(topics):
            chosen = list(partitions) if partitions is not None else range(self.partition_count(topic) or 0)
            tps = [TopicPartition(topic, p) for p in chosen]
            try:
                states = self.settings.ride_out(lambda tps=tps: self._admin.describe_producers(tps),
                                                f"describing producers of {topic}")  # fmt: skip
            except (TransportError, BrokerError) as exc:  # e.g. not authorised to describe it: no answer
                logger.info("open transactions on %s not checked: %s", topic, exc)
                continue
            for tp, described in states.items():
                found += [(tp, state) for state in described.active_producers
                          if state.current_transaction_start_offset >= 0
                          and now_ms - state.last_timestamp >= idle_s * 1000]  # fmt: skip
        return found


_LIVE_TRANSACTION = (
    TransactionState.ONGOING,
    TransactionState.PREPARE_COMMIT,
    TransactionState.PREPARE_ABORT,
    TransactionState.PREPARE_EPOCH_FENCE,
)

def _offset_of(value: Any) -> int:
    """``list_partition_offsets`` answers with a struct or a dict depending on the version."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return int(value["offset"])
    return int(value.offset)


class TransactionalProducer:
    """Exactly-once publishing: records and consumed offsets commit together or not at all.

    Every step has a deadline (kafka-python's own ``commit_transaction``, ``abort_transaction``
    and ``send_offsets_to_transaction`` wait forever). A step that gets no answer within the
    outage budget, or a transaction the broker aborted because the outage outlasted
    ``transaction_timeout_ms``, leaves the producer in a state kafka-python cannot leave:
    :meth:`abort` then re-initialises it under the same transactional id, which completes or
    aborts whatever the old one had open, and the caller rewinds to its committed offsets (they
    say which of the two happened).

    A restarted broker can end a transaction and leave it open on partitions (see
    ``KafkaAdmin.end_hanging_transactions``); records written there next join it, and an abort
    of the next transaction would abort the ended one's records with them. So after every
    initialisation, before it writes, what is left open on the topics it ``writes`` (and on the
    group offsets) is ended as its coordinator ended it.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        transactional_id: str,
        *,
        linger_ms: int = 5,
        transaction_timeout_ms: int = 60_000,
        writes: Collection[str] = (),
    ) -> None:
        self.settings = settings
        self.transactional_id = transactional_id
        self._writes = list(writes)
        self._transaction_timeout_s = transaction_timeout_ms / 1000
        self._options = {
            "transactional_id": transactional_id,
            "transaction_timeout_ms": transaction_timeout_ms,
            "linger_ms": linger_ms,
            # The commit path (AddOffsets, TxnOffsetCommit, EndTxn) retries while the
            # coordinator completes the previous step; the 100 ms default made each
            # transaction ~260 ms, 20 ms makes it ~55 ms.
            "retry_backoff_ms": 20,
            "max_request_size": MAX_RECORD_BYTES,
            "allow_auto_create_topics": False,
            **settings.common(KafkaProducer),
        }
        self._producer: KafkaProducer = _connect(lambda: KafkaProducer(**self._options), settings)
        self._init_transactions()
        self.in_transaction = False
        self._begun_at = 0.0
        self._broken = False  # a step's outcome is unknown: only a re-initialisation helps
        self._fenced: FencedError | None = None  # another instance took our id: nothing helps

    def _init_transactions(self) -> None:
        """Fence any earlier instance with this id and complete or abort its open transaction."""
        self.settings.ride_out(
            self._producer.init_transactions, f"initialising transactions of {self.transactional_id}"
        )
        self._end_left_open()

    def _end_left_open(self) -> None:
        """End what the coordinator ended but a partition this producer writes holds open; no
        idle wait: right after initialisation nothing of this id is in flight."""
        if not self._writes:
            return
        try:
            with KafkaAdmin(self.settings) as admin:
                end_hanging(admin, self._writes, 0.0)
        except SpecstreamError as exc:  # no admin client now: the readers held up end it later
            logger.info("%s: transactions left open not checked: %s", self.transactional_id, exc)

    def _reopen(self) -> None:
        """A fresh producer under the same id (through an outage, up to the budget)."""
        old = self._producer
        with contextlib.suppress(Exception):  # its state is what we are leaving behind
            old.close(timeout=0, null_logger=True)

        def open_and_init() -> None:
            self._producer = _connect(lambda: KafkaProducer(**self._options), self.settings)
            with _translated(self.settings):
                self._producer.init_transactions()

        self.settings.ride_out(
            open_and_init, f"re-initialising {self.transactional_id}", also_retry=(BrokerError,)
        )
        self._broken = False
        logger.info(
            "%s: producer re-initialised; the open transaction was completed or aborted",
            self.transactional_id,
        )
        self._end_left_open()

    @contextlib.contextmanager
    def _step(self, what: str, operation: str = "") -> Iterator[None]:
        """Translate a transaction step's errors, judging any fencing by the broker's last word.

        kafka-python answers an epoch error on a produce request by asking the broker to bump
        our epoch (KIP-360), asynchronously: calls made meanwhile fail with a bare state error.
        The bump's outcome tells the two causes apart: refused, another instance took our id
        (fatal); granted, the broker had aborted our transaction on its timeout (the producer
        is re-initialised by :meth:`abort`, the caller rewinds)."""
        try:
            yield
        except KafkaError as exc:
            self._judge(_translation(exc, self.settings, operation), what, exc)

    def _judge(self, error: Exception, what: str, cause: BaseException) -> NoReturn:
        """Raise ``error`` as this producer's state reads it: fenced (another instance holds our
        id, or the broker aborted our transaction on its timeout), or as it is."""
        if isinstance(error, FencedError):
            try:
                self._fencing(error, what)
            except TransportError as judged:
                raise judged from cause
        fenced = self._settled_fencing()
        if fenced is None:
            raise error from cause
        if fenced.same_id:  # the broker refused our epoch bump: the newer instance stays
            self._fenced = fenced
        raise fenced from cause

    def _settled_fencing(self) -> FencedError | None:
        """The fencing error the transaction manager holds once a pending epoch bump is over:
        later calls report it only inside a plain ``KafkaError`` ("at least one previous
        transactional or idempotent request has failed"). Bounded by a request timeout: past
        it, the producer's state is unknown (broken)."""
        manager = self._producer._transaction_manager
        deadline = time.monotonic() + self.settings.request_timeout_ms / 1000
        tick = threading.Event()  # never set: a bounded wait for the IO thread's answer
        while manager.is_bumping_epoch() and time.monotonic() < deadline:
            tick.wait(0.02)
        if manager.is_bumping_epoch():
            self._broken = True
            return None
        error = manager.last_error
        if not (manager.has_error() and isinstance(error, _FENCED)):
            return None
        return _fenced_error(error, f"{type(error).__name__}: {error}")

    def begin(self) -> None:
        self._forget_stale_offset_commits()
        with self._step("beginning a transaction"):
            self._producer.begin_transaction()
        self.in_transaction = True
        self._begun_at = time.monotonic()

    def _forget_stale_offset_commits(self) -> None:
        """Drop consumed offsets a refused commit left queued in kafka-python's transaction manager.

        kafka-python 3.0.12 keeps the offsets of a TxnOffsetCommit the group refused (a stale
        generation: ``IllegalGenerationError``) after the transaction is aborted, and sends them
        again with the next transaction's offsets: a generator whose partitions moved would then
        commit a revoked partition's position, without the refs that went with it, and those
        samples are lost. The Java client clears them when a transaction ends; a transaction
        that begins has none of its own yet."""
        manager = self._producer._transaction_manager
        with manager._lock:
            stale = dict(manager._pending_txn_offset_commits)
            manager._pending_txn_offset_commits.clear()
        if stale:
            logger.info("%s: dropped %d consumed offsets a refused commit left queued: %s",
                        self.transactional_id, len(stale), sorted(f"{tp.topic}:{tp.partition}" for tp in stale))  # fmt: skip

    def send(self, topic: str, partition: int, value: bytes, key: bytes | None = None) -> Any:
        with self._step("sending", "WRITE"):
            return self._producer.send(topic, value=value, key=key, partition=partition)

    def commit(
        self,
        offsets: Mapping[tuple[str, int], Committed] | None = None,
        group: object = None,
    ) -> None:
        """Commit the open transaction, with the consumed offsets (next offset + metadata)."""
        manager = self._producer._transaction_manager  # the bounded form of kafka-python's calls
        if offsets:
            tps = {
                TopicPartition(t, p): OffsetAndMetadata(c.offset, c.metadata, -1)
                for (t, p), c in offsets.items()
            }
            self._await(
                "sending the consumed offsets", lambda: manager.send_offsets_to_transaction(tps, group)
            )
        self._await("committing", manager.begin_commit)
        self.in_transaction = False

    def _await(self, what: str, start: Callable[[], Any]) -> None:
        """One transaction step, bounded by the outage budget; a step that may have half-happened
        marks the producer for re-initialisation."""
        try:
            with self._step(what):
                result = start()
                self._producer._sender.wakeup()
                done = self._wait_for(result)
        except FencedError:
            raise
        except TransportError:
            self._broken = True
            raise
        if not done:
            self._broken = True
            raise TransportError(f"{what}: no answer from the broker", retriable=True)

    def _wait_for(self, result: Any) -> bool:
        """Wait for a step's answer: through an outage up to the budget, but once the broker
        accepts connections again for longer than a request timeout, stop waiting. A request in
        flight when the broker went away can be lost across kafka-python's reconnect, and its
        result then never completes: waiting out the whole budget for it stalled a resumed run
        for minutes. Re-initialising (the caller's abort) settles the transaction instead."""
        deadline = time.monotonic() + self.settings.outage_budget_s
        patience_s = self.settings.request_timeout_ms / 1000
        answering_since: float | None = None
        while True:
            slice_s = min(1.0, max(0.0, deadline - time.monotonic()))
            if result.wait(timeout_ms=int(slice_s * 1000)):
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            if not _answers(self.settings.bootstrap_servers, timeout_s=1.0):
                answering_since = None
            elif answering_since is None:
                answering_since = now
            elif now - answering_since > patience_s:
                logger.info(
                    "%s: the broker answers again but this transaction step has had no reply for "
                    "%.0f s (its request was lost in the outage); re-initialising",
                    self.transactional_id, now - answering_since,
                )  # fmt: skip
                return False

    def _fencing(self, exc: FencedError, what: str) -> NoReturn:
        """Raise what an epoch error in ``what`` means. Another instance took our id: remembered,
        so that :meth:`abort` does not re-initialise and fence that instance in turn (it stops us
        instead). The broker aborted our transaction on its timeout: retriable, by re-initialising."""
        if exc.same_id and self._timed_out():
            self._broken = True
            raise TransportError(
                f"{what}: the transaction stayed open past transaction_timeout_ms ({self._transaction_timeout_s:.0f} s) "
                "while the broker was unreachable, so the broker aborted it",
                retriable=True,
            ) from exc
        if exc.same_id:
            self._fenced = exc
        raise exc

    def _timed_out(self) -> bool:
        """Whether an epoch error means "the broker aborted our transaction on its timeout"
        (it was open that long, and the network failed meanwhile) rather than "another process
        took our id": the first is recovered by re-initialising, the second must stop us."""
        open_s = time.monotonic() - self._begun_at
        return open_s > self._transaction_timeout_s and _NETWORK.failed_since(self._begun_at)

    def abort(self) -> None:
        """Abort the open transaction; a producer in an unknown state is re-initialised instead
        (which aborts it just the same). A fenced producer raises ``FencedError``."""
        if not self.in_transaction and not self._broken:
            return
        self.in_transaction = False
        if self._fenced is not None:  # re-initialising would fence the instance that took our id
            raise self._fenced
        if not self._broken:
            try:
                self._await("aborting", self._producer._transaction_manager.begin_abort)
                return
            except FencedError:
                raise  # another instance holds our id: re-initialising would fence it in turn
            except TransportError as exc:
                logger.info("%s: abort failed (%s); re-initialising the producer", self.transactional_id, exc)
        self._reopen()

    def flush(self, timeout: float | None = 10.0) -> None:
        """Push sent records to the broker now (they stay invisible until commit)."""
        with _translated(self.settings, "WRITE"):
            self._producer.flush(timeout=timeout)

    def close(self, timeout_s: float = 10.0) -> None:
        if self.in_transaction and not self._broken:
            try:  # closing anyway: the broker aborts it on timeout
                self._await("aborting on close", self._producer._transaction_manager.begin_abort)
            except TransportError as exc:
                logger.warning("abort on close failed: %s", exc)
        self.in_transaction = False
        _close_quietly(self._producer, timeout_s)


def _close_quietly(producer: KafkaProducer, timeout_s: float) -> None:
    """Close a producer; with the broker gone its final flush times out, which changes nothing.

    kafka-python's ``close`` flushes first and raises before it stops its sender; its exit hook
    and ``__del__`` would then flush again at interpreter exit and print a traceback. So a close
    whose flush failed stops the sender itself, and marks the producer closed.
    """
    try:
        producer.close(timeout=timeout_s)
    except KafkaError as exc:
        logger.info("producer closed with records undelivered: %s", exc)
        sender = getattr(producer, "_sender", None)
        if sender is not None and sender.is_alive():
            sender.force_close()
        producer._closed = True  # kafka-python's own flag: no second close at exit
        with contextlib.suppress(Exception):
            producer.close(timeout=0, null_logger=True)


class _NetworkTrouble(logging.Handler):
    """When kafka-python's network thread last failed to reach a broker (it logs, never raises)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.last = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        self.last = time.monotonic()

    def failed_since(self, moment: float) -> bool:
        return self.last >= moment


_NETWORK = _NetworkTrouble()
logging.getLogger("kafka.net").addHandler(_NETWORK)


#: A plain producer looks over its unflushed futures when this many have piled up.
_PRUNE_PENDING_AT = 1024


class PlainProducer:
    """Idempotent producer for records that need no transaction."""

    def __init__(self, settings: KafkaSettings, *, linger_ms: int = 5) -> None:
        self.settings = settings
        self._producer: KafkaProducer = _connect(
            lambda: KafkaProducer(
                linger_ms=linger_ms,
                max_request_size=MAX_RECORD_BYTES,
                allow_auto_create_topics=False,
                # Keep retrying a record through an outage as long as the process waits for the
                # broker: a record given up earlier would have to be sent again, out of order.
                delivery_timeout_ms=int(settings.outage_budget_s * 1000)
                + settings.request_timeout_ms
                + linger_ms,
                **settings.common(KafkaProducer),
            ),
            settings,
        )
        self._pending: list[Any] = []  # futures of records sent since the last flush, not known delivered
        self._delivered = 0  # records sent since the last flush whose futures were forgotten: delivered
        self._prune_at = _PRUNE_PENDING_AT

    def send(
        self, topic: str, value: bytes, *, partition: int | None = None, key: bytes | None = None
    ) -> Any:
        with _translated(self.settings, "WRITE"):
            future = self._producer.send(topic, value=value, key=key, partition=partition)
        self._pending.append(future)
        if len(self._pending) >= self._prune_at:
            self._forget_delivered()
        return future

    def _forget_delivered(self) -> None:
        """Drop the futures of delivered records: a run that flushes rarely (the ledger between
        checkpoints, ``save_interval: 0``) must not hold a future per record it ever sent."""
        kept = [f for f in self._pending if not f.is_done or f.failed()]
        self._delivered += len(self._pending) - len(kept)
        self._pending = kept
        self._prune_at = max(_PRUNE_PENDING_AT, 2 * len(kept))  # amortised: records still in flight stay

    def flush(self, timeout_s: float = 30.0, *, ride_out: bool = True) -> None:
        """Block until every record sent so far is on the broker; raise if any was not.

        kafka-python's own ``flush`` returns even when a record failed (its error sits in the
        record's future): the ledger, dead letters and the manifest must not be taken as
        written when they were not. ``ride_out=False`` fails after ``timeout_s`` whatever the
        broker does (best-effort records never wait out an outage, nor report one).
        """
        if ride_out:
            self.settings.ride_out(lambda: self._producer.flush(timeout=timeout_s), "delivering records")
        else:
            with _translated(self.settings, "WRITE"):
                self._producer.flush(timeout=timeout_s)
        pending, self._pending = self._pending, []
        sent, self._delivered, self._prune_at = len(pending) + self._delivered, 0, _PRUNE_PENDING_AT
        failed = [f for f in pending if not f.is_done or f.failed()]
        if failed:
            first = failed[0].exception if failed[0].is_done else "not delivered before the flush timeout"
            if isinstance(first, AuthorizationError):
                raise denied(first, _user_of(self.settings), "WRITE")
            raise TransportError(
                f"{len(failed)} of {sent} records were not delivered: {first}", retriable=True
            )

    def close(self, timeout_s: float = 10.0) -> None:
        _close_quietly(self._producer, timeout_s)


class _Listener(ConsumerRebalanceListener):
    def __init__(
        self,
        on_assigned: Callable[[list[int]], None] | None,
        on_revoked: Callable[[list[int]], None] | None,
        on_lost: Callable[[list[int]], None] | None,
    ) -> None:
        self._assigned = on_assigned
        self._revoked = on_revoked
        self._lost = on_lost

    def on_partitions_revoked(self, revoked: Any) -> None:
        if self._revoked:
            self._revoked(sorted(tp.partition for tp in revoked))

    def on_partitions_lost(self, lost: Any) -> None:
        """Evicted (session expired): the partitions are someone else's already; nothing may commit."""
        callback = self._lost or self._revoked
        if callback:
            callback(sorted(tp.partition for tp in lost))

    def on_partitions_assigned(self, assigned: Any) -> None:
        if self._assigned:
            self._assigned(sorted(tp.partition for tp in assigned))


def _release_parked_fetches(consumer: KafkaConsumer) -> None:
    """Work around a kafka-python 3.0.12 fetcher bug that starves resumed partitions.

    Records fetched for a partition that was then paused are parked (KAFKA-7548) and handed back
    after ``resume`` only while the fetcher's in-line slot is ``None``; an *exhausted* slot is
    falsy but not ``None``, so the parked records of a resumed partition wait forever, and the
    partition is never fetched again because it still has parked data. Emptying an exhausted
    slot before each poll lets the fetcher restore them (it drops nothing: the slot is empty).
    """
    fetcher = getattr(consumer, "_fetcher", None)
    slot = getattr(fetcher, "_next_partition_records", None)
    if slot is not None and not slot and getattr(fetcher, "_paused_partition_records", None):
        fetcher._next_partition_records = None



def _end_hanging_offsets(settings: KafkaSettings, idle_s: float) -> None:
    """A stable committed-offsets fetch waits while the group has offsets in an open transaction:
    one its coordinator ended but left open would hold it for ever (see
    ``KafkaAdmin.end_hanging_transactions``), so it is ended before the fetch is retried."""
    try:
        with KafkaAdmin(settings) as admin:
            end_hanging(admin, [], idle_s)
    except SpecstreamError as exc:  # no admin client now: the fetch is retried as it was
        logger.info("open transactions on the group offsets not checked: %s", exc)


class PartitionReader:
    """A ``read_committed`` consumer of one topic.

    With ``partitions`` it reads exactly those (manual assignment: no rebalance can move data
    between trainer ranks mid-step). Without, it joins ``group_id`` and Kafka balances the
    partitions among members (generator workers).
    """

    def __init__(
        self,
        settings: KafkaSettings,
        topic: str,
        *,
        partitions: Iterable[int] | None = None,
        group_id: str | None = None,
        start: Start | Mapping[int, int] = "committed",
        max_poll_records: int = 500,
        max_poll_interval_ms: int = 300_000,
        session_timeout_ms: int = 45_000,
        on_assigned: Callable[[list[int]], None] | None = None,
        on_revoked: Callable[[list[int]], None] | None = None,
        on_lost: Callable[[list[int]], None] | None = None,
        client_id: str | None = None,
        max_partition_fetch_bytes: int = 1024 * 1024,
    ) -> None:
        self.topic = topic
        self.group_id = group_id
        self.settings = settings
        self._timeout_ms = settings.request_timeout_ms
        options: dict[str, Any] = {
            "group_id": group_id,
            "isolation_level": "read_committed",
            "enable_auto_commit": False,
            # Explicit positions (a checkpoint's) must exist: out of range is an error, never a reset.
            "auto_offset_reset": "none"
            if isinstance(start, Mapping)
            else ("latest" if start == "latest" else "earliest"),
            "max_poll_records": max_poll_records,
            "max_poll_interval_ms": max_poll_interval_ms,
            "session_timeout_ms": session_timeout_ms,
            "heartbeat_interval_ms": max(1000, session_timeout_ms // 10),
            "allow_auto_create_topics": False,
            "max_partition_fetch_bytes": max_partition_fetch_bytes,
            # A fresh client's first poll has no fetch to send until the topic's metadata arrives,
            # and kafka-python sleeps this long then: the 100 ms default was most of the wait at the
            # start of every later epoch (its listing opens a reader); 20 ms, as for the producer.
            "retry_backoff_ms": 20,
            **settings.common(KafkaConsumer),
        }
        if client_id:
            options["client_id"] = client_id
        self._options = options
        self._positioned = False  # until the first poll, a stuck client may be replaced (no position to lose)
        self._consumer: KafkaConsumer = _connect(lambda: KafkaConsumer(**options), settings)
        if partitions is None:
            if group_id is None:
                raise ValueError("a reader without partitions needs a group_id to subscribe")
            self._consumer.subscribe([topic], listener=_Listener(on_assigned, on_revoked, on_lost))
            finish_unfinished_joins(self._consumer)  # kafka-python 3.0.12 can lose a slow rebalance
        else:
            tps = [TopicPartition(topic, p) for p in sorted(set(partitions))]
            self._consumer.assign(tps)
            self._position_at(tps, start)

    def _position_at(self, tps: list[TopicPartition], start: Start | Mapping[int, int]) -> None:
        if isinstance(start, Mapping):
            for tp in tps:
                if tp.partition in start:
                    self._consumer.seek(tp, int(start[tp.partition]))
                else:
                    self._consumer.seek_to_beginning(tp)
        elif start == "earliest":
            self._consumer.seek_to_beginning(*tps)
        elif start == "latest":
            self._consumer.seek_to_end(*tps)
        elif start == "committed":
            committed = self.committed()
            for tp in tps:
                if tp.partition in committed:
                    self._consumer.seek(tp, committed[tp.partition].offset)
                else:
                    self._consumer.seek_to_beginning(tp)

    def assignment(self) -> list[int]:
        return sorted(tp.partition for tp in self._consumer.assignment())

    def poll(self, timeout_s: float, max_records: int | None = None) -> list[Record]:
        """Records in offset order per partition, partitions interleaved as fetched."""
        self._positioned = True
        _release_parked_fetches(self._consumer)
        try:
            with _translated(self.settings, "READ"):
                batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except TransportError as exc:
            if isinstance(exc.__cause__, OffsetOutOfRangeError):
                raise StreamError(self._out_of_range(exc.__cause__)) from None
            if not exc.retriable:
                raise
            # The broker is away: nothing to read yet (past the budget this raises BrokerError).
            OUTAGE.failed(exc, where=self.settings.bootstrap_servers, what=f"reading {self.topic}",
                          budget_s=self.settings.outage_budget_s)  # fmt: skip
            return []
        out: list[Record] = []
        for tp, records in batches.items():
            for r in records:
                out.append(Record(tp.topic, tp.partition, r.offset, r.key, r.value, r.timestamp))
        return out

    def _out_of_range(self, error: OffsetOutOfRangeError) -> str:
        """Name each partition, the offset asked for and the range the log holds."""
        asked = error.args[0] if error.args and isinstance(error.args[0], dict) else {}
        tps = list(asked) or [TopicPartition(self.topic, p) for p in self.assignment()]
        starts = self.settings.ride_out(
            lambda: self._consumer.beginning_offsets(tps, self._timeout_ms), "offsets"
        )
        ends = self.settings.ride_out(lambda: self._consumer.end_offsets(tps, self._timeout_ms), "offsets")
        where = "; ".join(
            f"partition {tp.partition}: offset {asked.get(tp, '?')} asked, the log holds {starts[tp]}..{ends[tp]}"
            for tp in tps
        )
        return (
            f"{self.topic}: {where}. The position is outside the topic (it was deleted and re-created, or "
            "its records expired): resume from a checkpoint of this topic, or start a new run"
        )

    def seek(self, partition: int, offset: int) -> None:
        self._consumer.seek(TopicPartition(self.topic, partition), offset)

    def position(self, partition: int) -> int:
        tp = TopicPartition(self.topic, partition)
        return int(
            self.settings.ride_out(lambda: self._consumer.position(tp, self._timeout_ms), "a position")
        )

    def pause(self, partitions: Iterable[int]) -> None:
        self._consumer.pause(*(TopicPartition(self.topic, p) for p in partitions))

    def resume(self, partitions: Iterable[int]) -> None:
        self._consumer.resume(*(TopicPartition(self.topic, p) for p in partitions))

    def paused(self) -> list[int]:
        return sorted(tp.partition for tp in self._consumer.paused())

    def committed(self, partitions: Iterable[int] | None = None) -> dict[int, Committed]:
        """The group's committed offsets (with metadata) for the given or assigned partitions."""
        if self.group_id is None:
            return {}
        if partitions is None:
            partitions = self.assignment()
        out: dict[int, Committed] = {}
        for p in partitions:
            tp = TopicPartition(self.topic, p)
            om = self.settings.ride_out(lambda tp=tp: self._committed_once(tp), f"committed offsets of {self.topic}")
            if om is not None and om.offset >= 0:
                out[p] = Committed(om.offset, om.metadata or "")
        return out

    def _committed_once(self, tp: TopicPartition) -> Any:
        """One bounded fetch of a committed offset. A manually assigned client that has not read yet
        and gets no answer is replaced for the retry: after a broker restart kafka-python's fetch
        was seen to wait forever on a request lost in the reconnect, and its next call reuses it."""
        what = f"committed offsets of {self.topic}"
        try:
            return bounded(lambda: self._consumer.committed(tp, metadata=True, timeout_ms=self._timeout_ms),
                           what=what, timeout_s=self._timeout_ms / 1000 + 10)  # fmt: skip
        except (TransportError, KafkaTimeoutError) as exc:  # no answer in time, from us or from the client
            if isinstance(exc, TransportError) and not self._positioned and not self._consumer.subscription():
                self._renew_consumer("its committed-offsets fetch never returned")
            _end_hanging_offsets(self.settings, idle_s=self._timeout_ms / 1000)
            raise

    def reopen(self, positions: Mapping[int, int]) -> None:
        if self._consumer.subscription():
            raise ValueError(f"{self.topic}: a group member is not reopened; its group reassigns it")
        self._renew_consumer("it did not deliver records the broker holds")
        for p, offset in positions.items():
            self.seek(p, offset)

    def _renew_consumer(self, why: str) -> None:
        """A fresh client with the same options and assignment; the stuck one is closed in the background."""
        stuck, assigned = self._consumer, list(self._consumer.assignment())
        self._consumer = _connect(lambda: KafkaConsumer(**self._options), self.settings)
        self._consumer.assign(assigned)
        threading.Thread(target=lambda: stuck.close(autocommit=False), name="closing a stuck consumer", daemon=True).start()
        logger.info("%s: replaced a Kafka consumer: %s", self.topic, why)

    def commit(self, offsets: Mapping[int, int], metadata: str = "") -> None:
        """Advisory commit (monitoring, lag); correctness lives in the checkpoint."""
        marks = {
            TopicPartition(self.topic, p): OffsetAndMetadata(o, metadata, -1) for p, o in offsets.items()
        }
        self.settings.ride_out(
            lambda: self._consumer.commit(marks, timeout_ms=self._timeout_ms), "committing offsets"
        )

    def group_metadata(self) -> object:
        """Opaque token for ``TransactionalProducer.commit(group=...)`` (KIP-447 fencing)."""
        if self._consumer.assignment() and self._consumer.subscription():
            return self._consumer.group_metadata()
        return self.group_id

    def end_offsets(self, partitions: Iterable[int] | None = None) -> dict[int, int]:
        if partitions is None:
            partitions = self.assignment()
        tps = [TopicPartition(self.topic, p) for p in partitions]
        ends = self.settings.ride_out(
            lambda: self._consumer.end_offsets(tps, self._timeout_ms), "end offsets"
        )
        return {tp.partition: int(o) for tp, o in ends.items()}

    def close(self) -> None:
        try:  # leaving the group needs the broker; without one, the session timeout does it
            self._consumer.close(autocommit=False, timeout_ms=self._timeout_ms)
        except KafkaError as exc:
            logger.info("%s: consumer closed without leaving the group: %s", self.topic, exc)
