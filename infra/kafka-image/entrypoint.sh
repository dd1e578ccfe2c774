#!/bin/sh
# The broker image's entrypoint: one Apache Kafka node in KRaft mode (broker and controller), set up
# from the environment, then the JVM exec'd as PID 1 so `docker stop` shuts it down cleanly.
# Uses only sh builtins, mkdir and java (the local image carries nothing else).
#
#   KAFKA_PORT             client listener port (9092)
#   KAFKA_CONTROLLER_PORT  controller listener port (9093)
#   KAFKA_LISTEN_HOST      address to bind (0.0.0.0; tests on host networking use 127.0.0.1)
#   KAFKA_ADVERTISED_HOST  host clients are told to connect to (127.0.0.1; a compose service name)
#   KAFKA_HEAP_MB          JVM heap in MB (512)
#   KAFKA_DATA_DIR         log dir (/var/lib/kafka/data); kept across restarts when a volume
#   KAFKA_NODE_ID          node id (1)
#   KAFKA_QUORUM_VOTERS    static controller quorum "1@kafka-1:9093,2@kafka-2:9093,..." for a
#                          cluster; unset: one standalone node (dynamic quorum, --standalone)
#   KAFKA_CLUSTER_ID       cluster id, the same on every node (a fixed default)
#   KAFKA_REPLICATION      replication factor of internal topics and the default (1; 3 in a cluster)
#   KAFKA_MIN_ISR          min.insync.replicas (1; 2 in a cluster)
#   KAFKA_EXTRA_PROPERTIES more server.properties lines (newline separated), e.g. SASL listeners
set -eu

port="${KAFKA_PORT:-9092}"
cport="${KAFKA_CONTROLLER_PORT:-9093}"
listen="${KAFKA_LISTEN_HOST:-0.0.0.0}"
advertised="${KAFKA_ADVERTISED_HOST:-127.0.0.1}"
heap="${KAFKA_HEAP_MB:-512}"
data="${KAFKA_DATA_DIR:-/var/lib/kafka/data}"
node="${KAFKA_NODE_ID:-1}"
voters="${KAFKA_QUORUM_VOTERS:-}"
cluster="${KAFKA_CLUSTER_ID:-c3BlY3N0cmVhbS1rYWZrYQ}"
rf="${KAFKA_REPLICATION:-1}"
isr="${KAFKA_MIN_ISR:-1}"
conf="${KAFKA_CONF_DIR:-/tmp/kafka-conf}"
cp="/opt/kafka/libs/*"

mkdir -p "$data" "$conf"
if [ -n "$voters" ]; then
    quorum="controller.quorum.voters=$voters"
    standalone=""
else
    quorum="controller.quorum.bootstrap.servers=$advertised:$cport"
    standalone="--standalone"
fi

# The same settings as the native local broker (pipeline/transport/broker.py), ports and hosts from
# the environment; later lines win, so KAFKA_EXTRA_PROPERTIES can override any of them.
printf '%s\n' \
    "process.roles=broker,controller" \
    "node.id=$node" \
    "$quorum" \
    "listeners=PLAINTEXT://$listen:$port,CONTROLLER://$listen:$cport" \
    "advertised.listeners=PLAINTEXT://$advertised:$port,CONTROLLER://$advertised:$cport" \
    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT" \
    "inter.broker.listener.name=PLAINTEXT" \
    "controller.listener.names=CONTROLLER" \
    "log.dirs=$data" \
    "num.partitions=1" \
    "auto.create.topics.enable=false" \
    "default.replication.factor=$rf" \
    "min.insync.replicas=$isr" \
    "offsets.topic.replication.factor=$rf" \
    "offsets.topic.num.partitions=1" \
    "transaction.state.log.replication.factor=$rf" \
    "transaction.state.log.min.isr=$isr" \
    "transaction.state.log.num.partitions=1" \
    "share.coordinator.state.topic.replication.factor=$rf" \
    "share.coordinator.state.topic.min.isr=$isr" \
    "share.coordinator.state.topic.num.partitions=1" \
    "group.initial.rebalance.delay.ms=0" \
    "num.network.threads=2" \
    "num.io.threads=2" \
    "log.cleaner.dedupe.buffer.size=16777216" \
    "message.max.bytes=8388608" \
    "transaction.abort.timed.out.transaction.cleanup.interval.ms=5000" \
    "${KAFKA_EXTRA_PROPERTIES:-}" >"$conf/server.properties"

printf '%s\n' \
    "appender.out.type = Console" \
    "appender.out.name = OUT" \
    "appender.out.layout.type = PatternLayout" \
    "appender.out.layout.pattern = [%d] %p %m (%c)%n" \
    "rootLogger.level = INFO" \
    "rootLogger.appenderRef.out.ref = OUT" \
    "logger.req.name = kafka.request.logger" \
    "logger.req.level = WARN" >"$conf/log4j2.properties"

# A kept data dir is reused as it is (--ignore-formatted).
# shellcheck disable=SC2086  # $standalone is empty or one flag
java -Xmx128m -XX:TieredStopAtLevel=1 -cp "$cp" kafka.tools.StorageTool format $standalone \
    --ignore-formatted -t "$cluster" -c "$conf/server.properties"

exec java "-Xms$((heap < 256 ? heap : 256))m" "-Xmx${heap}m" -XX:+UseSerialGC -XX:+ExitOnOutOfMemoryError \
    -Djava.awt.headless=true "-Dlog4j2.configurationFile=$conf/log4j2.properties" \
    "-Dkafka.logs.dir=$conf/logs" ${KAFKA_JVM_OPTS:-} -cp "$cp" kafka.Kafka "$conf/server.properties"
