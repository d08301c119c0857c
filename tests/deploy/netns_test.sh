#!/usr/bin/env bash
# Multi-host test without Kubernetes: coordinator, memtier, two workers and a client, each in its
# own network namespace with its own address, joined by veth pairs to a bridge in a sixth
# namespace (the "switch"). As in Kubernetes pods, memtier and the workers listen on 0.0.0.0 and
# register an --advertise-host; every probe goes to a plaintext --health-listen port. Nothing is configured outside the namespaces this test creates, and
# every address it uses is inside them.
#   0. the components are started in reverse order of dependency and wait for each other;
#   1. a session generates text across the hosts (client -> coordinator -> worker -> memtier);
#   2. the serving worker's link is taken down mid-generation: no reset reaches anyone, the
#      worker's lease runs out, the coordinator cancels the stalled stream and moves the session
#      to the other worker, which restores it from memtier; the final text equals an
#      uninterrupted run's;
#   3. memtier's link goes down and comes back: a generation started meanwhile either continues
#      or fails with a clear retryable error, and the cluster serves again once the link is up.
# Usage: netns_test.sh FLASHMEM FLASHMEM_WORKER FLASHMEM_MEMTIER FLASHMEM_COORDINATOR
set -uo pipefail
FM=$1 WORKER=$2 MEMTIER=$3 COORD=$4
id=$$
p="fm${id}"                       # namespace and interface prefix (interface names <= 15 chars)
net="10.$(( 200 + id % 50 )).$(( id / 50 % 250 )).0"
pre=${net%.0}
declare -A ip=([coord]=$pre.1 [mt]=$pre.2 [w1]=$pre.3 [w2]=$pre.4 [cli]=$pre.5)
tmp=$(mktemp -d /tmp/fm-netns.XXXXXX)
pids=()
fail=0

