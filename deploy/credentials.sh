#!/usr/bin/env bash
# The secured transport's secrets, made in one place for the local stack and for compose:
# a CA, the Kafka broker's and the Redis server's TLS certificates, one credentials folder per
# role (a MODSTREAM_SECRETS_DIR: Kafka SCRAM name and password, protocol, CA, Redis URL) and
# Redis's ACL file (password hashes only, modstream/redis_acls.py).
#
#   deploy/credentials.sh make      make whatever is missing (never replaces an existing secret)
#
# deploy/local-stack.sh sources this file (MODSTREAM_STACK_SECURE=1); compose's credentials-init
# runs `make` in the modstream image. Settings (environment; the local stack sets its own):
#   TLS_DIR            where the CA and the servers' certificates go
#   CREDENTIALS_DIR    one folder per principal below it
#   SERVER_SANS        subjectAltName of the servers' certificates   IP:127.0.0.1,DNS:localhost
#   REDIS_HOST         the host in each role's Redis URL             127.0.0.1
#   REDIS_PORT         the port in each role's Redis URL             16379
#   ROLE_CA_FILE       the CA's path as the roles see it            $TLS_DIR/ca.pem
#                      (compose: /run/secrets/modstream/ca.pem, a copy in each role's folder)
#   MODSTREAM_PYTHON   a Python with the project installed (writes the Redis ACL file)
#
# The Kafka principals: admin is the super user the tooling runs as (topics, ACLs); the others are
# the roles of modstream/kafka_acls.py. The Redis users are those of modstream/redis_acls.py; the
# admin folder's Redis user is Redis's `default`, the operator.
KAFKA_PRINCIPALS=${KAFKA_PRINCIPALS:-admin worker review-sink dataset-sink console retrain retention lag-exporter}
REDIS_USERS=${REDIS_USERS:-admin worker review-sink console}

# 24 random bytes as letters and digits only (safe in a URL, a JAAS string and a properties file).
random_secret() { head -c 24 /dev/urandom | base64 | tr -d '/+=\n'; }

# server_certificate NAME CN: NAME.key and NAME.crt signed by the CA, for SERVER_SANS. Kafka and
# Redis get separate keys: the broker's certificate is a Kafka super user on the controller
# listener (mutual TLS), which Redis's key must never be.
server_certificate() {
  local name=$1 cn=$2
  [[ -s $name.crt ]] && return 0
  openssl req -newkey rsa:2048 -nodes -keyout "$name.key" -out "$name.csr" -subj "/CN=$cn" >/dev/null 2>&1
  printf 'subjectAltName=%s\n' "${SERVER_SANS:-IP:127.0.0.1,DNS:localhost}" >"$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -out "$name.crt" -days 825 \
    -extfile "$name.ext" >/dev/null 2>&1
  rm -f "$name.csr" "$name.ext"
}

# The CA, the broker's certificate (and its PEM keystore) and Redis's certificate, made once.
make_tls() {
  [[ -s $TLS_DIR/ca.pem && -s $TLS_DIR/broker-keystore.pem && -s $TLS_DIR/redis.crt ]] && return 0
  command -v openssl >/dev/null 2>&1 || die "openssl not found (Debian: apt-get install -y openssl)"
  log "making the CA and the servers' TLS certificates in $TLS_DIR"
  (
    umask 077
    mkdir -p "$TLS_DIR"
    cd "$TLS_DIR"
    [[ -s ca.pem ]] || openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 825 \
      -subj "/CN=modstream CA" >/dev/null 2>&1
    server_certificate broker modstream-broker
    cat broker.key broker.crt >broker-keystore.pem # Kafka's PEM keystore: the key, then its certificate
    server_certificate redis modstream-redis
    chmod 644 ca.pem # clients read the CA; the keys stay private
  ) || die "openssl could not make the certificates in $TLS_DIR"
}

# One folder per principal: its name, a random password, the protocol and the CA. Made once; the
# broker learns the passwords when its storage is formatted.
make_credentials() {
  local who dir ca=${ROLE_CA_FILE:-$TLS_DIR/ca.pem}
  for who in $KAFKA_PRINCIPALS; do
    dir="$CREDENTIALS_DIR/$who"
    (
      umask 077
      mkdir -p "$dir"
      [[ -s $dir/MODSTREAM_KAFKA_PASSWORD ]] || random_secret >"$dir/MODSTREAM_KAFKA_PASSWORD"
      printf '%s' "$who" >"$dir/MODSTREAM_KAFKA_USERNAME"
      printf 'SASL_SSL' >"$dir/MODSTREAM_KAFKA_SECURITY_PROTOCOL"
      printf '%s' "$ca" >"$dir/MODSTREAM_KAFKA_CA_FILE"
      if [[ -n ${ROLE_CA_FILE:-} ]]; then cp "$TLS_DIR/ca.pem" "$dir/ca.pem"; fi
    )
  done
}

