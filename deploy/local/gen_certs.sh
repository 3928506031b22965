#!/usr/bin/env bash
# Make a private CA, a simulator certificate (for HOST, default localhost and 127.0.0.1) and one
# client certificate per agent, for TLS with mutual authentication. Usage: gen_certs.sh DIR [HOST]
set -euo pipefail
dir=${1:?usage: gen_certs.sh DIR [HOST]}
host=${2:-localhost}
shift 2 2>/dev/null || shift 1
agents=("$@")
mkdir -p "$dir"
cd "$dir"
umask 077
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
  -subj "/CN=fedcomm CA" -keyout ca.key -out ca.crt 2>/dev/null
issue() {  # issue NAME SAN
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
    -keyout "$1.key" -out "$1.csr" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
    -extfile <(printf 'subjectAltName=%s\n' "$2") -out "$1.crt" 2>/dev/null
  rm "$1.csr"
}
issue sim "DNS:$host,DNS:localhost,IP:127.0.0.1"
for agent in "${agents[@]}"; do issue "$agent" "DNS:$agent"; done
echo "wrote CA, sim and ${#agents[@]} agent certificates to $dir"
