#!/usr/bin/env bash
# bench/suite.sh: every figure of the README's "Benchmarks" section, from a
# clean clone, in one invocation.
#
# Usage, from anywhere in the repository:
#   bench/suite.sh                       # every section
#   bench/suite.sh load fixed            # some sections, in the order given
#   SHORT=1 bench/suite.sh               # a few seconds per run, one round:
#                                        # checks that it all works, measures nothing
#
# Sections:
#   decision  go test -bench 'Decision|ServeHTTP|MemoryReserve' (root, bucket):
#             ns/op of the decision as a share of the whole handler's
#   tokens    go test -bench . ./tokens: parse, estimate, usage scanning, 429 body
#   load      bench/load.sh: wrk at saturation, (a) reverse_proxy alone,
#             (b) llm_rate_limit in memory, (c) on Redis; ratios b/a, c/a
#   fixed     bench/fixed.sh: hey at a fixed rate (RATE req/s) well below
#             saturation, p50/p90/p99 of (a), (b), (c); ratios b/a, c/a
#   queue     go run ./bench/queue, again with -rule-only, and fairness with
#             -light-poisson: (a) reverse_proxy alone next to (b)
#   adaptive  go run ./bench/adaptive at each of ADAPTIVE_DURATIONS, and the
#             retry-after, no-headers and halving scenarios at ADAPTIVE_LONG
#   tpm       go run ./bench/tpm -rate 4, with the rule at the upstream's
#             limit and 1 % under it
#   redis     go test -bench 'Redis|MemoryReserve3' ./bucket (skipped without
#             redis-server)
#
# Knobs (environment), with their full / SHORT=1 defaults:
#   COUNT=5 / 1              go test -count
#   BENCHTIME=1s / 100ms     go test -benchtime
#   ROUNDS=3 / 1             rounds of load and fixed
#   DURATION=15s / 3s        one load or fixed run
#   WARMUP=5s / 1s           load and fixed warm-up per configuration
#   RATE=1000 WORKERS=50     fixed: offered requests/s in total, hey workers
#   QUEUE_DURATION=30s / 3s  bench/queue -duration
#   ADAPTIVE_DURATIONS="30s 60s" / 3s   bench/adaptive -duration, all scenarios
#   ADAPTIVE_LONG=90s / 3s   bench/adaptive -duration for the 90 s table
#   ADAPTIVE_TIMEOUT=60s / 35s   bench/adaptive -timeout (the SDK's attempt
#                            timeout: faults (a) waits that long for a hung request)
#   TPM_DURATION=30s / 3s    bench/tpm -duration
#   REDIS=1                  0 leaves Redis out of load and fixed
#
# Output: each section's output as it runs, then a summary with one line per
# figure: its name, its value(s), and its ratio to the same run's baseline
# ((a) reverse_proxy alone for load, fixed, queue, adaptive, tpm; the whole
# handler for the decision; the in-memory store for Redis). Everything,
# with the machine's description and load average at the start, goes to
# bench/out/<time>/ (ignored by git). The exit status is 1 if a section
# failed; the others still run.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bench="$root/bench"
export PATH=/usr/local/go/bin:$PATH

SHORT=${SHORT:-0}
if [ "$SHORT" = 1 ]; then
	COUNT=${COUNT:-1} BENCHTIME=${BENCHTIME:-100ms}
	ROUNDS=${ROUNDS:-1} DURATION=${DURATION:-3s} WARMUP=${WARMUP:-1s}
	QUEUE_DURATION=${QUEUE_DURATION:-3s}
	ADAPTIVE_DURATIONS=${ADAPTIVE_DURATIONS:-3s} ADAPTIVE_LONG=${ADAPTIVE_LONG:-3s}
	ADAPTIVE_TIMEOUT=${ADAPTIVE_TIMEOUT:-35s}
	TPM_DURATION=${TPM_DURATION:-3s}
else
	COUNT=${COUNT:-5} BENCHTIME=${BENCHTIME:-1s}
	ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-15s} WARMUP=${WARMUP:-5s}
	QUEUE_DURATION=${QUEUE_DURATION:-30s}
	ADAPTIVE_DURATIONS=${ADAPTIVE_DURATIONS:-30s 60s} ADAPTIVE_LONG=${ADAPTIVE_LONG:-90s}
	ADAPTIVE_TIMEOUT=${ADAPTIVE_TIMEOUT:-60s}
	TPM_DURATION=${TPM_DURATION:-30s}
