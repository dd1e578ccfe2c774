#!/usr/bin/env bash
# Least-privilege ACLs for one specstream run, with Kafka's own kafka-acls tool.
#
#   infra/acls.sh --bootstrap-server HOST:PORT --command-config admin.properties -- \
#       --run-id RUN --source USER --generate USER --train USER --read-only USER
#
# Arguments after `--` go to `specstream acls`, which prints the role -> ACL table of
# pipeline/transport/acls.py as kafka-acls arguments (one call a line); each line is then run
# with `specstream broker tools kafka-acls` (the jars), or with $KAFKA_ACLS (e.g. a Kafka
# install's bin/kafka-acls.sh). admin.properties holds the admin principal's SASL settings
# (security.protocol, sasl.mechanism, sasl.jaas.config); the admin must be a super user.
# `specstream acls --apply --config admin.yaml ...` does the same through the admin API.
set -euo pipefail

kafka_args=()
while [[ $# -gt 0 && $1 != "--" ]]; do kafka_args+=("$1"); shift; done
[[ $# -gt 0 ]] && shift  # the `--`
if [[ ${#kafka_args[@]} -eq 0 || $# -eq 0 ]]; then
    sed -n '4,5p' "$0" >&2
    exit 2
fi

specstream acls "$@" | while IFS= read -r line; do
    eval "set -- $line"  # the lines are shell-quoted by specstream (shlex.join)
    if [[ -n ${KAFKA_ACLS:-} ]]; then
        "$KAFKA_ACLS" "${kafka_args[@]}" "$@" >/dev/null
    else
        specstream broker tools kafka-acls -- "${kafka_args[@]}" "$@" >/dev/null
    fi
    echo "granted: $line"
done
