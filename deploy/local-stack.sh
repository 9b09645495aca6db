#!/usr/bin/env bash
# Local Kafka (Apache Kafka 4.x, KRaft, one node) + Redis for development and integration tests.
#
#   deploy/local-stack.sh fetch        download the Kafka jars once (Maven Central -> cache outside the repo)
#   deploy/local-stack.sh start        fetch if needed, start Kafka and Redis, create the topics, wait until ready
#   deploy/local-stack.sh stop         stop both (SIGTERM, then SIGKILL after $MODSTREAM_STACK_STOP_TIMEOUT s)
#   deploy/local-stack.sh status       what runs where
#   deploy/local-stack.sh start-kafka|stop-kafka|start-redis|stop-redis   one component (outage drills)
#
# Everything listens on 127.0.0.1 only. Settings (environment):
#   KAFKA_VERSION          4.1.1         Apache Kafka release (org.apache.kafka:kafka_2.13)
#   MODSTREAM_KAFKA_LIBS   ~/.cache/modstream/kafka-$KAFKA_VERSION/libs   jar cache (survives fresh clones)
#   MODSTREAM_STACK_DIR    <repo>/var/stack   state: server.properties, data, logs, pid files
#   KAFKA_PORT             19092         client listener (bootstrap 127.0.0.1:$KAFKA_PORT)
#   KAFKA_CONTROLLER_PORT  19093         KRaft controller listener
#   REDIS_PORT             16379
#   REDIS_APPENDFSYNC      always        Redis AOF fsync policy: `always` means a write Redis has
#                                        answered is on disk, so the review sink's offset commit
#                                        never runs ahead of what a host crash would keep
#   TOPICS                 "posts labels review posts.dlq model-updates reviewed audit bank-updates"
#   TOPIC_PARTITIONS       4             partitions of the topics above (and of auto-created ones)
#   KAFKA_HEAP             "-Xmx512m -Xms256m"
#   KAFKA_JVM_OPTS         extra JVM options
#   MODSTREAM_PYTHON       a Python with aiokafka for topic admin (default: <repo>/.venv/bin/python, then
#                          python3); without one (or with MODSTREAM_PYTHON=none), Kafka's own TopicCommand is
#                          used (slower: one JVM per call)
#   MODSTREAM_STACK_SECURE 0             1: Kafka speaks only SASL_SSL (SCRAM-SHA-512 over TLS) with an ACL per
#                                        role (modstream/kafka_acls.py), Redis only TLS with an ACL user per
#                                        role (modstream/redis_acls.py); the CA, the servers' certificates and
#                                        one credentials folder per role (admin, worker, review-sink,
#                                        dataset-sink, console, retrain, retention, lag-exporter) are made at the first start under
#                                        $MODSTREAM_STACK_DIR/{tls,credentials}; a role runs with
#                                        MODSTREAM_SECRETS_DIR=<credentials>/<role> (docs/operations.md)
#   MODSTREAM_STACK_START_TIMEOUT  90    seconds to wait for readiness
#   MODSTREAM_STACK_STOP_TIMEOUT   20    seconds to wait after SIGTERM before SIGKILL
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
POM="$SCRIPT_DIR/kafka/pom.xml"
LOG4J_CONFIG="$SCRIPT_DIR/kafka/log4j2.properties"

HOST=127.0.0.1
KAFKA_VERSION=${KAFKA_VERSION:-4.1.1}
KAFKA_LIBS=${MODSTREAM_KAFKA_LIBS:-$HOME/.cache/modstream/kafka-$KAFKA_VERSION/libs}
STATE_DIR=${MODSTREAM_STACK_DIR:-$REPO_ROOT/var/stack}
KAFKA_PORT=${KAFKA_PORT:-19092}
KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-19093}
REDIS_PORT=${REDIS_PORT:-16379}
REDIS_APPENDFSYNC=${REDIS_APPENDFSYNC:-always}
TOPICS=${TOPICS:-posts labels review posts.dlq model-updates reviewed audit bank-updates}
TOPIC_PARTITIONS=${TOPIC_PARTITIONS:-4}
KAFKA_HEAP=${KAFKA_HEAP:--Xmx512m -Xms256m}
KAFKA_JVM_OPTS=${KAFKA_JVM_OPTS:-}
START_TIMEOUT=${MODSTREAM_STACK_START_TIMEOUT:-90}
STOP_TIMEOUT=${MODSTREAM_STACK_STOP_TIMEOUT:-20}