log() { echo "[netns $(date +%T)] $*" >&2; }
check() {  # check DESCRIPTION COMMAND...
  local what=$1; shift
  if "$@"; then log "ok   $what"; else log "FAIL $what"; fail=1; fi
}
cleanup() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2> /dev/null; done
  wait 2> /dev/null
  for h in coord mt w1 w2 cli sw; do ip netns del "$p-$h" 2> /dev/null; done
  if [ $fail != 0 ]; then for f in "$tmp"/*.log; do echo "== $f"; tail -20 "$f"; done; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

if ! ip netns add "$p-sw" 2> "$tmp/err"; then
  echo "netns_test: cannot create network namespaces here ($(cat "$tmp/err")): needs CAP_NET_ADMIN (root)" >&2
  exit 1
fi
on() { local h=$1; shift; ip netns exec "$p-$h" "$@"; }
on sw ip link set lo up
on sw ip link add br0 type bridge
on sw ip link set br0 up
for h in coord mt w1 w2 cli; do
  ip netns add "$p-$h"
  ip link add "$p$h" netns "$p-sw" type veth peer name eth0 netns "$p-$h"
  on sw ip link set "$p$h" master br0 up
  on "$h" ip link set lo up
  on "$h" ip addr add "${ip[$h]}/24" dev eth0
  on "$h" ip link set eth0 up
done
link() { on sw ip link set "$p$1" "$2"; }   # link HOST up|down: the switch port of that host
log "hosts: coord ${ip[coord]}, memtier ${ip[mt]}, workers ${ip[w1]} ${ip[w2]}, client ${ip[cli]}"

# start HOST NAME CMD...: a process in a host's namespace, stdout+stderr to NAME.log
start() {
  local h=$1 name=$2; shift 2
  ip netns exec "$p-$h" env UCX_TLS=tcp,self OMP_WAIT_POLICY=PASSIVE "$@" > "$tmp/$name.log" 2>&1 &
  pids+=($!)
  eval "pid_$name=$!"
}
wait_line() {  # wait_line NAME PATTERN SECONDS
  for _ in $(seq 1 $(( $3 * 10 ))); do grep -q "$2" "$tmp/$1.log" && return 0; sleep 0.1; done
  return 1
}
"$FM" ckpt random --preset tiny --layers 2 --seed 7 --out "$tmp/model" > /dev/null || { log "FAIL model"; exit 1; }
# Started in the worst order, as Kubernetes may: workers before memtier, memtier before the
# coordinator. Each waits for what it depends on (--startup-wait-s) instead of exiting. The next
# process starts only once the ones before it say they are waiting: a fixed sleep let a worker
# still loading its model on a busy CI machine find memtier already up, and never wait.
# memtier and the workers listen on every address and advertise their own, as in Kubernetes pods.
for w in w1 w2; do
  start "$w" "$w" "$WORKER" --listen 0.0.0.0:7080 --advertise-host "${ip[$w]}" --model "$tmp/model" \
    --memtier "${ip[mt]}:7300" --coordinator "${ip[coord]}:7000" --metrics-listen 0.0.0.0:7082 --health-listen 0.0.0.0:7081 \
    --startup-wait-s 120
done
check "worker 1 waits for memtier" wait_line w1 "waiting up to .* for memtier" 120
check "worker 2 waits for memtier" wait_line w2 "waiting up to .* for memtier" 120
start mt memtier "$MEMTIER" --grpc-listen 0.0.0.0:7300 --ucx-listen 0.0.0.0:7301 --advertise-host "${ip[mt]}" \
  --data-dir "$tmp/mt-data" --ram-bytes 268435456 --coordinator "${ip[coord]}:7000" --health-listen 0.0.0.0:7302 \
  --startup-wait-s 120
check "memtier waits for the coordinator" wait_line memtier "waiting up to .* for the coordinator" 60
start coord coord "$COORD" --listen "${ip[coord]}:7000" --data-dir "$tmp/coord-data" --health-listen "${ip[coord]}:7001" \
  --metrics-listen "${ip[coord]}:7002"
check "coordinator up" wait_line coord LISTENING 30
check "memtier up (after waiting for the coordinator)" wait_line memtier LISTENING 60
check "memtier said it waited" grep -q "waiting up to .* for the coordinator" "$tmp/memtier.log"
check "worker 1 up" wait_line w1 LISTENING 120
check "worker 2 up" wait_line w2 LISTENING 120
check "worker 1 said it waited for memtier" grep -q "waiting up to .* for memtier" "$tmp/w1.log"
for h in coord:7001 mt:7302 w1:7081 w2:7081; do
  check "health of ${h%%:*} from the client's host" on cli "$FM" health --target "${ip[${h%%:*}]}:${h##*:}" > /dev/null
done
check "memtier registered at its advertised address" grep -q "memtier [0-9]* at ${ip[mt]}:7300" "$tmp/coord.log"
for w in w1 w2; do
  check "the coordinator dials $w at its advertised address" grep -q "worker [0-9]* at ${ip[$w]}:7080" "$tmp/coord.log"
done
[ $fail = 0 ] || exit 1

prompt="Pages move between hosts over the network while"
tokens=400
complete() { on cli "$FM" complete --target "${ip[coord]}:7000" --prompt "$prompt" --max-tokens "$tokens" "$@"; }
# 1. An uninterrupted run.
complete > "$tmp/reference.txt" 2> "$tmp/reference.err"
check "a session completes across the hosts" test -s "$tmp/reference.txt"
check "the completion starts with the prompt" grep -q "^$prompt" "$tmp/reference.txt"

# 2. The serving worker's link goes down mid-generation.
metric() {  # metric HOST PORT NAME: a value from the host's /metrics (HTTP from the client's host)
  on cli bash -c "exec 3<>/dev/tcp/${ip[$1]}/$2 && printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3 && cat <&3" 2> /dev/null |
    awk -v n="$3" '$1 == n { print int($2) }'
}
generating() { metric "$1" 7082 flashmem_worker_generating_sessions; }
sleep 1  # the workers' gauges (refreshed every 200 ms) forget the reference session
complete > "$tmp/failover.txt" 2> "$tmp/failover.err" &
client=$!
pids+=($client)
grown=0
for _ in $(seq 1 300); do
  [ "$(wc -c < "$tmp/failover.txt")" -gt $(( ${#prompt} + 8 )) ] && { grown=1; break; }
  sleep 0.1
done
check "tokens streamed before the cut" test $grown = 1
serving=""
for _ in $(seq 1 50); do  # exactly one worker generating
  g1=$(generating w1) g2=$(generating w2)
  [ "$g1/$g2" = 1/0 ] && serving=w1
  [ "$g1/$g2" = 0/1 ] && serving=w2
  [ -n "$serving" ] && break
  sleep 0.1
done
check "the serving worker is known (generating-sessions gauges: w1 $g1, w2 $g2)" test -n "$serving"
[ -n "$serving" ] || exit 1
log "cutting $serving's link (${ip[$serving]})"
cut=$(date +%s)
link "$serving" down
at_cut=$(wc -c < "$tmp/failover.txt")
wait_client() {  # wait_client PID SECONDS: its exit status, 124 (and killed) when it runs longer
  for _ in $(seq 1 $(( $2 * 10 ))); do kill -0 "$1" 2> /dev/null || { wait "$1"; return; }; sleep 0.1; done
  kill -9 "$1"; wait "$1" 2> /dev/null; return 124
}
wait_client "$client" 90; rc=$?
[ $rc = 124 ] && log "the client's stream stalled after the cut (killed after 90 s)"
log "client finished $(( $(date +%s) - cut )) s after the cut"
check "the cut came mid-generation ($at_cut of $(wc -c < "$tmp/reference.txt") bytes)" test "$at_cut" -lt "$(wc -c < "$tmp/reference.txt")"
check "the client's stream ended cleanly (rc=$rc)" test $rc = 0
check "final text identical to the uninterrupted run" cmp -s "$tmp/reference.txt" "$tmp/failover.txt"
failovers=""
for _ in $(seq 1 30); do  # gauges refresh every 200 ms
  failovers=$(metric coord 7002 flashmem_coordinator_failovers)
  [ "$failovers" = 1 ] && break
  sleep 0.2
done
check "the coordinator moved one session (failovers metric: '$failovers')" test "$failovers" = 1
check "and sees one live worker" test "$(metric coord 7002 flashmem_coordinator_workers_live)" = 1

# 3. memtier's link goes down, then up again.
log "cutting memtier's link"
link mt down
complete > "$tmp/mt-down.txt" 2> "$tmp/mt-down.err" &
client=$!
pids+=($client)
sleep 4
link mt up
log "memtier's link is back"
wait_client "$client" 90; rc=$?
if [ $rc = 0 ]; then
  check "generation during memtier's outage continued" grep -q "^$prompt" "$tmp/mt-down.txt"
else
  log "generation during the outage failed (rc=$rc): $(tr '\n' ' ' < "$tmp/mt-down.err")"
  check "its error is clear and retryable (UNAVAILABLE / memtier named)" grep -Eiq "unavailable|memtier" "$tmp/mt-down.err"
fi
# After the outage the cluster serves again (a retry, as a client would).
ok=0
for attempt in 1 2 3 4 5; do
  if complete > "$tmp/after.txt" 2> "$tmp/after.err"; then ok=1; break; fi
  log "retry $attempt after the outage: $(tail -1 "$tmp/after.err")"; sleep 2
done
check "the cluster serves after memtier's link is back" test $ok = 1
check "and gives the same text" cmp -s "$tmp/reference.txt" "$tmp/after.txt"
exit $fail
