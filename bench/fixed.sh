#!/usr/bin/env bash
# bench/fixed.sh: what llm_rate_limit adds to latency at a fixed request
# rate well below saturation.
#
# bench/load.sh drives the proxies as hard as wrk can, so its p99 is latency
# under saturation: a queue in front of a busy CPU. This script offers the
# same configurations a fixed rate instead (RATE requests/s in total, from
# WORKERS hey workers at RATE/WORKERS requests/s each), so its percentiles
# are the latency a request sees on a machine that keeps up:
#   (a) reverse_proxy alone                        bench/proxy.Caddyfile
#   (b) llm_rate_limit + the same reverse_proxy    bench/llm.Caddyfile
#   (c) (b) with the Redis store                   bench/llm-redis.Caddyfile
# in front of the static upstream of bench/upstream.Caddyfile (servers
# started by bench/lib.sh, as for load.sh). hey POSTs bench/post.json, the
# same 977-byte chat body as bench/post.lua, as one user (X-User); the
# limits of the Caddyfiles are far above anything this sends, so nothing is
# refused. Runs alternate a, b, c, a, b, c, ... and the script prints p50,
# p90 and p99 of every run, their medians per configuration, and the ratios
# b/a and c/a of the medians.
#
# Usage, from anywhere in the repository:
#   bench/fixed.sh
# Knobs (environment):
#   RATE=1000       requests/s offered in total
#   WORKERS=50      hey -c; each worker sends RATE/WORKERS requests/s (hey -q)
#   ROUNDS=3        rounds of a, b (, c)
#   DURATION=15s    length of each measured run
#   WARMUP=5s       unmeasured run against each configuration first
#   REDIS=1, the ports and OUT_DIR as for bench/load.sh (see bench/lib.sh)
#
# It installs nothing, except hey when it is missing and the script runs as
# root (Debian package `hey`). It needs Go to build ./cmd/caddy.
#
# Caveats: hey's summary gives latencies in whole tenths of a millisecond,
# so where latencies are under a millisecond a ratio moves in steps of 10 %
# or more. hey paces each worker with
# a ticker and waits for each answer, so a worker that falls behind sends
# less: the script warns when the achieved rate is below 95 % of RATE,
# since the run then measured saturation, not a fixed rate.
set -euo pipefail

RATE=${RATE:-1000}
WORKERS=${WORKERS:-50}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-15s}
WARMUP=${WARMUP:-5s}

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need_tool hey hey
bench_start

qps=$(awk -v r="$RATE" -v w="$WORKERS" 'BEGIN { printf "%g", r / w }')

# run a|b|c duration: runs hey and prints "rps p50_ms p90_ms p99_ms". A run
# with a non-200 answer or a transport error stops the script: the limiter
# refused something, or the run did not measure the same work as (a).
run() {
	local out rps p50 p90 p99 ok total
	out=$(hey -z "$2" -c "$WORKERS" -q "$qps" -m POST -D "$bench/post.json" \
		-T application/json -H 'Authorization: Bearer sk-bench-not-a-real-key' \
		-H 'X-User: user-0001@example.com' "$(url "$1")")
	echo "$out" >"$out_dir/$(date +%H%M%S.%N)-fixed-$1-$2.txt"
	rps=$(awk '$1 == "Requests/sec:" { printf "%.1f", $2 }' <<<"$out")
	# "  50% in 0.0007 secs": seconds, in ms.
	p50=$(awk '$1 == "50%" && $2 == "in" { printf "%.2f", $3 * 1000 }' <<<"$out")
	p90=$(awk '$1 == "90%" && $2 == "in" { printf "%.2f", $3 * 1000 }' <<<"$out")
	p99=$(awk '$1 == "99%" && $2 == "in" { printf "%.2f", $3 * 1000 }' <<<"$out")
	ok=$(awk '$1 == "[200]" { print $2 }' <<<"$out")
	total=$(awk '/^Status code distribution:/ { s = 1; next } s && /^ *\[[0-9]+\]/ { n += $2 } END { print n + 0 }' <<<"$out")
	if [ -z "$p99" ] || [ "${ok:-0}" != "$total" ] || grep -q '^Error distribution:' <<<"$out"; then
		echo "run ($1) had answers other than 200, errors, or no latency distribution:" >&2
		echo "$out" >&2
		exit 1
	fi
	echo "$rps $p50 $p90 $p99"
}

bench_warn_load
echo "== hey -z $DURATION -c $WORKERS -q $qps (offered $RATE req/s) -m POST -D bench/post.json" \
	"($(wc -c <"$bench/post.json") byte body), $ROUNDS rounds"
echo "== warm-up ($WARMUP each)"
for c in "${configs[@]}"; do
	run "$c" "$WARMUP" >/dev/null
done

# vals[config.measure]: that measure of every round, separated by spaces.
declare -A vals=() med=()
printf '%-6s %-24s %10s %8s %8s %8s\n' round config requests/s p50_ms p90_ms p99_ms
slow=0
for i in $(seq 1 "$ROUNDS"); do
	for c in "${configs[@]}"; do
		# A plain assignment, so that a failed run stops the script (set -e).
		res=$(run "$c" "$DURATION")
		read -r rps p50 p90 p99 <<<"$res"
		vals[$c.rps]+=" $rps" vals[$c.p50]+=" $p50" vals[$c.p90]+=" $p90" vals[$c.p99]+=" $p99"
		printf '%-6s %-24s %10s %8s %8s %8s\n' "$i" "$(config_name "$c")" "$rps" "$p50" "$p90" "$p99"
		if awk -v a="$rps" -v r="$RATE" 'BEGIN { exit !(a < 0.95 * r) }'; then
			slow=1
		fi
	done
done
if [ "$slow" = 1 ]; then
	echo "== warning: some runs reached less than 95 % of the offered $RATE req/s; they measured" \
		"a machine that could not keep up, not latency at a fixed rate. Lower RATE."
fi

echo "== median of $ROUNDS runs each, offered $RATE req/s"
printf '%-24s %10s %8s %8s %8s\n' config requests/s p50_ms p90_ms p99_ms
for c in "${configs[@]}"; do
	for m in rps p50 p90 p99; do
		read -ra v <<<"${vals[$c.$m]}"
		med[$c.$m]=$(median "${v[@]}")
	done
	printf '%-24s %10s %8s %8s %8s\n' "$(config_name "$c")" "${med[$c.rps]}" "${med[$c.p50]}" "${med[$c.p90]}" "${med[$c.p99]}"
done
for c in "${configs[@]:1}"; do
	awk -v c="$c" -v a50="${med[a.p50]}" -v a90="${med[a.p90]}" -v a99="${med[a.p99]}" \
		-v x50="${med[$c.p50]}" -v x90="${med[$c.p90]}" -v x99="${med[$c.p99]}" 'BEGIN {
		printf "ratio %s/a (medians): p50 %.3f, p90 %.3f, p99 %.3f\n", c, x50 / a50, x90 / a90, x99 / a99 }'
done
echo "raw hey output: $out_dir"