case $STATE_DIR in
  /*) ;;
  *) STATE_DIR="$PWD/$STATE_DIR" ;;
esac
case $KAFKA_LIBS in
  /*) ;;
  *) KAFKA_LIBS="$PWD/$KAFKA_LIBS" ;;
esac
KAFKA_DIR="$STATE_DIR/kafka"
REDIS_DIR="$STATE_DIR/redis"
SECURE=${MODSTREAM_STACK_SECURE:-0}
TLS_DIR="$STATE_DIR/tls"
CREDENTIALS_DIR="$STATE_DIR/credentials"
# The secured variant's certificates, credentials folders and Redis ACL file (shared with compose).
# This stack's principals, names and paths are its own, whatever the caller's environment says.
unset KAFKA_PRINCIPALS REDIS_USERS ROLE_CA_FILE
SERVER_SANS="IP:127.0.0.1,DNS:localhost"
REDIS_HOST=$HOST
# shellcheck source=deploy/credentials.sh
source "$SCRIPT_DIR/credentials.sh"
KAFKA_PID="$STATE_DIR/kafka.pid"
REDIS_PID="$STATE_DIR/redis.pid"
KAFKA_LOG="$STATE_DIR/kafka.log"
REDIS_LOG="$STATE_DIR/redis.log"
SERVER_PROPERTIES="$KAFKA_DIR/server.properties"

log() { printf 'local-stack: %s\n' "$*"; }
warn() { printf 'local-stack: warning: %s\n' "$*" >&2; }
die() {
  printf 'local-stack: error: %s\n' "$*" >&2
  exit 1
}

for _var in KAFKA_PORT KAFKA_CONTROLLER_PORT REDIS_PORT TOPIC_PARTITIONS START_TIMEOUT STOP_TIMEOUT; do
  [[ ${!_var} =~ ^[0-9]+$ ]] || die "$_var must be a number, got '${!_var}'"
done
unset _var
case $SECURE in
  0 | 1) ;;
  *) die "MODSTREAM_STACK_SECURE must be 0 or 1, got '$SECURE'" ;;
esac
case $REDIS_APPENDFSYNC in
  always | everysec | no) ;;
  *) die "REDIS_APPENDFSYNC must be always, everysec or no, got '$REDIS_APPENDFSYNC'" ;;
esac

# ---------------------------------------------------------------------------------------------- helpers

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
  # shellcheck disable=SC2016  # $1 is expanded by the inner bash
  timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# True when a Redis server answers PING on 127.0.0.1:$1 (plaintext: no redis-cli needed; the
# secured variant speaks only TLS, which needs redis-cli from redis-tools).
redis_ping() {
  local reply
  if [[ $SECURE == 1 ]]; then
    command -v redis-cli >/dev/null 2>&1 || die "redis-cli not found (Debian: apt-get install -y redis-tools)"
    [[ -s $TLS_DIR/ca.pem ]] || return 1
    reply=$(timeout 3 redis-cli --tls --cacert "$TLS_DIR/ca.pem" -h "$HOST" -p "$1" PING 2>/dev/null) || return 1
  else
    # shellcheck disable=SC2016  # $1 and $line are expanded by the inner bash
    reply=$(timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" && printf "PING\r\n" >&3 && IFS= read -r line <&3 &&
      printf "%s" "$line"' _ "$1" 2>/dev/null) || return 1
  fi
  # A secured Redis answers an unauthenticated PING with NOAUTH: it is up.
  [[ $reply == "+PONG"* || $reply == "PONG"* || $reply == "-NOAUTH"* || $reply == "NOAUTH"* ]]
}

redis_scheme() { if [[ $SECURE == 1 ]]; then printf rediss; else printf redis; fi; }

# True when pid $1 is a live (not zombie) process whose command line contains every further argument.
proc_matches() {
  local pid=$1 stat rest state cmdline needle
  shift
  [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/stat ]] || return 1
  stat=$(<"/proc/$pid/stat") || return 1
  rest=${stat##*) }
  state=${rest%% *}
  [[ $state != Z && $state != X ]] || return 1
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  for needle in "$@"; do
    [[ $cmdline == *"$needle"* ]] || return 1
  done
}

# Prints the pid from pid file $1 when that process is still the one we started (checked by command line).
live_pid() {
  local file=$1 pid
  shift
  [[ -f $file ]] || return 1
  pid=$(<"$file")
  proc_matches "$pid" "$@" || return 1
  printf '%s' "$pid"
}

kafka_pid() { live_pid "$KAFKA_PID" kafka.Kafka "$SERVER_PROPERTIES"; }
redis_pid() { live_pid "$REDIS_PID" redis-server; }
# During start-up only liveness is checked: right after `cmd &` the child may not have exec'd yet (its
# command line is still bash's), and redis-server blanks its argv while it sets its process title, so
# the marker checks above can report a healthy server dead (a CI failure). Stop and status keep them.
started_pid_alive() { live_pid "$1" >/dev/null; }

tail_log() {
  local file=$1
  if [[ -f $file ]]; then
    printf -- '----- last lines of %s -----\n' "$file" >&2
    tail -n "${2:-40}" "$file" >&2
    printf -- '-----\n' >&2
  fi
}

require_java() {
  command -v java >/dev/null 2>&1 ||
    die "java not found: Kafka $KAFKA_VERSION needs Java 17+ (Debian: apt-get install -y openjdk-17-jre-headless)"
  local version major
  version=$(java -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n 1)
  major=${version%%.*}
  [[ $major =~ ^[0-9]+$ ]] || die "could not read the Java version (java -version said: $(java -version 2>&1 | head -n 1))"
  ((major >= 17)) || die "Kafka $KAFKA_VERSION needs Java 17+, found $version ($(command -v java))"
}

pick_python() {
  local candidate
  [[ ${MODSTREAM_PYTHON:-} != none ]] || return 1
  for candidate in "${MODSTREAM_PYTHON:-}" "$REPO_ROOT/.venv/bin/python" python3; do
    [[ -n $candidate ]] || continue
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import aiokafka' >/dev/null 2>&1; then
      printf '%s' "$candidate"
      return 0
    fi
  done
  return 1
}

# ------------------------------------------------------------------------------------------------ fetch

libs_stamp_value() {
  printf 'kafka=%s pom=%s\n' "$KAFKA_VERSION" "$(sha256sum "$POM" | cut -c1-64)"
}

libs_complete() {
  [[ -f $KAFKA_LIBS/.complete && $(<"$KAFKA_LIBS/.complete") == "$(libs_stamp_value)" ]]
}

cmd_fetch() {
  if libs_complete; then
    log "Kafka $KAFKA_VERSION jars already cached in $KAFKA_LIBS"
    return 0
  fi
  mkdir -p "$(dirname "$KAFKA_LIBS")"
  # One fetch at a time per cache folder (parallel CI jobs, two terminals).
  (
    exec 9>"$KAFKA_LIBS.lock"
    flock -w 900 9 || die "timed out waiting for another fetch into $KAFKA_LIBS"
    if libs_complete; then
      log "Kafka $KAFKA_VERSION jars already cached in $KAFKA_LIBS"
      exit 0
    fi
    command -v mvn >/dev/null 2>&1 ||
      die "mvn not found: it is needed once to fetch the Kafka jars (Debian: apt-get install -y maven), or point MODSTREAM_KAFKA_LIBS at a folder holding the jars of kafka_2.13 $KAFKA_VERSION and its dependencies"
    require_java
    local tmp="$KAFKA_LIBS.partial"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    local -a mvn_args=(-B -q -Dstyle.color=never -f "$POM" "-Dkafka.version=$KAFKA_VERSION" dependency:copy-dependencies
      "-DoutputDirectory=$tmp" -DincludeScope=runtime)
    [[ -z ${MAVEN_REPO_LOCAL:-} ]] || mvn_args+=("-Dmaven.repo.local=$MAVEN_REPO_LOCAL")
    local started=$SECONDS fetched="" jar
    # Offline first when the local Maven repository already holds this release (no network needed).
    if [[ -d ${MAVEN_REPO_LOCAL:-$HOME/.m2/repository}/org/apache/kafka/kafka_2.13/$KAFKA_VERSION ]]; then
      log "resolving Kafka $KAFKA_VERSION jars from the local Maven repository (offline)"
      if mvn -o "${mvn_args[@]}" >"$tmp.mvn.log" 2>&1; then
        fetched=offline
      else
        log "offline resolution incomplete; trying Maven Central"
      fi
    fi
    if [[ -z $fetched ]]; then
      log "downloading Apache Kafka $KAFKA_VERSION (kafka_2.13 + kafka-tools + log4j2) from Maven Central into $KAFKA_LIBS"
      if ! mvn "${mvn_args[@]}" >"$tmp.mvn.log" 2>&1; then
        tail -n 40 "$tmp.mvn.log" | sed 's/\x1b\[[0-9;]*m//g' >&2
        die "Maven could not resolve org.apache.kafka:kafka_2.13:$KAFKA_VERSION (full log: $tmp.mvn.log; is Maven Central reachable? is KAFKA_VERSION a released 4.x version?)"
      fi
      fetched=online
    fi
    [[ -f $tmp/kafka_2.13-$KAFKA_VERSION.jar ]] || die "Maven finished but $tmp/kafka_2.13-$KAFKA_VERSION.jar is missing"
    rm -f "$tmp.mvn.log"
    # Update in place by rename, never by rewriting a file: a broker already running from this folder
    # keeps reading the jars it has open.
    mkdir -p "$KAFKA_LIBS"
    rm -f "$KAFKA_LIBS/.complete"
    local -A wanted=()
    for jar in "$tmp"/*.jar; do
      wanted[${jar##*/}]=1
      if cmp -s "$jar" "$KAFKA_LIBS/${jar##*/}"; then
        rm -f "$jar"
      else
        mv -f "$jar" "$KAFKA_LIBS/"
      fi
    done
    for jar in "$KAFKA_LIBS"/*.jar; do
      [[ -n ${wanted[${jar##*/}]:-} ]] || rm -f "$jar"
    done
    rm -rf "$tmp"
    libs_stamp_value >"$KAFKA_LIBS/.complete"
    log "fetched $(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars ($(du -sh "$KAFKA_LIBS" | cut -f1)) $fetched in $((SECONDS - started)) s"
  )
}

