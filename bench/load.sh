#!/usr/bin/env bash
# bench/load.sh: what llm_rate_limit costs in front of reverse_proxy.
#
# Runs, on loopback and in the same invocation:
#   (a) Caddy with reverse_proxy alone                   (bench/proxy.Caddyfile)
#   (b) Caddy with llm_rate_limit + the same reverse_proxy (bench/llm.Caddyfile)
#   (c) the same as (b) with the Redis store (bench/llm-redis.Caddyfile), on
#       a redis-server this script starts on loopback; skipped with REDIS=0
#       or when redis-server is not installed
# both in front of one static upstream, a Caddy `respond` site
# (bench/upstream.Caddyfile). wrk POSTs a ~1 KB OpenAI chat body with an
# X-User header (bench/post.lua), with the same settings for (a) and (b), in
# alternating runs (a, b, a, b, ...) so that drift of the machine (thermal,
# noisy neighbours, page cache) hits both alike. It prints requests/s and p99
# latency of every run, the median (and mean) of each configuration, and the
# ratios b/a, c/a and c/b of the medians.
#
# Usage, from anywhere in the repository:
#   bench/load.sh
# Knobs (environment):
#   ROUNDS=3        a,b pairs to run
#   DURATION=15s    length of each measured run
#   WARMUP=5s       unmeasured run against each configuration first
#   THREADS=2 CONNECTIONS=32   wrk -t and -c
#   BENCH_PROXY_PORT=18080 BENCH_LLM_PORT=18081 BENCH_UPSTREAM_PORT=18090
#   REDIS=1 BENCH_LLM_REDIS_PORT=18082 BENCH_REDIS_PORT=18379
#
# It installs nothing, except wrk when it is missing and the script runs as
# root (Debian package `wrk`). It needs Go to build ./cmd/caddy.
#
# Caveat for small machines: wrk, both Caddy processes and the upstream share
# the same cores. On 2 cores the numbers are a relative measure (b against a
# on the same machine in the same minute), not the throughput Caddy reaches
# on a dedicated box. wrk is closed-loop, so p99 here is latency under
# saturation; a fixed-rate comparison (wrk2) is not included, since Debian
# does not package wrk2.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-15s}
WARMUP=${WARMUP:-5s}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-32}
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

# --- wrk ------------------------------------------------------------------
if ! command -v wrk >/dev/null 2>&1; then
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
		echo "== installing wrk (apt)"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
	else
		echo "wrk is not installed: apt-get install wrk (as root), then run again" >&2
		exit 1
	fi
fi

# Raw wrk outputs of this invocation are kept in bench/out/<time>/ (ignored
# by git) for anyone who wants more than the summary.
out_dir="$bench/out/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out_dir"

# --- build ----------------------------------------------------------------
# Caddy with the module and the standard modules, from this checkout. A
# scratch directory holds the binary, Caddy's data/config dirs and the logs,
# so the benchmark leaves nothing behind in $HOME.
work=$(mktemp -d /tmp/llmrl-bench.XXXXXX)
export XDG_DATA_HOME="$work/data" XDG_CONFIG_HOME="$work/config"
echo "== building ./cmd/caddy into $work"
(cd "$root" && go build -trimpath -o "$work/caddy" ./cmd/caddy)

# --- servers --------------------------------------------------------------
pids=()
cleanup() {
	# Stop only the processes this script started, by their ids.
	for pid in "${pids[@]}"; do
		kill "$pid" 2>/dev/null || true
	done
	for pid in "${pids[@]}"; do
		wait "$pid" 2>/dev/null || true
	done
	rm -rf "$work"
}
trap cleanup EXIT

start() { # name Caddyfile
	"$work/caddy" run --adapter caddyfile --config "$2" >"$work/$1.log" 2>&1 &
	pids+=($!)
}

