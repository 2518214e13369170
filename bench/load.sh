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
# alternating runs so that drift of the machine (thermal, noisy neighbours,
# page cache) hits both alike. Each round starts one configuration later
# (a b c, b c a, c a b, ...): with a fixed order, a machine that speeds up
# or slows down over the invocation would favour whichever runs last. It
# prints requests/s and p99 latency of every run, the median (and mean) of
# each configuration, the ratios b/a, c/a and c/b of the medians, and the
# median of each round's own ratio (runs a few seconds apart, the least
# touched by drift).
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
#   OUT_DIR=bench/out/<time>   where the raw wrk outputs go
# The servers are started by bench/lib.sh, shared with bench/fixed.sh.
#
# It installs nothing, except wrk when it is missing and the script runs as
# root (Debian package `wrk`). It needs Go to build ./cmd/caddy.
#
# Caveat for small machines: wrk, both Caddy processes and the upstream share
# the same cores. On 2 cores the numbers are a relative measure (b against a
# on the same machine in the same minute), not the throughput Caddy reaches
# on a dedicated box. wrk is closed-loop, so p99 here is latency under
# saturation; bench/fixed.sh measures latency at a fixed request rate well
# below it, with hey.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-15s}
WARMUP=${WARMUP:-5s}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-32}

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need_tool wrk wrk
bench_start

# --- runs -----------------------------------------------------------------
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

bench_warn_load
echo "== wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency -s bench/post.lua" \
	"($(wrk -t1 -c1 -d1s -s "$bench/post.lua" "$(url a)" | awk '/^body_bytes/ {print $2}') byte body), $ROUNDS rounds"
echo "== warm-up ($WARMUP each)"
for c in "${configs[@]}"; do
	run "$c" "$WARMUP" >/dev/null
done

declare -a rps_a=() p99_a=() rps_b=() p99_b=() rps_c=() p99_c=()
printf '%-6s %-24s %12s %10s %9s\n' round config requests/s p99_ms sock_err
for i in $(seq 1 "$ROUNDS"); do
	for k in "${!configs[@]}"; do
		c=${configs[$(((k + i - 1) % ${#configs[@]}))]}
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

# Summaries: medians (and means) from lib.sh; the ratios use the medians.
# round_ratios x y: each round's x/y, one per line; ratio_median x y: their
# median, to three places.
round_ratios() {
	local -n xs=$1 ys=$2
	for j in "${!xs[@]}"; do
		awk -v x="${xs[$j]}" -v y="${ys[$j]}" 'BEGIN { printf "%.4f\n", x / y }'
	done
}
ratio_median() {
	# shellcheck disable=SC2046 # one ratio a word
	median_to 3 $(round_ratios "$1" "$2")
}
ma=$(median "${rps_a[@]}") mb=$(median "${rps_b[@]}")
pa=$(median "${p99_a[@]}") pb=$(median "${p99_b[@]}")
echo "== median (mean) of $ROUNDS runs each"
printf '%-33s %10s req/s (%s)  p99 %s ms (%s)\n' "(a) reverse_proxy" \
	"$ma" "$(mean "${rps_a[@]}")" "$pa" "$(mean "${p99_a[@]}")"
printf '%-33s %10s req/s (%s)  p99 %s ms (%s)\n' "(b) llm_rate_limit+reverse_proxy" \
	"$mb" "$(mean "${rps_b[@]}")" "$pb" "$(mean "${p99_b[@]}")"
awk -v a="$ma" -v b="$mb" -v pa="$pa" -v pb="$pb" 'BEGIN {
	printf "ratio b/a (medians): requests/s %.3f, p99 %.3f\n", b / a, pb / pa }'
echo "ratio b/a, median of the rounds' own: requests/s $(ratio_median rps_b rps_a)"
if [ "$REDIS" = 1 ]; then
	mc=$(median "${rps_c[@]}") pc=$(median "${p99_c[@]}")
	printf '%-33s %10s req/s (%s)  p99 %s ms (%s)\n' "(c) the same, Redis store" \
		"$mc" "$(mean "${rps_c[@]}")" "$pc" "$(mean "${p99_c[@]}")"
	awk -v a="$ma" -v b="$mb" -v c="$mc" -v pa="$pa" -v pb="$pb" -v pc="$pc" 'BEGIN {
	printf "ratio c/a (medians): requests/s %.3f, p99 %.3f\n", c / a, pc / pa
	printf "ratio c/b (medians): requests/s %.3f, p99 %.3f  (Redis store against the in-memory one)\n", c / b, pc / pb }'
	echo "ratio c/b, median of the rounds' own: requests/s $(ratio_median rps_c rps_b)" \
		"(each round: $(round_ratios rps_c rps_b | awk '{ printf "%s%.3f", (NR > 1 ? " " : ""), $1 }'))"
	echo "redis: $(redis-cli -p "$BENCH_REDIS_PORT" info commandstats | grep -E '^cmdstat_(evalsha|eval):' | tr -d '\r')"
fi
echo "raw wrk output: $out_dir"