# ------------------------------------------------------------------------------------------------ kafka

write_server_properties() {
  mkdir -p "$KAFKA_DIR/data"
  cat >"$SERVER_PROPERTIES" <<EOF
# Written by deploy/local-stack.sh on every start; edit the script, not this file.
# Single node, combined broker + KRaft controller, loopback only.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$KAFKA_CONTROLLER_PORT
controller.listener.names=CONTROLLER
log.dirs=$KAFKA_DIR/data
$(listener_properties)

num.partitions=$TOPIC_PARTITIONS
default.replication.factor=1
auto.create.topics.enable=true
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=8
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0

num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.hours=168
log.segment.bytes=134217728
EOF
}

listener_properties() {
  if [[ $SECURE == 0 ]]; then
    cat <<EOF
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
EOF
    return 0
  fi
  secure_listener_properties "$HOST" "$HOST" "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"
}

format_storage() {
  [[ -f $KAFKA_DIR/data/meta.properties ]] && return 0
  local cluster_id
  if [[ -s $KAFKA_DIR/cluster.id ]]; then
    cluster_id=$(<"$KAFKA_DIR/cluster.id")
  else
    # A Kafka Uuid: 16 random bytes, URL-safe base64 without padding (22 characters); one starting
    # with '-' would read as an option to StorageTool, so draw again.
    cluster_id=-
    while [[ $cluster_id == -* ]]; do
      cluster_id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
    done
    printf '%s\n' "$cluster_id" >"$KAFKA_DIR/cluster.id"
  fi
  log "formatting KRaft storage in $KAFKA_DIR/data (cluster id $cluster_id)"
  # (No Log4j configuration here: Log4j's default prints errors only, not the whole config dump.)
  # StorageTool takes the SCRAM users only as arguments: they go in a java @argfile (mode 600,
  # removed at once), which the launcher expands, so no password is ever in the process table.
  local argfile="$KAFKA_DIR/format.args" rc=0
  (
    umask 077
    printf '%s\n' kafka.tools.StorageTool format -t "$cluster_id" -c "$SERVER_PROPERTIES" >"$argfile"
    [[ $SECURE == 0 ]] || scram_arguments >>"$argfile"
  )
  java -cp "$KAFKA_LIBS/*" @"$argfile" >>"$KAFKA_LOG" 2>&1 || rc=$?
  rm -f "$argfile"
  if ((rc != 0)); then
    tail_log "$KAFKA_LOG"
    die "kafka.tools.StorageTool format failed"
  fi
}

