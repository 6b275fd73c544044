#!/usr/bin/env bash
# HTTP/1.1 and HTTP/2 over TLS through Strait, nginx and HAProxy, interleaved, with the pinning of
# the shared harness (../shared/bench: proxy on CPU 1, origin and load generator on CPU 0, one
# worker each), which has no TLS scenario. Prints the median req/s and p99 of each proxy for a
# 13-byte and a 64 KiB answer over HTTP/1.1 (wrk) and a 13-byte one over HTTP/2 (h2load, ALPN
# h2, to the origin over HTTP/1.1 as in the harness's S3), and Strait's ratio to the best peer.
# The `close:/hello` load sends each request on a new connection (`Connection: close`), so it
# measures full TLS 1.3 handshakes (wrk keeps no client session cache).
#
#   cargo build --release && scripts/bench-tls.sh            # 3 rounds of 5 s
#   ROUNDS=5 DUR=5 scripts/bench-tls.sh
#   LOADS="close:/hello" scripts/bench-tls.sh                # handshakes only
#   KEY=rsa LOADS="close:/hello" scripts/bench-tls.sh        # with an RSA 2048 certificate
#   NODES=tls LOADS=/hello scripts/bench-tls.sh               # plain clients, TLS to the node
#   STRAIT_BIN_B=/tmp/strait-before scripts/bench-tls.sh      # and another build, interleaved
#
# NODES=tls turns it around: clients speak plain HTTP/1.1 to the proxy (wrk loads only), and
# the proxy speaks TLS 1.3 to the node (an nginx on the origin's core answering `return 200`
# with 13 bytes), keeping up to 256 connections to it (Strait `scheme: https`, nginx
# `proxy_pass https://` with `keepalive 256`, HAProxy `ssl verify none` with `http-reuse safe`).
#
# Needs what ../shared/bench/setup.sh installs (wrk, h2load, nginx, haproxy, the origin server)
# and openssl. TLS 1.3 with a P-256 certificate (KEY=rsa: RSA 2048) for every proxy; keep-alive
# on both sides.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
STRAIT_BIN=${STRAIT_BIN:-$ROOT/target/release/strait}
BACKEND_BIN=${BACKEND_BIN:-$ROOT/../shared/bench/backend/target/release/bench-backend}
ROUNDS=${ROUNDS:-3}
DUR=${DUR:-5}
PORT=${PORT:-19443}
ORIGIN=${ORIGIN:-127.0.0.1:18080}
NODES=${NODES:-plain}
TLS_ORIGIN=${TLS_ORIGIN:-127.0.0.1:18443}
if [[ $NODES == tls ]]; then
    NODE=$TLS_ORIGIN CLIENT_SCHEME=http NODE_SCHEME=https
else
    NODE=$ORIGIN CLIENT_SCHEME=https NODE_SCHEME=http
fi

for tool in wrk nginx haproxy openssl curl taskset; do
    command -v "$tool" >/dev/null || [[ -x /usr/sbin/$tool ]] || { echo "missing: $tool (run ../shared/bench/setup.sh)"; exit 1; }
done
[[ -x $STRAIT_BIN ]] || { echo "missing: $STRAIT_BIN (cargo build --release)"; exit 1; }
[[ -x $BACKEND_BIN ]] || { echo "missing: $BACKEND_BIN (run ../shared/bench/setup.sh)"; exit 1; }

DIR=$(mktemp -d /tmp/strait-bench-tls.XXXXXX)
PIDS=()
PROXY_PID=
cleanup() {
    for p in "${PIDS[@]}" $PROXY_PID; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    # KEEP=1 leaves the configs and logs in $DIR.
    if [[ -n ${KEEP:-} ]]; then echo "kept: $DIR"; else rm -rf "$DIR"; fi
}
trap cleanup EXIT

# KEY=rsa: an RSA 2048 certificate instead (its signature dominates a full handshake).
case ${KEY:-ec} in
    rsa) newkey=(-newkey rsa:2048) ;;
    *) newkey=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1) ;;
esac
openssl req -x509 "${newkey[@]}" -nodes -days 7 \
    -keyout "$DIR/key.pem" -out "$DIR/cert.pem" -subj "/CN=localhost" \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null
cat "$DIR/cert.pem" "$DIR/key.pem" > "$DIR/both.pem"