fi
RATE=${RATE:-1000} WORKERS=${WORKERS:-50} REDIS=${REDIS:-1}
export ROUNDS DURATION WARMUP RATE WORKERS REDIS

all=(decision tokens load fixed queue adaptive tpm redis)
sections=("$@")
if [ ${#sections[@]} = 0 ]; then
	sections=("${all[@]}")
fi
for s in "${sections[@]}"; do
	case " ${all[*]} " in
	*" $s "*) ;;
	*)
		echo "unknown section $s; the sections are: ${all[*]}" >&2
		exit 2
		;;
	esac
done

out="$bench/out/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"

# --- the machine and the tree -----------------------------------------------
{
	echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
	echo "uname -a: $(uname -a)"
	echo "nproc: $(nproc)"
	echo "cpu: $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
	echo "go version: $(go version)"
	echo "commit: $(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)$(
		[ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ] && echo ' (with uncommitted changes)')"
	echo "load average at start: $(cat /proc/loadavg)"
	echo "sections: ${sections[*]}"
	echo "settings: SHORT=$SHORT COUNT=$COUNT BENCHTIME=$BENCHTIME ROUNDS=$ROUNDS DURATION=$DURATION" \
		"WARMUP=$WARMUP RATE=$RATE WORKERS=$WORKERS QUEUE_DURATION=$QUEUE_DURATION" \
		"ADAPTIVE_DURATIONS='$ADAPTIVE_DURATIONS' ADAPTIVE_LONG='$ADAPTIVE_LONG'" \
		"ADAPTIVE_TIMEOUT=$ADAPTIVE_TIMEOUT TPM_DURATION=$TPM_DURATION REDIS=$REDIS"
} | tee "$out/machine.txt"
if [ "$SHORT" = 1 ]; then
	echo "== SHORT=1: runs of a few seconds, one round; the figures below check that the suite works, they measure nothing"
fi

# The Go programs are built once, into a scratch directory.
bin=$(mktemp -d /tmp/llmrl-suite.XXXXXX)
trap 'rm -rf "$bin"' EXIT

# sum name values [ratio]: one line of the summary.
sum() {
	local line
	line=$(printf '%-52s %s' "$1" "$2")
	if [ -n "${3:-}" ]; then
		line="$line   [${3}]"
	fi
	echo "$line" >>"$summary"
}

# --- Go benchmarks ------------------------------------------------------------

# gobench_medians file: for each benchmark in a go test -bench output, in
# order of appearance, "name<TAB>value unit, value unit, ..." with the median
# over -count runs of each metric.
gobench_medians() {
	awk '
	function median(s,    v, n, i, j, t) {
		n = split(s, v, " ")
		for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j-1] + 0 > v[j] + 0; j--) { t = v[j]; v[j] = v[j-1]; v[j-1] = t }
		return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
	}
	/^Benchmark[^ \t]*[ \t]+[0-9]+[ \t]/ {
		name = $1; sub(/-[0-9]+$/, "", name)
		if (!(name in seen)) { seen[name] = 1; order[++nn] = name }
		for (i = 3; i < NF; i += 2) {
			u = $(i + 1)
			if (!((name, u) in vals)) units[name] = units[name] " " u
			vals[name, u] = vals[name, u] " " $i
		}
	}
	END {
		for (k = 1; k <= nn; k++) {
			name = order[k]; line = ""
			nu = split(units[name], us, " ")
			for (i = 1; i <= nu; i++) { v = median(vals[name, us[i]]); line = line (i > 1 ? ", " : "") sprintf(v >= 1000 ? "%.0f %s" : "%.4g %s", v, us[i]) }
			print name "\t" line
		}
	}' "$1"
}

# gobench_value file name unit: the median of one metric, or empty.
gobench_value() {
	gobench_medians "$1" | awk -F'\t' -v n="$2" -v u="$3" '$1 == n {
		m = split($2, f, ", "); for (i = 1; i <= m; i++) { split(f[i], p, " "); if (p[2] == u) print p[1] } }'
}