# Starts the broker process and returns at once (see wait_kafka).
launch_kafka() {
  local pid
  if pid=$(kafka_pid); then
    log "Kafka already running (pid $pid) on $HOST:$KAFKA_PORT"
    return 0
  fi
  rm -f "$KAFKA_PID"
  libs_complete || cmd_fetch
  require_java
  if port_open "$KAFKA_PORT"; then
    die "port $HOST:$KAFKA_PORT is already in use by another process (set KAFKA_PORT)"
  fi
  if port_open "$KAFKA_CONTROLLER_PORT"; then
    die "port $HOST:$KAFKA_CONTROLLER_PORT is already in use by another process (set KAFKA_CONTROLLER_PORT)"
  fi
  mkdir -p "$KAFKA_DIR"
  if [[ $SECURE == 1 ]]; then
    make_tls
    make_credentials
  elif [[ -f $KAFKA_DIR/data/meta.properties && -d $CREDENTIALS_DIR ]]; then
    die "$STATE_DIR holds a secured stack: start it with MODSTREAM_STACK_SECURE=1 (or use another MODSTREAM_STACK_DIR)"
  fi
  (
    umask 077 # the secured variant's properties hold the broker's own password
    write_server_properties
  )
  format_storage
  local -a heap jvm_opts
  read -r -a heap <<<"$KAFKA_HEAP"
  read -r -a jvm_opts <<<"$KAFKA_JVM_OPTS"
  printf '\n===== %s starting Kafka %s on %s:%s =====\n' "$(date -u +%FT%TZ)" "$KAFKA_VERSION" "$HOST" "$KAFKA_PORT" \
    >>"$KAFKA_LOG"
  java "${heap[@]}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError \
    -XX:ErrorFile="$KAFKA_DIR/hs_err_pid%p.log" -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$LOG4J_CONFIG" -Dkafka.logs.dir="$KAFKA_DIR" \
    "${jvm_opts[@]}" -cp "$KAFKA_LIBS/*" kafka.Kafka "$SERVER_PROPERTIES" </dev/null >>"$KAFKA_LOG" 2>&1 &
  printf '%s\n' "$!" >"$KAFKA_PID"
  log "Kafka $KAFKA_VERSION starting (pid $!), log: $KAFKA_LOG"
}