# Strait: APISIX-format config, the certificate as an `ssls` resource.
mkdir -p "$DIR/strait/conf"
cat > "$DIR/strait/conf/config.yaml" <<EOF
apisix:
  node_listen:
    - ip: 127.0.0.1
      port: $([[ $NODES == tls ]] && echo "$PORT" || echo $((PORT + 1)))
  enable_control: false
  ssl:
    enable: $([[ $NODES == tls ]] && echo false || echo true)
    fallback_sni: localhost
    listen:
      - ip: 127.0.0.1
        port: $([[ $NODES == tls ]] && echo $((PORT + 1)) || echo "$PORT")
deployment:
  role: data_plane
  role_data_plane:
    config_provider: yaml
EOF
{
    echo "ssls:"
    echo "  - id: bench"
    echo "    snis: [localhost]"
    echo "    cert: |"
    sed 's/^/      /' "$DIR/cert.pem"
    echo "    key: |"
    sed 's/^/      /' "$DIR/key.pem"
    cat <<EOF
upstreams:
  - id: up
    scheme: $NODE_SCHEME
    nodes:
      "$NODE": 1
    keepalive_pool: {size: 256, idle_timeout: 60, requests: 1000000}
routes:
  - uri: /*
    upstream_id: up
#END
EOF
} > "$DIR/strait/conf/apisix.yaml"

mkdir -p "$DIR/nginx/tmp"
cat > "$DIR/nginx/nginx.conf" <<EOF
worker_processes 1;
pid $DIR/nginx/nginx.pid;
error_log $DIR/nginx/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $DIR/nginx/tmp;
    proxy_temp_path $DIR/nginx/tmp;
    fastcgi_temp_path $DIR/nginx/tmp;
    uwsgi_temp_path $DIR/nginx/tmp;
    scgi_temp_path $DIR/nginx/tmp;
    keepalive_requests 1000000;
    upstream up { server $NODE; keepalive 256; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$PORT $([[ $NODES == tls ]] || echo ssl http2) backlog=4096;
        ssl_certificate $DIR/cert.pem;
        ssl_certificate_key $DIR/key.pem;
        ssl_protocols TLSv1.3;
        location / {
            proxy_pass $NODE_SCHEME://up;
            proxy_ssl_protocols TLSv1.3;  # nginx 1.22 offers up to TLS 1.2 by default
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffer_size 16k;
            proxy_buffers 8 16k;
            proxy_max_temp_file_size 0;
        }
    }
}
EOF

cat > "$DIR/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 8000
    ssl-default-bind-options ssl-min-ver TLSv1.3
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    http-reuse safe
frontend fe
    bind 127.0.0.1:$PORT $([[ $NODES == tls ]] || echo "ssl crt $DIR/both.pem alpn h2,http/1.1")
    default_backend be
backend be
    server s1 $NODE $([[ $NODES == tls ]] && echo "ssl verify none alpn http/1.1")
EOF

# NODES=tls: the node is an nginx speaking TLS 1.3 with the same certificate.
mkdir -p "$DIR/origin/tmp"
cat > "$DIR/origin/nginx.conf" <<EOF
worker_processes 1;
pid $DIR/origin/nginx.pid;
error_log $DIR/origin/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $DIR/origin/tmp;
    proxy_temp_path $DIR/origin/tmp;
    fastcgi_temp_path $DIR/origin/tmp;
    uwsgi_temp_path $DIR/origin/tmp;
    scgi_temp_path $DIR/origin/tmp;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    server {
        listen $TLS_ORIGIN ssl backlog=4096;
        ssl_certificate $DIR/cert.pem;
        ssl_certificate_key $DIR/key.pem;
        ssl_protocols TLSv1.3;
        location / { return 200 "Hello, World!"; }
    }
}
EOF

start_proxy() {
    case $1 in
        strait_b) taskset -c 1 "$STRAIT_BIN_B" run -c "$DIR/strait/conf/config.yaml" --workers 1 >"$DIR/proxy.log" 2>&1 & ;;
        strait) taskset -c 1 "$STRAIT_BIN" run -c "$DIR/strait/conf/config.yaml" --workers 1 >"$DIR/proxy.log" 2>&1 & ;;
        nginx) taskset -c 1 "$(command -v nginx || echo /usr/sbin/nginx)" -p "$DIR/nginx" -e "$DIR/nginx/error.log" \
            -c "$DIR/nginx/nginx.conf" -g 'daemon off;' >"$DIR/proxy.log" 2>&1 & ;;
        haproxy) taskset -c 1 "$(command -v haproxy || echo /usr/sbin/haproxy)" -db -f "$DIR/haproxy.cfg" \
            >"$DIR/proxy.log" 2>&1 & ;;
    esac
    PROXY_PID=$!
    for _ in $(seq 1 200); do
        curl -sk -o /dev/null "$CLIENT_SCHEME://127.0.0.1:$PORT/hello" && return 0
        sleep 0.05
    done
    echo "$1 did not come up:"; cat "$DIR/proxy.log"; return 1
}

for addr in "$NODE" "127.0.0.1:$PORT"; do
    if (exec 3<>"/dev/tcp/${addr%:*}/${addr##*:}") 2>/dev/null; then
        echo "$addr is already in use (a process left from another run?)"; exit 1
    fi
done
if [[ $NODES == tls ]]; then
    taskset -c 0 "$(command -v nginx || echo /usr/sbin/nginx)" -p "$DIR/origin" -e "$DIR/origin/error.log" \
        -c "$DIR/origin/nginx.conf" -g 'daemon off;' >"$DIR/backend.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 1 200); do curl -sk -o /dev/null "https://$NODE/hello" && break; sleep 0.05; done
else
    taskset -c 0 "$BACKEND_BIN" --http "$ORIGIN" --workers 1 >"$DIR/backend.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 1 200); do curl -s -o /dev/null "http://$ORIGIN/hello" && break; sleep 0.05; done
fi

PROXIES=(nginx haproxy strait)
# STRAIT_BIN_B: another Strait build, run as `strait_b` in each round (an A/B).
[[ -n ${STRAIT_BIN_B:-} ]] && PROXIES+=(strait_b)
: > "$DIR/rows"
# HTTP/1.1 (wrk -c64) for the 13-byte and the 64 KiB answer, then HTTP/2 (h2load -c8 -m16,
# ALPN h2) for the 13-byte one; `close:` loads open a connection per request.
for load in ${LOADS:-/hello /size/65536 h2:/hello}; do
    path=${load#h2:}
    path=${path#close:}
    close=()
    [[ $load == close:* ]] && close=(-H 'Connection: close')
    for r in $(seq 1 "$ROUNDS"); do
        for p in "${PROXIES[@]}"; do
            start_proxy "$p"
            url="$CLIENT_SCHEME://127.0.0.1:$PORT$path"
            if [[ $load == h2:* ]]; then
                command -v h2load >/dev/null || { echo "missing: h2load (nghttp2-client)"; exit 1; }
                taskset -c 0 h2load -t1 -c8 -m16 -D 1 "$url" >/dev/null 2>&1
                out=$(taskset -c 0 h2load -t1 -c8 -m16 -D "$DUR" --log-file "$DIR/h2.log" "$url" 2>&1)
                rate=$(awk '/^finished in/{print $4}' <<<"$out")
                # The log's third column is each request's time in microseconds.
                p99=$(awk '{print $3}' "$DIR/h2.log" | sort -n | awk '{v[NR]=$1} END{printf "%.3fms", v[int(NR*0.99)]/1000}')
                errors=$(awk '/^requests:/ && !/ 0 failed, 0 errored/{print}' <<<"$out")
            else
                taskset -c 0 wrk -t1 -c64 -d1s "${close[@]}" "$url" >/dev/null 2>&1
                out=$(taskset -c 0 wrk -t1 -c64 -d"${DUR}s" --latency "${close[@]}" "$url" 2>&1)
                rate=$(awk '/Requests\/sec/{print $2}' <<<"$out")
                p99=$(awk '/ 99%/{print $2}' <<<"$out")
                errors=$(awk '/Non-2xx|Socket errors/{print}' <<<"$out")
            fi
            kill "$PROXY_PID"; wait "$PROXY_PID" 2>/dev/null || true
            PROXY_PID=
            echo "$load $p $r $rate $p99 ${errors:+($errors)}"
            echo "$load $p $rate $p99" >> "$DIR/rows"
        done
    done
done

python3 - "$DIR/rows" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
def ms(v):
    for unit, f in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if v.endswith(unit):
            return float(v[: -len(unit)]) * f
    return float(v)
print("\nload          proxy     req/s (median)  p99 ms (median)")
for path in dict.fromkeys(r[0] for r in rows):
    med = {}
    for proxy in dict.fromkeys(r[1] for r in rows):
        sel = [r for r in rows if r[0] == path and r[1] == proxy]
        med[proxy] = (statistics.median(float(r[2]) for r in sel), statistics.median(ms(r[3]) for r in sel))
        print(f"{path:<13} {proxy:<9} {med[proxy][0]:>14.0f}  {med[proxy][1]:>15.2f}")
    best = max((p for p in med if p != "strait"), key=lambda p: med[p][0])
    print(f"{path:<13} strait / best peer ({best}): {med['strait'][0] / med[best][0]:.2f}\n")
EOF