wait_port() { # name port
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

start upstream "$bench/upstream.Caddyfile"
start proxy "$bench/proxy.Caddyfile"
start llm "$bench/llm.Caddyfile"
if [ "$REDIS" = 1 ]; then
	redis-server --port "$BENCH_REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
		--dir "$work" --daemonize no --loglevel warning >"$work/redis.log" 2>&1 &
	pids+=($!)
	for _ in $(seq 1 100); do
		if redis-cli -p "$BENCH_REDIS_PORT" ping >/dev/null 2>&1; then break; fi
		sleep 0.1
	done
	start llm-redis "$bench/llm-redis.Caddyfile"
fi
wait_port upstream "$BENCH_UPSTREAM_PORT"
wait_port proxy "$BENCH_PROXY_PORT"
wait_port llm "$BENCH_LLM_PORT"
if [ "$REDIS" = 1 ]; then
	wait_port llm-redis "$BENCH_LLM_REDIS_PORT"
fi

# Sanity: (b) really runs the limiter (its headers are there) and (a) does not.
probe() { # port
	curl -s -D - -o /dev/null "http://127.0.0.1:$1/v1/chat/completions" \
		-H 'Content-Type: application/json' -H 'X-User: probe' \
		-d '{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
}
# (Captured first: grep -q in a pipeline could SIGPIPE curl under pipefail.)
hdr_b=$(probe "$BENCH_LLM_PORT")
hdr_a=$(probe "$BENCH_PROXY_PORT")
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
	hdr_c=$(probe "$BENCH_LLM_REDIS_PORT")
	if ! grep -qi '^RateLimit-Policy:' <<<"$hdr_c" || [ "$(redis-cli -p "$BENCH_REDIS_PORT" dbsize)" = 0 ]; then
		echo "(c) did not answer with RateLimit-Policy, or wrote nothing to Redis" >&2
		echo "$hdr_c" >&2
		exit 1
	fi
fi

# --- runs -----------------------------------------------------------------
url() { # a|b|c
	case "$1" in
	a) echo "http://127.0.0.1:$BENCH_PROXY_PORT/v1/chat/completions" ;;
	b) echo "http://127.0.0.1:$BENCH_LLM_PORT/v1/chat/completions" ;;
	c) echo "http://127.0.0.1:$BENCH_LLM_REDIS_PORT/v1/chat/completions" ;;
	esac
}

# run a|b|c duration: runs wrk and prints "rps p99_ms socket_errors". A run
# with non-2xx answers stops the script: the limiter refused something, so it
# would not measure the same work as (a). Socket errors (wrk's 2 s timeouts,
# typically when a neighbour takes the CPU) are reported and the run is kept;
# the medians below absorb a disturbed run.
run() {
	local out rps p99 non2xx errors
	out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$2" --latency -s "$bench/post.lua" "$(url "$1")")
	# (run is called in a subshell: name files by time, not by a counter.)
	echo "$out" >"$out_dir/$(date +%H%M%S.%N)-$1-$2.txt"
	rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
	p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
	non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' <<<"$out")
	errors=$(awk '/Socket errors:/ { n = 0; for (i = 3; i <= NF; i += 2) n += $(i + 1); print n }' <<<"$out")
	if [ -n "$non2xx" ]; then
		echo "run ($1) had $non2xx non-2xx answers:" >&2
		echo "$out" >&2
		exit 1
	fi
	# wrk prints latency as 812.00us, 1.23ms or 1.02s: convert to ms.
	p99=$(awk -v v="$p99" 'BEGIN {
		n = v + 0
		if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n *= 1; else if (v ~ /s$/) n *= 1000
		printf "%.2f", n }')
	echo "$rps $p99 ${errors:-0}"
}

echo "== machine: $(nproc) cores, $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
# Anything else busy on the machine (a build, a fuzzer) skews the runs it
# overlaps; say so up front rather than let it pass for the proxy's cost.
read -r load1 _ </proc/loadavg
if awk -v l="$load1" 'BEGIN { exit !(l > 0.5) }'; then
	echo "== warning: 1-minute load average is $load1 before the runs; other work will add noise"