# Creates the topics (idempotent) and waits until every partition has a leader, with aiokafka.
topics_with_python() {
  local python=$1 deadline=$2
  # shellcheck disable=SC2086  # TOPICS is a space-separated list on purpose
  "$python" - "$HOST:$KAFKA_PORT" "$TOPIC_PARTITIONS" "$deadline" "$KAFKA_PID" $TOPICS <<'PY'
import asyncio
import logging
import os
import sys
import time

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

logging.basicConfig(level=logging.CRITICAL)
bootstrap, partitions, deadline, pid_file = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
topics = sys.argv[5:]
options = {}
if os.environ.get("MODSTREAM_STACK_SECURE") == "1":  # as the admin (MODSTREAM_SECRETS_DIR), over TLS
    from modstream.kafka_auth import client_options

    options = client_options()


def broker_alive() -> bool:
    try:
        with open(pid_file) as fh:
            os.kill(int(fh.read().strip()), 0)
        return True
    except (OSError, ValueError):
        return False


async def attempt() -> tuple[list, list[str]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000, **options)
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            response = await admin.create_topics([NewTopic(t, partitions, 1) for t in missing], timeout_ms=10_000)
            for error in response.topic_errors:
                name, code = error[0], error[1]
                if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS (a race with auto-creation)
                    raise RuntimeError(f"creating topic {name!r} failed with error code {code}: {error[2:]}")
        metadata = await admin.describe_topics(topics)
        waiting = [
            t["topic"]
            for t in metadata
            if t["error_code"] or not t["partitions"] or any(p["leader"] < 0 for p in t["partitions"])
        ]
        return metadata, waiting
    finally:
        await admin.close()


async def main() -> int:
    last = "no answer yet"
    while time.time() < deadline:
        if not broker_alive():
            print("local-stack: error: the Kafka process exited", file=sys.stderr)
            return 1
        try:
            metadata, waiting = await asyncio.wait_for(attempt(), timeout=max(1.0, min(20.0, deadline - time.time())))
        except Exception as exc:  # the broker is still starting: connection refused, not leader, timeouts
            last = f"{type(exc).__name__}: {exc}"
        else:
            if not waiting:
                for t in sorted(metadata, key=lambda t: t["topic"]):
                    count = len(t["partitions"])
                    note = "" if count == partitions else f" (expected {partitions}; created earlier with another count)"
                    print(f"local-stack:   topic {t['topic']}: {count} partitions{note}")
                return 0
            last = f"partitions without a leader yet: {', '.join(waiting)}"
        await asyncio.sleep(0.5)
    print(f"local-stack: error: Kafka at {bootstrap} not ready in time ({last})", file=sys.stderr)
    return 1


sys.exit(asyncio.run(main()))
PY
}