gobench_sum() { # section file
	local name line
	while IFS=$'\t' read -r name line; do
		sum "$1 $name" "$line (median of $COUNT)"
	done < <(gobench_medians "$2")
}

sec_decision() {
	go test -run '^$' -bench 'Decision|ServeHTTP|MemoryReserve' -benchmem \
		-count "$COUNT" -benchtime "$BENCHTIME" . ./bucket
}
sum_decision() {
	local f="$out/decision.txt" d s m
	gobench_sum decision "$f"
	d=$(gobench_value "$f" BenchmarkDecision ns/op)
	s=$(gobench_value "$f" BenchmarkServeHTTP ns/op)
	m=$(gobench_value "$f" BenchmarkMemoryReserve3 ns/op)
	if [ -n "$d" ] && [ -n "$s" ]; then
		sum "decision: share of the handler" "Decision $d ns of ServeHTTP $s ns" \
			"$(awk -v a="$d" -v b="$s" 'BEGIN { printf "Decision/ServeHTTP %.3f", a / b }')"
	fi
	if [ -n "$m" ] && [ -n "$s" ]; then
		sum "decision: store's share of the handler" "MemoryReserve3 $m ns of ServeHTTP $s ns" \
			"$(awk -v a="$m" -v b="$s" 'BEGIN { printf "MemoryReserve3/ServeHTTP %.3f", a / b }')"
	fi
}

sec_tokens() {
	go test -run '^$' -bench . -benchmem -count "$COUNT" -benchtime "$BENCHTIME" ./tokens
}
sum_tokens() { gobench_sum tokens "$out/tokens.txt"; }

sec_redis() {
	if ! command -v redis-server >/dev/null 2>&1; then
		echo "redis-server not installed: skipping (apt-get install redis-server to include it)"
		return 0
	fi
	go test -run '^$' -bench 'Redis|MemoryReserve3' -benchmem -count "$COUNT" -benchtime "$BENCHTIME" ./bucket
}
sum_redis() {
	local f="$out/redis.txt" r m
	if grep -q '^redis-server not installed' "$f"; then
		sum "redis" "skipped: redis-server not installed"
		return
	fi
	gobench_sum redis "$f"
	r=$(gobench_value "$f" BenchmarkRedisReserve ns/op)
	m=$(gobench_value "$f" BenchmarkMemoryReserve3 ns/op)
	if [ -n "$r" ] && [ -n "$m" ]; then
		sum "redis: one admission, Redis vs memory" "RedisReserve $r ns, MemoryReserve3 $m ns" \
			"$(awk -v a="$r" -v b="$m" 'BEGIN { printf "Redis/memory %.0f", a / b }')"
	fi
}

# --- load and fixed rate --------------------------------------------------------

sec_load() { OUT_DIR="$out/load" "$bench/load.sh"; }
sum_load() {
	local f="$out/load.txt" l
	# "(a) reverse_proxy    8704.00 req/s (8600.12)  p99 12.80 ms (13.01)"
	while IFS= read -r l; do
		sum "load (wrk, saturation): ${l%%  *}" \
			"$(awk '{ for (i = 1; i <= NF; i++) if ($i == "req/s") r = $(i - 1); else if ($i == "p99") p = $(i + 1)
				print r " req/s, p99 " p " ms (medians)" }' <<<"$l")"
	done < <(grep -E '^\((a|b|c)\) .* req/s .* p99 ' "$f")
	while IFS= read -r l; do
		sum "load (wrk, saturation): ${l%% (medians)*}" "" "${l#*: }"
	done < <(grep -E '^ratio [a-c]/[a-c] \(medians\)' "$f")
	# "ratio c/b, median of the rounds' own: requests/s 0.854 (each round: ...)"
	while IFS= read -r l; do
		sum "load (wrk, saturation): ${l%%:*}" "" "${l#*: }"
	done < <(grep -E "^ratio [a-c]/[a-c], median of the rounds' own" "$f")
}

