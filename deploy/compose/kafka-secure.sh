#!/usr/bin/env bash
# The compose broker, secured: SASL_SSL (SCRAM-SHA-512) for clients, mutual TLS for the KRaft
# controller, StandardAuthorizer with the ACLs `modstream kafka-acls` grants. Runs in the
# apache/kafka image with credentials-init's `kafka` folder mounted read-only at /credentials
# (the broker's PEM keystore, the CA, every principal's SCRAM password).
#
#   kafka-secure.sh serve           write server.properties, format the storage once (with the SCRAM
#                                   users), then become the broker
#   kafka-secure.sh client-config   print an admin client configuration (--command-config)
#   kafka-secure.sh server-properties   print the broker's configuration
#
# The properties come from deploy/credentials.sh, the same functions the local secured stack uses.
set -euo pipefail

TLS_DIR=${CREDENTIALS_ROOT:-/credentials}
CREDENTIALS_DIR=$TLS_DIR/principals
KAFKA_HOME=${KAFKA_HOME:-/opt/kafka}
STATE=${KAFKA_STATE_DIR:-/var/lib/kafka/data} # the image's data volume
HOSTNAME_ADVERTISED=${KAFKA_ADVERTISED_HOST:-kafka}
# shellcheck source=deploy/credentials.sh
source "$(dirname "${BASH_SOURCE[0]}")/../credentials.sh"

server_properties() {
  cat <<EOF
# Written by deploy/compose/kafka-secure.sh on every start.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOSTNAME_ADVERTISED:9093
controller.listener.names=CONTROLLER
log.dirs=$STATE/logs
$(secure_listener_properties "" "$HOSTNAME_ADVERTISED" 9092 9093)
# Topics come from topic-init with their partition counts, not from a first producer.
auto.create.topics.enable=false
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
EOF
}

case ${1:-} in
  serve)
    umask 077 # the properties hold the broker's own password
    mkdir -p "$STATE/logs"
    server_properties >"$STATE/server.properties"
    admin_client_properties >"$STATE/admin-client.properties" # the healthcheck's
    if [[ ! -f $STATE/logs/meta.properties ]]; then
      # The SCRAM users through a java @argfile (mode 600, removed at once): never in the process table.
      argfile=$STATE/format.args
      {
        printf '%s\n' kafka.tools.StorageTool format -t "$("$KAFKA_HOME/bin/kafka-storage.sh" random-uuid)" \
          -c "$STATE/server.properties"
        scram_arguments
      } >"$argfile"
      rc=0
      java -cp "$KAFKA_HOME/libs/*" @"$argfile" || rc=$?
      rm -f "$argfile"
      ((rc == 0)) || exit "$rc"
    fi
    exec "$KAFKA_HOME/bin/kafka-server-start.sh" "$STATE/server.properties"
    ;;
  client-config) admin_client_properties ;;
  server-properties) server_properties ;;
  *)
    sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