# In a subshell: makes the Python that follows the stack's super user (its credentials folder),
# whatever Kafka settings the caller's environment has.
admin_environment() {
  unset MODSTREAM_KAFKA_USERNAME MODSTREAM_KAFKA_PASSWORD MODSTREAM_KAFKA_SECURITY_PROTOCOL MODSTREAM_KAFKA_CA_FILE
  unset MODSTREAM_CONFIG
  export MODSTREAM_STACK_SECURE=1 MODSTREAM_SECRETS_DIR="$CREDENTIALS_DIR/admin"
  export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
}

# Fallback without Python/aiokafka: Kafka's own TopicCommand (one JVM per call).
topics_with_java() {
  local deadline=$1 topic
  local -a topic_cmd=(java -cp "$KAFKA_LIBS/*" org.apache.kafka.tools.TopicCommand --bootstrap-server "$HOST:$KAFKA_PORT")
  until "${topic_cmd[@]}" --list >/dev/null 2>&1; do
    started_pid_alive "$KAFKA_PID" || return 1
    ((EPOCHSECONDS < deadline)) || return 1
    sleep 1
  done
  for topic in $TOPICS; do
    until "${topic_cmd[@]}" --create --if-not-exists --topic "$topic" --partitions "$TOPIC_PARTITIONS" \
      --replication-factor 1 >/dev/null 2>&1; do
      ((EPOCHSECONDS < deadline)) || return 1
      sleep 1
    done
    log "  topic $topic: created or present"
  done
}

# Waits until the broker answers and the topics exist with leaders.
wait_kafka() {
  local deadline=$((EPOCHSECONDS + START_TIMEOUT)) python
  until port_open "$KAFKA_PORT"; do
    if ! started_pid_alive "$KAFKA_PID"; then
      tail_log "$KAFKA_LOG"
      rm -f "$KAFKA_PID"
      die "Kafka exited during start-up (log: $KAFKA_LOG)"
    fi
    if ((EPOCHSECONDS >= deadline)); then
      tail_log "$KAFKA_LOG"
      die "Kafka did not open $HOST:$KAFKA_PORT within ${START_TIMEOUT}s (log: $KAFKA_LOG; '$0 stop' cleans up)"
    fi
    sleep 0.5
  done
  if [[ $SECURE == 1 ]]; then
    python=$(pick_python) || die "the secured stack needs a Python with aiokafka (set MODSTREAM_PYTHON)"
    if ! (admin_environment && topics_with_python "$python" "$deadline"); then
      tail_log "$KAFKA_LOG"
      die "Kafka topics not ready (log: $KAFKA_LOG; '$0 stop' cleans up)"
    fi
    if ! (admin_environment && cd "$REPO_ROOT" && "$python" -m modstream.cli kafka-acls --bootstrap "$HOST:$KAFKA_PORT"); then
      die "could not grant the roles' ACLs (log: $KAFKA_LOG)"
    fi
    log "Kafka is SASL_SSL only: each role runs with MODSTREAM_SECRETS_DIR=$CREDENTIALS_DIR/<role>"
  elif python=$(pick_python); then
    if ! topics_with_python "$python" "$deadline"; then
      tail_log "$KAFKA_LOG"
      die "Kafka topics not ready (log: $KAFKA_LOG; '$0 stop' cleans up)"
    fi
  else
    log "no Python with aiokafka found (set MODSTREAM_PYTHON); creating topics with Kafka's TopicCommand"
    if ! topics_with_java "$deadline"; then
      tail_log "$KAFKA_LOG"
      die "Kafka topics not ready within ${START_TIMEOUT}s (log: $KAFKA_LOG; '$0 stop' cleans up)"
    fi
  fi
  log "Kafka ready: bootstrap $HOST:$KAFKA_PORT (pid $(kafka_pid || echo '?'))"
}

