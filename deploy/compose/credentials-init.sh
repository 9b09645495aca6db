#!/usr/bin/env bash
# compose's credentials-init (modstream image, as root, once): makes the CA, the servers'
# certificates and every principal's credentials with deploy/credentials.sh in the `credentials`
# volume, then hands each container only its own part, owned by the user it runs as:
#
#   /credentials/roles/<role>/   the role's MODSTREAM_SECRETS_DIR (uid 10001, the modstream image)
#   $ROOT/kafka/          broker keystore, CA, SCRAM passwords (uid 1000, apache/kafka)
#   $ROOT/redis/          certificate, key, CA, ACL file (uid 999, the redis image)
#   /credentials/ca/             the CA's key: only this job reads it
#
# Existing secrets are kept (rotation: docs/operations.md).
set -euo pipefail

ROOT=${CREDENTIALS_ROOT:-/credentials}
export TLS_DIR=$ROOT/ca CREDENTIALS_DIR=$ROOT/roles
export SERVER_SANS=DNS:kafka,DNS:redis,DNS:localhost REDIS_HOST=redis REDIS_PORT=6379
export ROLE_CA_FILE=/run/secrets/modstream/ca.pem
bash "$(dirname "${BASH_SOURCE[0]}")/../credentials.sh" make

umask 077
rm -rf "$ROOT/kafka" "$ROOT/redis"
mkdir -p "$ROOT/kafka/principals" "$ROOT/redis"
cp "$TLS_DIR/broker-keystore.pem" "$TLS_DIR/ca.pem" "$ROOT/kafka/"
for dir in "$CREDENTIALS_DIR"/*/; do
  who=$(basename "$dir")
  mkdir -p "$ROOT/kafka/principals/$who"
  cp "$dir/MODSTREAM_KAFKA_PASSWORD" "$ROOT/kafka/principals/$who/"
done
cp "$TLS_DIR/redis.crt" "$TLS_DIR/redis.key" "$TLS_DIR/ca.pem" "$TLS_DIR/redis-users.acl" "$ROOT/redis/"
if [[ $EUID == 0 && -z ${CREDENTIALS_NO_CHOWN:-} ]]; then
  chown -R 1000:1000 "$ROOT/kafka"
  chown -R 999:1000 "$ROOT/redis"
  chown -R 10001:10001 "$CREDENTIALS_DIR"
fi
chmod 700 "$TLS_DIR"
echo "credentials-init: roles $(ls "$CREDENTIALS_DIR" | tr '\n' ' ')"
