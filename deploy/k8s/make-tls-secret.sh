#!/usr/bin/env bash
# Writes the Secret `flashmem-tls` (ca.crt, tls.crt, tls.key) that the gpu overlays mount: a new
# cluster CA and one certificate, usable as server and client (mTLS), naming every address the
# components dial inside the cluster. The Secret goes to stdout:
#   deploy/k8s/make-tls-secret.sh [--namespace flashmem] [--public-name api.example.com] [--days 365] [--out DIR] | kubectl apply -f -
# --out keeps the CA key and certificates in DIR (keep the CA key offline: it signs new members).
set -euo pipefail
ns=flashmem; public=""; days=365; out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --namespace) ns=$2; shift 2 ;;
    --public-name) public=$2; shift 2 ;;
    --days) days=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "make-tls-secret.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
dir=${out:-$(mktemp -d)}
mkdir -p "$dir"
[ -n "$out" ] || trap 'rm -rf "$dir"' EXIT
sans="DNS:flashmem-coordinator,DNS:flashmem-coordinator.$ns,DNS:flashmem-coordinator.$ns.svc"
sans="$sans,DNS:flashmem-memtier,DNS:flashmem-memtier.$ns,DNS:flashmem-memtier.$ns.svc"
sans="$sans,DNS:*.flashmem-workers.$ns.svc,DNS:*.flashmem-worker.$ns.svc,DNS:localhost,IP:127.0.0.1"
[ -z "$public" ] || sans="$sans,DNS:$public"
openssl req -x509 -newkey rsa:3072 -nodes -keyout "$dir/ca.key" -out "$dir/ca.crt" -days "$days" \
  -subj "/CN=flashmem cluster CA ($ns)" 2> /dev/null
openssl req -newkey rsa:3072 -nodes -keyout "$dir/tls.key" -out "$dir/tls.csr" -subj "/CN=flashmem.$ns" 2> /dev/null
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n' "$sans" > "$dir/ext.cnf"
openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial -out "$dir/tls.crt" \
  -days "$days" -extfile "$dir/ext.cnf" 2> /dev/null
b64() { base64 -w0 < "$1"; }
cat <<YAML
apiVersion: v1
kind: Secret
metadata:
  name: flashmem-tls
  namespace: $ns
  labels:
    app.kubernetes.io/name: flashmem
type: kubernetes.io/tls
data:
  ca.crt: $(b64 "$dir/ca.crt")
  tls.crt: $(b64 "$dir/tls.crt")
  tls.key: $(b64 "$dir/tls.key")
YAML