sec_fixed() { OUT_DIR="$out/fixed" "$bench/fixed.sh"; }
sum_fixed() {
	local f="$out/fixed.txt" l name
	# The rows under "== median of N runs each": config, req/s, p50, p90, p99.
	while IFS= read -r l; do
		name=${l%%  *}
		sum "fixed $RATE req/s (hey): $name" \
			"$(awk '{ printf "%s req/s, p50 %s, p90 %s, p99 %s ms", $(NF - 3), $(NF - 2), $(NF - 1), $NF }' <<<"$l") (medians)"
	done < <(awk '/^== median of/ { m = 1; next } m && /^\([a-c]\)/' "$f")
	while IFS= read -r l; do
		sum "fixed $RATE req/s (hey): ${l%% (medians)*}" "" "${l#*: }"
	done < <(grep -E '^ratio [a-c]/a \(medians\)' "$f")
	if grep -q '^== warning: some runs reached less' "$f"; then
		sum "fixed: WARNING" "some runs fell below 95 % of the offered rate"
	fi
}

# --- the Go programs: (a) reverse_proxy alone next to (b) -----------------------

build_prog() { # name
	if [ ! -x "$bin/$1" ]; then
		(cd "$root" && go build -o "$bin/$1" "./bench/$1")
	fi
}

# table_rows prefix rows-regex: from a bench/queue or bench/adaptive report
# on stdin, the rows whose label matches, per scenario, with (a), (b) and
# b/a of their leading numbers; then the scenario's PASS/FAIL count.
table_rows() {
	awk -v prefix="$1" -v want="$2" '
	function trim(s) { gsub(/^ +| +$/, "", s); return s }
	function lead(s) { return match(s, /^-?[0-9]+(\.[0-9]+)?/) ? substr(s, RSTART, RLENGTH) : "" }
	function flush() {
		if (scen != "" && (pass + fail) > 0)
			printf "%s %s: goals on (b)\t%d PASS, %d FAIL\t%s\n", prefix, scen, pass, fail, failed
		pass = fail = 0; failed = ""
	}
	/^== .* ==$/ { flush(); scen = $2; intable = 0; next }
	/\(a\) reverse_proxy/ && /\(b\)/ { intable = 1; next }
	/^ *$/ { intable = 0; next }
	/^PASS / { pass++; next }
	/^FAIL / { fail++; failed = failed (failed == "" ? "FAIL: " : "; ") trim(substr($0, 5)); next }
	intable {
		n = split(trim($0), f, /  +/)
		if (n < 3 || f[1] !~ want) next
		x = lead(f[2]); y = lead(f[3])
		# A ratio of rates, shares and latencies; not of counts of refusals,
		# which (b) exists to bring to 0.
		r = (f[1] ~ /share|throughput|latency|p50|p99|2xx/ && x != "" && y != "" && x + 0 > 0) ? sprintf("b/a %.3f", y / x) : ""
		printf "%s %s: %s\t(a) %s | (b) %s\t%s\n", prefix, scen, f[1], f[2], f[3], r
	}
	END { flush() }'
}

sum_rows() { # file prefix rows-regex
	local name vals ratio
	while IFS=$'\t' read -r name vals ratio; do
		sum "$name" "$vals" "$ratio"
	done < <(table_rows "$2" "$3" <"$1")
}

queue_rows='^(429 seen by clients|upstream: its own|share of the limit used|latency p50|latency p99|light: 429|light: p50|light: p99|heavy: 2xx|heavy: 429|503 seen by clients|upstream: peak in flight|throughput)'
sec_queue() {
	build_prog queue
	echo "== bench/queue -duration $QUEUE_DURATION: (b) = rule + queue"
	"$bin/queue" -duration "$QUEUE_DURATION" | tee "$out/queue-queue.txt"
	echo "== bench/queue -duration $QUEUE_DURATION -rule-only: (b) = the rule, no queue"
	"$bin/queue" -duration "$QUEUE_DURATION" -rule-only | tee "$out/queue-rule-only.txt"
	echo "== bench/queue -duration $QUEUE_DURATION -scenario fairness -light-poisson"
	"$bin/queue" -duration "$QUEUE_DURATION" -scenario fairness -light-poisson | tee "$out/queue-light-poisson.txt"
}
sum_queue() {
	sum_rows "$out/queue-queue.txt" "queue (b=rule+queue)" "$queue_rows"
	sum_rows "$out/queue-rule-only.txt" "queue (b=rule only)" "$queue_rows"
	sum_rows "$out/queue-light-poisson.txt" "queue (b=rule+queue, light Poisson)" "$queue_rows"
}