# Each Redis user's URL (TLS, its password in the URL, the URL a secret file), written on every
# start (the port may change), and the server's ACL file from them.
make_redis_users() {
  local who dir user password ca=${ROLE_CA_FILE:-$TLS_DIR/ca.pem}
  for who in $REDIS_USERS; do
    dir="$CREDENTIALS_DIR/$who"
    (
      umask 077
      mkdir -p "$dir"
      [[ -s $dir/redis.password ]] || random_secret >"$dir/redis.password"
      user=$who
      [[ $who == admin ]] && user=default
      password=$(<"$dir/redis.password")
      printf 'rediss://%s:%s@%s:%s/0?ssl_ca_certs=%s' "$user" "$password" "${REDIS_HOST:-127.0.0.1}" \
        "${REDIS_PORT:-16379}" "$ca" >"$dir/MODSTREAM_REDIS_URL"
    )
  done
  local python
  python=$(pick_python) || die "the secured stack needs a Python with the project installed (set MODSTREAM_PYTHON)"
  (cd "$REPO_ROOT" && PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" \
    "$python" -m modstream.cli redis-acls --credentials "$CREDENTIALS_DIR" --aclfile "$TLS_DIR/redis-users.acl") ||
    die "could not write the Redis ACL file"
}

# The redis-server flags of the secured variant: TLS only (no plaintext port), the ACL file.
redis_secure_flags() {
  local port=$1
  printf '%s\n' --port 0 --tls-port "$port" --tls-cert-file "$TLS_DIR/redis.crt" --tls-key-file "$TLS_DIR/redis.key" \
    --tls-ca-cert-file "$TLS_DIR/ca.pem" --tls-auth-clients no --aclfile "$TLS_DIR/redis-users.acl"
}

# secure_listener_properties BIND ADVERTISED PORT CONTROLLER_PORT: the broker's listeners (BIND
# empty: every interface). Clients (and the broker to itself) speak SCRAM over TLS; the KRaft
# controller listener takes only the broker's own certificate (mutual TLS: SCRAM cannot
# authenticate controllers). No ACL, no access.
secure_listener_properties() {
  local bind=$1 advertised=$2 port=$3 controller_port=$4
  cat <<EOF
listeners=SASL_SSL://$bind:$port,CONTROLLER://$bind:$controller_port
advertised.listeners=SASL_SSL://$advertised:$port
listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:SSL
inter.broker.listener.name=SASL_SSL
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$(<"$CREDENTIALS_DIR/admin/MODSTREAM_KAFKA_PASSWORD")";
ssl.keystore.type=PEM
ssl.keystore.location=$TLS_DIR/broker-keystore.pem
ssl.truststore.type=PEM
ssl.truststore.location=$TLS_DIR/ca.pem
listener.name.controller.ssl.client.auth=required
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:admin;User:CN=modstream-broker
allow.everyone.if.no.acl.found=false
EOF
}

# A Kafka client configuration (kafka-topics.sh --command-config) for the admin principal.
admin_client_properties() {
  cat <<EOF
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$(<"$CREDENTIALS_DIR/admin/MODSTREAM_KAFKA_PASSWORD")";
ssl.truststore.type=PEM
ssl.truststore.location=$TLS_DIR/ca.pem
EOF
}

# StorageTool's SCRAM user arguments, one per line: give them to it through a java @argfile or
# a file the caller reads, never on a command line (the process table shows those).
scram_arguments() {
  local who
  for who in $KAFKA_PRINCIPALS; do
    printf -- '--add-scram\nSCRAM-SHA-512=[name=%s,password=%s]\n' "$who" "$(<"$CREDENTIALS_DIR/$who/MODSTREAM_KAFKA_PASSWORD")"
  done
}

# ------------------------------------------------------------------------------------ run on its own

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  set -euo pipefail
  REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  log() { printf 'credentials: %s\n' "$*"; }
  die() {
    printf 'credentials: error: %s\n' "$*" >&2
    exit 1
  }
  pick_python() {
    local candidate
    for candidate in "${MODSTREAM_PYTHON:-}" "$REPO_ROOT/.venv/bin/python" python3 python; do
      [[ -n $candidate ]] || continue
      if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import modstream' >/dev/null 2>&1; then
        printf '%s' "$candidate"
        return 0
      fi
    done
    return 1
  }
  case ${1:-} in
    make)
      : "${TLS_DIR:?set TLS_DIR}" "${CREDENTIALS_DIR:?set CREDENTIALS_DIR}"
      make_tls
      make_credentials
      make_redis_users
      log "made $TLS_DIR and one folder per principal in $CREDENTIALS_DIR"
      ;;
    *)
      sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
      exit 2
      ;;
  esac
fi
