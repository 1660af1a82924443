#!/bin/sh
# Makes deploy/secrets/ for deploy/compose.yaml with openssl: a private CA, a server certificate
# for the name "session-authority" (and localhost), and an API key. Prints the AUTH_API_KEYS
# line for deploy/.env. For trying the service out: use your own CA in production.
set -eu
cd "$(dirname "$0")/.."
mkdir -p secrets
chmod 700 secrets   # only you; the files inside are readable by the container's user 10001
cd secrets
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
  -subj "/CN=session-authority compose CA" -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj "/CN=session-authority" -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=DNS:session-authority,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 90 \
  -extfile server.ext -out server.crt 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 600 ca.key
chmod 644 ca.crt server.crt server.key
(umask 077 && openssl rand -base64 32 | tr -d '\n' > api-key)
printf 'AUTH_API_KEYS=login:%s\n' "$(tr -d '\n' < api-key | sha256sum | cut -d' ' -f1)"