fi
echo "== wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency -s bench/post.lua" \
	"($(wrk -t1 -c1 -d1s -s "$bench/post.lua" "$(url a)" | awk '/^body_bytes/ {print $2}') byte body), $ROUNDS rounds"
echo "== warm-up ($WARMUP each)"
for c in "${configs[@]}"; do
	run "$c" "$WARMUP" >/dev/null
done

declare -a rps_a=() p99_a=() rps_b=() p99_b=() rps_c=() p99_c=()
printf '%-6s %-24s %12s %10s %9s\n' round config requests/s p99_ms sock_err
for i in $(seq 1 "$ROUNDS"); do
	for c in "${configs[@]}"; do
		# A plain assignment, so that a failed run stops the script (set -e).
		res=$(run "$c" "$DURATION")
		read -r rps p99 errs <<<"$res"
		case "$c" in
		a)
			rps_a+=("$rps")
			p99_a+=("$p99")
			name="(a) reverse_proxy"
			;;
		b)
			rps_b+=("$rps")
			p99_b+=("$p99")
			name="(b) llm_rate_limit+rp"
			;;
		c)
			rps_c+=("$rps")
			p99_c+=("$p99")
			name="(c) (b) on Redis"
			;;
		esac
		printf '%-6s %-24s %12s %10s %9s\n' "$i" "$name" "$rps" "$p99" "$errs"
	done
done

# Summaries: the median is what the ratio uses, since one run disturbed by a
# neighbour on a shared VM moves a mean a lot and a median hardly at all.
mean() { printf '%s\n' "$@" | awk '{ s += $1 } END { printf "%.2f", s / NR }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
	if (NR % 2) printf "%.2f", v[(NR + 1) / 2]; else printf "%.2f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ma=$(median "${rps_a[@]}") mb=$(median "${rps_b[@]}")
pa=$(median "${p99_a[@]}") pb=$(median "${p99_b[@]}")
echo "== median (mean) of $ROUNDS runs each"
printf '%-33s %10s req/s (%s)  p99 %s ms (%s)\n' "(a) reverse_proxy" \
	"$ma" "$(mean "${rps_a[@]}")" "$pa" "$(mean "${p99_a[@]}")"
printf '%-33s %10s req/s (%s)  p99 %s ms (%s)\n' "(b) llm_rate_limit+reverse_proxy" \
	"$mb" "$(mean "${rps_b[@]}")" "$pb" "$(mean "${p99_b[@]}")"
awk -v a="$ma" -v b="$mb" -v pa="$pa" -v pb="$pb" 'BEGIN {
	printf "ratio b/a (medians): requests/s %.3f, p99 %.3f\n", b / a, pb / pa }'
if [ "$REDIS" = 1 ]; then
	mc=$(median "${rps_c[@]}") pc=$(median "${p99_c[@]}")
	printf '%-33s %10s req/s (%s)  p99 %s ms (%s)\n' "(c) the same, Redis store" \
		"$mc" "$(mean "${rps_c[@]}")" "$pc" "$(mean "${p99_c[@]}")"
	awk -v a="$ma" -v b="$mb" -v c="$mc" -v pa="$pa" -v pb="$pb" -v pc="$pc" 'BEGIN {
	printf "ratio c/a (medians): requests/s %.3f, p99 %.3f\n", c / a, pc / pa
	printf "ratio c/b (medians): requests/s %.3f, p99 %.3f  (Redis store against the in-memory one)\n", c / b, pc / pb }'
	echo "redis: $(redis-cli -p "$BENCH_REDIS_PORT" info commandstats | grep -E '^cmdstat_(evalsha|eval):' | tr -d '\r')"
fi
echo "raw wrk output: $out_dir"