# ------------------------------------------------------------------------------------------------ redis

ensure_redis_server() {
  command -v redis-server >/dev/null 2>&1 && return 0
  if [[ $EUID -ne 0 ]]; then
    die "redis-server not found; install it (Debian: sudo apt-get install -y redis-server redis-tools) and rerun"
  fi
  command -v apt-get >/dev/null 2>&1 || die "redis-server not found and no apt-get to install it"
  log "redis-server not found; installing Debian's redis-server (apt-get)"
  # Keep the package's own service (port 6379) from being started by the install: this script runs
  # its own redis-server. policy-rc.d is Debian's switch for that; only ours is removed afterwards.
  local policy=/usr/sbin/policy-rc.d ours=""
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    ours=1
  fi
  local rc=0
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools; } || rc=$?
  [[ -n $ours ]] && rm -f "$policy"
  ((rc == 0)) || die "apt-get install redis-server failed (exit $rc)"
  command -v redis-server >/dev/null 2>&1 || die "redis-server still not found after apt-get install"
}

launch_redis() {
  local pid
  if pid=$(redis_pid); then
    log "Redis already running (pid $pid) on $HOST:$REDIS_PORT"
    return 0
  fi
  rm -f "$REDIS_PID"
  if redis_ping "$REDIS_PORT"; then
    log "a Redis not started by this script already answers on $HOST:$REDIS_PORT; using it (stop leaves it alone)"
    return 0
  fi
  if port_open "$REDIS_PORT"; then
    die "port $HOST:$REDIS_PORT is in use by something that is not Redis (set REDIS_PORT)"
  fi
  ensure_redis_server
  mkdir -p "$REDIS_DIR"
  local -a listen=(--port "$REDIS_PORT")
  if [[ $SECURE == 1 ]]; then
    make_tls
    make_credentials
    make_redis_users
    mapfile -t listen < <(redis_secure_flags "$REDIS_PORT")
  fi
  printf '\n===== %s starting redis-server on %s:%s =====\n' "$(date -u +%FT%TZ)" "$HOST" "$REDIS_PORT" >>"$REDIS_LOG"
  # Append-only file: the review stream must survive a Redis restart (outage drills restart it).
  # fsync always: the review sink commits offsets once Redis answered, which must mean on disk
  # (Debian's Redis 7.0 has no WAITAOF; `everysec` could lose the last second on a host crash).
  redis-server "${listen[@]}" --bind "$HOST" --protected-mode yes --dir "$REDIS_DIR" \
    --save '' --appendonly yes --appendfsync "$REDIS_APPENDFSYNC" --daemonize no --logfile '' \
    </dev/null >>"$REDIS_LOG" 2>&1 &
  printf '%s\n' "$!" >"$REDIS_PID"
  log "Redis starting (pid $!), log: $REDIS_LOG"
}

