# bench/lib.sh: what bench/load.sh and bench/fixed.sh share, sourced by both.
#
# It builds ./cmd/caddy from this checkout into a scratch directory, starts
# the three (or, with Redis, four) Caddy processes and the redis-server on
# loopback, checks that (b) and (c) really run the limiter and (a) does not,
# and stops exactly the processes it started when the script exits.
#
#   (a) reverse_proxy alone                        bench/proxy.Caddyfile
#   (b) llm_rate_limit + the same reverse_proxy    bench/llm.Caddyfile
#   (c) (b) with the Redis store                   bench/llm-redis.Caddyfile
#   upstream: a static `respond` site              bench/upstream.Caddyfile
#
# Knobs (environment), read when this file is sourced:
#   BENCH_PROXY_PORT=18080 BENCH_LLM_PORT=18081 BENCH_UPSTREAM_PORT=18090
#   REDIS=1 BENCH_LLM_REDIS_PORT=18082 BENCH_REDIS_PORT=18379
#   OUT_DIR         where raw outputs go (default bench/out/<time>/)
#
# After sourcing: $root, $bench, $out_dir, $REDIS (0 when redis-server is
# missing), configs=(a b [c]); call bench_start, then url a|b|c.
# shellcheck shell=bash

export BENCH_PROXY_PORT=${BENCH_PROXY_PORT:-18080}
export BENCH_LLM_PORT=${BENCH_LLM_PORT:-18081}
export BENCH_UPSTREAM_PORT=${BENCH_UPSTREAM_PORT:-18090}
export BENCH_LLM_REDIS_PORT=${BENCH_LLM_REDIS_PORT:-18082}
export BENCH_REDIS_PORT=${BENCH_REDIS_PORT:-18379}
REDIS=${REDIS:-1}
if [ "$REDIS" = 1 ] && ! command -v redis-server >/dev/null 2>&1; then
	echo "== redis-server not installed: skipping (c); apt-get install redis-server to include it"
	REDIS=0
fi
configs=(a b)
if [ "$REDIS" = 1 ]; then
	configs+=(c)
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bench="$root/bench"
export PATH=/usr/local/go/bin:$PATH

# Raw outputs of this invocation are kept in bench/out/<time>/ (ignored by
# git) for anyone who wants more than the summary.
out_dir=${OUT_DIR:-"$bench/out/$(date +%Y%m%d-%H%M%S)"}
mkdir -p "$out_dir"

# need_tool command package: installs a missing load generator from Debian
# when the script runs as root, and stops the script otherwise.
need_tool() {
	if command -v "$1" >/dev/null 2>&1; then
		return 0
	fi
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
		echo "== installing $2 (apt)"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
	else
		echo "$1 is not installed: apt-get install $2 (as root), then run again" >&2
		exit 1
	fi
}

pids=()
work=
bench_cleanup() {
	# Stop only the processes this script started, by their ids.
	for pid in "${pids[@]}"; do
		kill "$pid" 2>/dev/null || true
	done
	for pid in "${pids[@]}"; do
		wait "$pid" 2>/dev/null || true
	done
	if [ -n "$work" ]; then
		rm -rf "$work"
	fi
}

bench_start_caddy() { # name Caddyfile
	"$work/caddy" run --adapter caddyfile --config "$2" >"$work/$1.log" 2>&1 &
	pids+=($!)
}

bench_wait_port() { # name port
	for _ in $(seq 1 100); do
		if curl -s -o /dev/null "http://127.0.0.1:$2/" 2>/dev/null; then
			return 0
		fi
		sleep 0.1
	done
	echo "$1 did not start on port $2; its log:" >&2
	cat "$work/$1.log" >&2
	exit 1
}

bench_probe() { # port
	curl -s -D - -o /dev/null "http://127.0.0.1:$1/v1/chat/completions" \
		-H 'Content-Type: application/json' -H 'X-User: probe' \
		-d '{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
}