adaptive_rows='^(final 429|other failures|client attempts timed out|upstream: refusals|share of the limit used|share of the max|throughput|latency p99|half [12]: share)'
sec_adaptive() {
	local d s
	build_prog adaptive
	for d in $ADAPTIVE_DURATIONS; do
		echo "== bench/adaptive -duration $d -timeout $ADAPTIVE_TIMEOUT"
		"$bin/adaptive" -duration "$d" -timeout "$ADAPTIVE_TIMEOUT" | tee "$out/adaptive-$d.txt"
	done
	for d in $ADAPTIVE_LONG; do
		for s in retry-after no-headers halving; do
			echo "== bench/adaptive -duration $d -timeout $ADAPTIVE_TIMEOUT -scenario $s"
			"$bin/adaptive" -duration "$d" -timeout "$ADAPTIVE_TIMEOUT" -scenario "$s" | tee "$out/adaptive-$s-$d.txt"
		done
	done
}
sum_adaptive() {
	local d s
	for d in $ADAPTIVE_DURATIONS; do
		sum_rows "$out/adaptive-$d.txt" "adaptive $d" "$adaptive_rows"
	done
	for d in $ADAPTIVE_LONG; do
		for s in retry-after no-headers halving; do
			sum_rows "$out/adaptive-$s-$d.txt" "adaptive $d, one scenario" "$adaptive_rows"
		done
	done
}

sec_tpm() {
	build_prog tpm
	echo "== bench/tpm -duration $TPM_DURATION -rate 4: the rule at the upstream's limit"
	"$bin/tpm" -duration "$TPM_DURATION" -rate 4 | tee "$out/tpm-at-limit.txt"
	echo "== bench/tpm -duration $TPM_DURATION -rate 4 -rule-tpm 59400: the rule 1 % under it"
	"$bin/tpm" -duration "$TPM_DURATION" -rate 4 -rule-tpm 59400 | tee "$out/tpm-under.txt"
}
sum_tpm() {
	local f tag vals ratio
	for f in at-limit under; do
		# The markdown rows of (a) and (b): sent, dropped, 2xx, 429, upstream
		# 429, other, offered, served, capacity, share used, p50, p99.
		while IFS=$'\t' read -r tag vals ratio; do
			sum "tpm (rule $f): $tag" "$vals" "$ratio"
		done < <(awk -F' *[|] *' '$2 ~ /^\([ab]\)/ {
			t = substr($2, 1, 3); sent[t] = $3; ok[t] = $5; r[t] = $6; up[t] = $7; share[t] = $12; p99[t] = $14
		}
		END {
			for (i = 0; i < 2; i++) {
				t = i ? "(b)" : "(a)"
				printf "%s\t%s sent, %s 2xx, 429 %s, upstream 429 %s, share %s, p99 %s\t", t, sent[t], ok[t], r[t], up[t], share[t], p99[t]
				if (i && share["(a)"] + 0 > 0 && p99["(a)"] + 0 > 0)
					printf "b/a share used %.3f, p99 %.3f", share["(b)"] / share["(a)"], p99["(b)"] / p99["(a)"]
				printf "\n"
			}
		}' "$out/tpm-$f.txt")
	done
}

# --- run --------------------------------------------------------------------
failed=()
for s in "${sections[@]}"; do
	echo
	echo "######## $s ($(date +%H:%M:%S), load average $(cut -d' ' -f1-3 /proc/loadavg))"
	set +e
	(
		set -euo pipefail
		cd "$root"
		"sec_$s"
	) 2>&1 | tee "$out/$s.txt"
	st=${PIPESTATUS[0]}
	set -e
	if [ "$st" != 0 ]; then
		failed+=("$s")
		sum "$s" "FAILED (exit status $st; see $out/$s.txt)"
		continue
	fi
	"sum_$s"
done

echo
echo "######## summary ($(date +%H:%M:%S)); raw output in $out"
if [ "$SHORT" = 1 ]; then
	echo "(SHORT=1: these runs are too short to measure anything)"
fi
cat "$summary"
if [ ${#failed[@]} -gt 0 ]; then
	echo "failed sections: ${failed[*]}" >&2
	exit 1
fi