wait_redis() {
  local deadline=$((EPOCHSECONDS + START_TIMEOUT))
  until redis_ping "$REDIS_PORT"; do
    if [[ -f $REDIS_PID ]] && ! started_pid_alive "$REDIS_PID"; then
      tail_log "$REDIS_LOG" 20
      rm -f "$REDIS_PID"
      die "redis-server exited during start-up (log: $REDIS_LOG)"
    fi
    ((EPOCHSECONDS < deadline)) || die "Redis did not answer PING on $HOST:$REDIS_PORT within ${START_TIMEOUT}s"
    sleep 0.2
  done
  log "Redis ready: $(redis_scheme)://$HOST:$REDIS_PORT/0"
}

# ------------------------------------------------------------------------------------------------- stop

# stop_process NAME PIDFILE MARKER...: SIGTERM, wait, SIGKILL; idempotent.
stop_process() {
  local name=$1 file=$2 pid waited=0
  shift 2
  if [[ ! -f $file ]]; then
    log "$name: not running (no pid file)"
    return 0
  fi
  if ! pid=$(live_pid "$file" "$@"); then
    log "$name: not running (stale pid file removed)"
    rm -f "$file"
    return 0
  fi
  log "$name: stopping pid $pid"
  kill -TERM "$pid" 2>/dev/null || true
  while proc_matches "$pid" "$@"; do
    if ((waited >= STOP_TIMEOUT * 10)); then
      warn "$name: pid $pid still running ${STOP_TIMEOUT}s after SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      local k=0
      while proc_matches "$pid" "$@" && ((k < 50)); do
        sleep 0.1
        k=$((k + 1))
      done
      proc_matches "$pid" "$@" && die "$name: pid $pid survived SIGKILL"
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  rm -f "$file"
  log "$name: stopped (after $((waited / 10)).$((waited % 10)) s)"
}

stop_kafka() { stop_process Kafka "$KAFKA_PID" kafka.Kafka "$SERVER_PROPERTIES"; }
stop_redis() { stop_process Redis "$REDIS_PID" redis-server; }

# --------------------------------------------------------------------------------------------- commands

cmd_status() {
  local pid
  if pid=$(kafka_pid); then
    if port_open "$KAFKA_PORT"; then
      log "Kafka $KAFKA_VERSION: running, pid $pid, bootstrap $HOST:$KAFKA_PORT (controller $HOST:$KAFKA_CONTROLLER_PORT)"
    else
      log "Kafka $KAFKA_VERSION: starting, pid $pid, not yet listening on $HOST:$KAFKA_PORT"
    fi
  elif port_open "$KAFKA_PORT"; then
    log "Kafka: not started by this script, but something listens on $HOST:$KAFKA_PORT"
  else
    log "Kafka: stopped ($HOST:$KAFKA_PORT)"
  fi
  if pid=$(redis_pid); then
    if redis_ping "$REDIS_PORT"; then
      log "Redis: running, pid $pid, $(redis_scheme)://$HOST:$REDIS_PORT/0"
    else
      log "Redis: pid $pid, not answering PING on $HOST:$REDIS_PORT"
    fi
  elif redis_ping "$REDIS_PORT"; then
    log "Redis: not started by this script, but one answers on $(redis_scheme)://$HOST:$REDIS_PORT/0"
  else
    log "Redis: stopped ($HOST:$REDIS_PORT)"
  fi
  if [[ -d $CREDENTIALS_DIR ]]; then
    log "Kafka is SASL_SSL and Redis TLS with ACL users (MODSTREAM_STACK_SECURE=1): a role runs with MODSTREAM_SECRETS_DIR=$CREDENTIALS_DIR/<role>"
  fi
  log "state: $STATE_DIR; jars: $KAFKA_LIBS ($(libs_complete && echo cached || echo 'not fetched'))"
}

usage() {
  sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

main() {
  local command=${1:-}
  case $command in
    fetch) cmd_fetch ;;
    start)
      mkdir -p "$STATE_DIR"
      launch_kafka
      launch_redis
      wait_redis
      wait_kafka
      ;;
    stop)
      stop_kafka
      stop_redis
      ;;
    status) cmd_status ;;
    start-kafka)
      mkdir -p "$STATE_DIR"
      launch_kafka
      wait_kafka
      ;;
    stop-kafka) stop_kafka ;;
    start-redis)
      mkdir -p "$STATE_DIR"
      launch_redis
      wait_redis
      ;;
    stop-redis) stop_redis ;;
    -h | --help | help) usage ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
