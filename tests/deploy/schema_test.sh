#!/usr/bin/env bash
# Every overlay of deploy/k8s renders and every rendered object validates against the Kubernetes
# schemas offline (deploy/k8s/validate: kubernetes-models, Prometheus Operator, LeaderWorkerSet);
# make-tls-secret.sh writes a Secret whose certificate names every address the components dial.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
k8s=$root/deploy/k8s
if [ ! -d "$k8s/validate/node_modules/kubernetes-models" ]; then
  echo "schema_test: deploy/k8s/validate has no node_modules: run 'npm ci' there (scripts/bootstrap.sh deps does)" >&2
  exit 1
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail=0
for o in base overlays/dev overlays/gpu overlays/gpu-lws; do
  if ! "$k8s/render.sh" "$o" > "$tmp/r.yaml" 2> "$tmp/err"; then
    echo "FAIL render $o:"; cat "$tmp/err"; fail=1; continue
  fi
  if out=$(node "$k8s/validate/validate.mjs" "$tmp/r.yaml" 2>&1); then echo "ok   $o: $out"
  else echo "FAIL $o:"; echo "$out"; fail=1; fi
  # The standalone kustomize (the fallback without kubectl) renders the same objects.
  if FLASHMEM_STANDALONE_KUSTOMIZE=1 "$k8s/render.sh" "$o" > "$tmp/s.yaml" 2> "$tmp/err"; then
    diff -q "$tmp/r.yaml" "$tmp/s.yaml" > /dev/null || { echo "FAIL $o: kubectl kustomize and the standalone kustomize differ"; diff "$tmp/r.yaml" "$tmp/s.yaml" | head -20; fail=1; }
  else echo "FAIL standalone render $o:"; cat "$tmp/err"; fail=1; fi
done
# The validator must refuse what is wrong (a string port, a kind it has no schema for).
printf 'apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: "x"}]}\n---\napiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n' > "$tmp/bad.yaml"
if node "$k8s/validate/validate.mjs" "$tmp/bad.yaml" > "$tmp/bad.out" 2>&1; then echo "FAIL: validator accepted invalid objects"; fail=1
elif ! grep -q "2 invalid" "$tmp/bad.out"; then echo "FAIL: validator:"; cat "$tmp/bad.out"; fail=1
else echo "ok   invalid objects refused"; fi
# TLS Secret: the certificate covers the in-cluster names of every component.
if bash "$k8s/make-tls-secret.sh" --namespace flashmem --out "$tmp/tls" > "$tmp/secret.yaml" 2> "$tmp/err"; then
  sans=$(openssl x509 -in "$tmp/tls/tls.crt" -noout -ext subjectAltName 2>/dev/null)
  for name in flashmem-coordinator flashmem-memtier '\*.flashmem-workers.flashmem.svc' '\*.flashmem-worker.flashmem.svc'; do
    echo "$sans" | grep -q "DNS:$name" || { echo "FAIL: certificate lacks DNS:$name: $sans"; fail=1; }
  done
  openssl verify -CAfile "$tmp/tls/ca.crt" "$tmp/tls/tls.crt" > /dev/null || { echo "FAIL: certificate does not verify"; fail=1; }
  node "$k8s/validate/validate.mjs" "$tmp/secret.yaml" > /dev/null 2>&1 || { echo "FAIL: the Secret does not validate"; fail=1; }
  grep -q "name: flashmem-tls" "$tmp/secret.yaml" || { echo "FAIL: Secret name"; fail=1; }
  [ $fail = 0 ] && echo "ok   make-tls-secret.sh"
else
  echo "FAIL make-tls-secret.sh:"; cat "$tmp/err"; fail=1
fi
exit $fail
