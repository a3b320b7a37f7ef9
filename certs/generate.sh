#!/usr/bin/env bash
# (Re)generate the proof-of-concept PKI of the RFD ("Authentication"): a
# self-signed CA, a server certificate for localhost, 127.0.0.1 and ::1, and
# one client certificate per user (CN = the user's name, clientAuth only).
# RSA 4096, sha256WithRSAEncryption, valid for DAYS (10 years by default).
#
# Usage: certs/generate.sh [OUTPUT_DIR]
#   OUTPUT_DIR defaults to certs/ itself, the committed demo PKI (used only
#   when pointed at: TASKMAN_CERTS_DIR=certs or the server's certificate
#   options; its CA key is public, so a server refuses it on a non-loopback
#   address). The CA's private key goes to OUTPUT_DIR/ca.key.
# Environment: USERS (default "client001 client002 admin"), BITS (4096),
#   DAYS (3650), SERVER_NAMES (default "DNS:localhost,IP:127.0.0.1,IP:::1").
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here}"
ca_key="$out/ca.key"
users="${USERS:-client001 client002 admin}"
bits="${BITS:-4096}"
days="${DAYS:-3650}"
server_names="${SERVER_NAMES:-DNS:localhost,IP:127.0.0.1,IP:::1}"

mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
umask 077

key() { openssl genpkey -quiet -algorithm RSA -pkeyopt "rsa_keygen_bits:$bits" -out "$1"; }

# sign NAME SUBJECT EXTENSIONS: NAME.key + NAME.crt signed by the CA
sign() {
    local name="$1" subject="$2" extensions="$3"
    key "$out/$name.key"
    openssl req -new -key "$out/$name.key" -subj "$subject" -out "$work/$name.csr"
    printf '%s\n' "$extensions" > "$work/$name.ext"
    openssl x509 -req -sha256 -days "$days" -in "$work/$name.csr" \
        -CA "$out/ca.crt" -CAkey "$ca_key" -set_serial "0x$(openssl rand -hex 16)" \
        -extfile "$work/$name.ext" -out "$out/$name.crt" 2>/dev/null
}

key "$ca_key"
openssl req -x509 -new -sha256 -days "$days" -key "$ca_key" -subj "/CN=taskman CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out "$out/ca.crt"

common="basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid"

sign server "/CN=localhost" "$common
extendedKeyUsage=serverAuth
subjectAltName=$server_names"

for user in $users; do
    sign "$user" "/CN=$user" "$common
extendedKeyUsage=clientAuth"
done

# Readable by whoever runs the CLI from an installed package; a real
# deployment would keep each key readable by its owner only.
chmod 644 "$out"/*.crt "$out"/*.key
chmod 600 "$ca_key"
echo "certificates written to $out (CA key: $ca_key)"