# bench_start builds Caddy, starts every server and checks them. It sets an
# EXIT trap that stops them.
bench_start() {
	# Caddy with the module and the standard modules, from this checkout. A
	# scratch directory holds the binary, Caddy's data/config dirs and the
	# logs, so the benchmark leaves nothing behind in $HOME.
	work=$(mktemp -d /tmp/llmrl-bench.XXXXXX)
	trap bench_cleanup EXIT
	export XDG_DATA_HOME="$work/data" XDG_CONFIG_HOME="$work/config"
	echo "== building ./cmd/caddy into $work"
	(cd "$root" && go build -trimpath -o "$work/caddy" ./cmd/caddy)

	bench_start_caddy upstream "$bench/upstream.Caddyfile"
	bench_start_caddy proxy "$bench/proxy.Caddyfile"
	bench_start_caddy llm "$bench/llm.Caddyfile"
	if [ "$REDIS" = 1 ]; then
		redis-server --port "$BENCH_REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
			--dir "$work" --daemonize no --loglevel warning >"$work/redis.log" 2>&1 &
		pids+=($!)
		for _ in $(seq 1 100); do
			if redis-cli -p "$BENCH_REDIS_PORT" ping >/dev/null 2>&1; then break; fi
			sleep 0.1
		done
		bench_start_caddy llm-redis "$bench/llm-redis.Caddyfile"
	fi
	bench_wait_port upstream "$BENCH_UPSTREAM_PORT"
	bench_wait_port proxy "$BENCH_PROXY_PORT"
	bench_wait_port llm "$BENCH_LLM_PORT"
	if [ "$REDIS" = 1 ]; then
		bench_wait_port llm-redis "$BENCH_LLM_REDIS_PORT"
	fi

	# Sanity: (b) really runs the limiter (its headers are there) and (a)
	# does not. (Captured first: grep -q in a pipeline could SIGPIPE curl
	# under pipefail.)
	local hdr_a hdr_b hdr_c
	hdr_b=$(bench_probe "$BENCH_LLM_PORT")
	hdr_a=$(bench_probe "$BENCH_PROXY_PORT")
	if ! grep -qi '^RateLimit-Policy:' <<<"$hdr_b"; then
		echo "(b) did not answer with RateLimit-Policy: is llm_rate_limit configured?" >&2
		echo "$hdr_b" >&2
		exit 1
	fi
	if grep -qi '^RateLimit-Policy:' <<<"$hdr_a"; then
		echo "(a) unexpectedly answered with RateLimit-Policy" >&2
		exit 1
	fi
	if [ "$REDIS" = 1 ]; then
		hdr_c=$(bench_probe "$BENCH_LLM_REDIS_PORT")
		if ! grep -qi '^RateLimit-Policy:' <<<"$hdr_c" || [ "$(redis-cli -p "$BENCH_REDIS_PORT" dbsize)" = 0 ]; then
			echo "(c) did not answer with RateLimit-Policy, or wrote nothing to Redis" >&2
			echo "$hdr_c" >&2
			exit 1
		fi
	fi
}

url() { # a|b|c
	case "$1" in
	a) echo "http://127.0.0.1:$BENCH_PROXY_PORT/v1/chat/completions" ;;
	b) echo "http://127.0.0.1:$BENCH_LLM_PORT/v1/chat/completions" ;;
	c) echo "http://127.0.0.1:$BENCH_LLM_REDIS_PORT/v1/chat/completions" ;;
	esac
}

config_name() { # a|b|c
	case "$1" in
	a) echo "(a) reverse_proxy" ;;
	b) echo "(b) llm_rate_limit+rp" ;;
	c) echo "(c) (b) on Redis" ;;
	esac
}

# bench_warn_load: anything else busy on the machine (a build, a fuzzer)
# skews the runs it overlaps; say so up front rather than let it pass for
# the proxy's cost.
bench_warn_load() {
	echo "== machine: $(nproc) cores, $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
	local load1
	read -r load1 _ </proc/loadavg
	if awk -v l="$load1" 'BEGIN { exit !(l > 0.5) }'; then
		echo "== warning: 1-minute load average is $load1 before the runs; other work will add noise"
	fi
}

# Summaries: the median is what the ratios use, since one run disturbed by
# a neighbour on a shared VM moves a mean a lot and a median hardly at all.
mean() { printf '%s\n' "$@" | awk '{ s += $1 } END { printf "%.2f", s / NR }'; }
# median_to places values...: the median to that many decimal places.
median() { median_to 2 "$@"; }
median_to() {
	local places=$1
	shift
	printf '%s\n' "$@" | sort -g | awk -v f="%.${places}f" '{ v[NR] = $1 } END {
	if (NR % 2) printf f, v[(NR + 1) / 2]; else printf f, (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
