#!/usr/bin/env bash
# Make docker/secrets/ for compose.yaml, once: a random PostgreSQL password, the node's
# configuration file with the database URL and the SHA-256 of a new RIS token, which is
# printed once here and stored nowhere else. Refuses to overwrite existing secrets.
#
# The directory is 0700 (only you on this host); the files inside are 0644 because compose
# bind-mounts them into containers whose users (postgres, uid 10001) must read them.
set -euo pipefail

DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/secrets"
if [[ -e $DIR/postgres_password || -e $DIR/node.toml ]]; then
    echo "make-secrets.sh: $DIR already holds secrets; remove them first to make new ones" >&2
    exit 1
fi
umask 077
mkdir -p "$DIR"
chmod 0700 "$DIR"

password="$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
token="$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
token_sha256="$(printf %s "$token" | sha256sum | cut -d' ' -f1)"

printf %s "$password" >"$DIR/postgres_password"
cat >"$DIR/node.toml" <<TOML
# Made by docker/make-secrets.sh. Settings in MEDGEMMA_NODE_* variables (compose.yaml)
# override this file.
[storage]
database_url = "postgresql+psycopg://medgemma:${password}@postgres:5432/medgemma"

[[auth.tokens]]
name = "ris"
sha256 = "${token_sha256}"
scopes = ["system/DiagnosticReport.read", "system/Observation.read",
          "system/ImagingStudy.read", "system/Communication.read",
          "system/Communication.write", "system/Subscription.write"]
TOML
chmod 0644 "$DIR/postgres_password" "$DIR/node.toml"

echo "secrets written to $DIR (directory 0700)"
echo "the RIS bearer token (shown only now; the node keeps its SHA-256):"
echo "  $token"
