package caddytest

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
)

// metricsSite is a site that serves Caddy's metrics (this configuration's
// registry) on its own port.
func metricsSite(port int) string { return fmt.Sprintf(":%d {\n\tmetrics\n}\n", port) }

// metricDelta scrapes and returns a function that gives how much a series
// grew since this scrape. The module's collectors live as long as the
// process, so tests compare against where they started.
func metricDelta(t *testing.T, h *harness, port int) func(series string) float64 {
	t.Helper()
	url := fmt.Sprintf("http://127.0.0.1:%d/metrics", port)
	before := scrape(t, h, url)
	return func(series string) float64 {
		t.Helper()
		return scrape(t, h, url)[series] - before[series]
	}
}

// decisionSeries names a decisions_total series of the default zone.
func decisionSeries(rule, unit, outcome string) string {
	return fmt.Sprintf(`caddy_llm_rate_limit_decisions_total{outcome=%q,rule=%q,unit=%q,zone=""}`, outcome, rule, unit)
}

// Decisions are counted by rule, unit and outcome, with no user or key in
// any label; the counters keep counting across a reload and are not
// registered twice.
func TestMetricsDecisions(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	mport := freePort(t)
	cfg := h.site(`		user {http.request.header.X-User}
		virtualaccount {http.request.header.Authorization}
		rule m-per-user {
			limit 2 requests_per_minute
			applies_per user
		}
		rule m-shadow {
			mode shadow
			limit 1 requests_per_minute
		}
		rule m-tokens {
			when {
				models gpt-4o
			}
			limit 1000000 tokens_per_minute
		}`, hostPort(up)) + metricsSite(mport)
	h.load(cfg)
	delta := metricDelta(t, h, mport)

	const secret = "sk-metrics-test-secret-key"
	for i := range 3 {
		wantStatus(t, fmt.Sprint("alice ", i), h.chat("gpt-4o", "X-User", "metrics-alice", "Authorization", "Bearer "+secret), []int{200, 200, 429}[i])
	}
	wantStatus(t, "bob", h.chat("gpt-4o", "X-User", "metrics-bob"), 200)

	for _, c := range []struct {
		rule, unit, outcome string
		want                float64
	}{
		{"m-per-user", "requests_per_minute", "admitted", 3},
		{"m-per-user", "requests_per_minute", "refused", 1},
		{"m-tokens", "tokens_per_minute", "admitted", 3},
		// The shadow rule admits one request a minute; the second, third
		// (refused by m-per-user, so not charged) and fourth would not
		// pass it: the second and the fourth count.
		{"m-shadow", "requests_per_minute", "shadow_refused", 2},
	} {
		if got := delta(decisionSeries(c.rule, c.unit, c.outcome)); got != c.want {
			t.Errorf("%s %s %s: +%v, want +%v", c.rule, c.unit, c.outcome, got, c.want)
		}
	}
	if got := delta(`caddy_llm_rate_limit_tokens_estimated_total{model="gpt-4o"}`); got <= 0 {
		t.Errorf("tokens_estimated_total{model=gpt-4o} grew by %v", got)
	}
	if got := delta(`caddy_llm_rate_limit_tokens_used_total{model="gpt-4o"}`); got <= 0 {
		t.Errorf("tokens_used_total{model=gpt-4o} grew by %v", got)
	}
	body := string(h.do(h.newReqURL(http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/metrics", mport), nil)).body)
	for _, leak := range []string{"metrics-alice", "metrics-bob", secret} {
		if strings.Contains(body, leak) {
			t.Errorf("the metrics name %q", leak)
		}
	}

	// A reload: same collectors, still counting, no duplicate
	// registration (the scrape would fail).
	h.load(cfg)
	wantStatus(t, "bob after reload", h.chat("gpt-4o", "X-User", "metrics-bob"), 200)
	if got := delta(decisionSeries("m-per-user", "requests_per_minute", "admitted")); got != 4 {
		t.Errorf("admitted after the reload: +%v, want +4 (counting on)", got)
	}
}

// Model names come from clients, so the model label has a bound: a flood of
// invented names adds at most a bounded number of series.
func TestMetricsModelLabelsBounded(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	mport := freePort(t)
	h.load(h.site(`		rule m-bounded {
			limit 100000000 tokens_per_minute
		}`, hostPort(up)) + metricsSite(mport))
	for i := range 260 {
		wantStatus(t, "request", h.chat(fmt.Sprintf("invented-model-%d", i)), 200)
	}
	m := scrape(t, h, fmt.Sprintf("http://127.0.0.1:%d/metrics", mport))
	series := 0
	for s := range m {
		if strings.HasPrefix(s, "caddy_llm_rate_limit_tokens_estimated_total{") {
			series++
		}
	}
	// 200 names, "other", "none", and the few models other tests'
	// configurations name.
	if series > 210 {
		t.Errorf("%d tokens_estimated_total series after 260 invented models, want at most 210", series)
	}
	if m[`caddy_llm_rate_limit_tokens_estimated_total{model="other"}`] <= 0 {
		t.Error(`no tokens counted under model="other"`)
	}
}

// A request that waits is observed in the wait histogram, and the queue
// depth gauge shows it while it waits.
func TestMetricsQueue(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	mport := freePort(t)
	h.load(h.site(`		user {http.request.header.X-User}
		rule m-queue {
			limit 60 requests_per_minute burst 1
		}
		queue {
			max_wait 10s
		}`, hostPort(up)) + metricsSite(mport))
	delta := metricDelta(t, h, mport)
	url := fmt.Sprintf("http://127.0.0.1:%d/metrics", mport)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	sent := make(chan []queued, 1)
	go func() { sent <- parallelDo(3, func(int) queued { return h.send(ctx, "metrics-queue") }) }()
	sawDepth := waitFor(ctx, func() bool {
		return scrape(t, h, url)["caddy_llm_rate_limit_queue_depth"] >= 1
	})
	results := <-sent
	for i, r := range results {
		if r.err != nil || r.status != 200 {
			t.Fatalf("request %d: %v %v", i, r.err, r.response)
		}
	}
	if !sawDepth {
		t.Error("queue_depth never showed a waiting request")
	}
	if got := delta(decisionSeries("m-queue", "requests_per_minute", "delayed")); got != 2 {
		t.Errorf("delayed: +%v, want +2", got)
	}
	if got := delta(`caddy_llm_rate_limit_queue_wait_seconds_count{outcome="admitted"}`); got != 2 {
		t.Errorf("queue_wait_seconds_count{admitted}: +%v, want +2", got)
	}
	if got := scrape(t, h, url)["caddy_llm_rate_limit_queue_depth"]; got != 0 {
		t.Errorf("queue_depth %v after every request ended", got)
	}
}

// Adaptive mode's attempts are counted by the upstream's answer, matching
// what the upstream saw, and the refusals kept from clients are counted as
// absorbed; the learned limit is a gauge.
func TestMetricsAdaptive(t *testing.T) {
	up := startFake(t, fakellm.Config{RPM: 120, Burst: 3, RateLimitHeaders: true})
	h := newHarness(t)
	mport := freePort(t)
	// The rule names the model, which keeps its label its own whatever
	// other tests sent before (TestMetricsModelLabelsBounded).
	const model = "metrics-adaptive-model"
	h.load(h.site(`		user {http.request.header.X-User}
		rule m-named {
			when {
				models `+model+`
			}
			limit 1000000 requests_per_minute
		}
		adaptive`, hostPort(up)) + metricsSite(mport))
	delta := metricDelta(t, h, mport)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	results := parallelDo(8, func(i int) queued { return h.sendModelCtx(ctx, model, fmt.Sprint("u", i)) })
	// A burst of 8 at an upstream that takes 3 at once may, rarely, still
	// hand a client the upstream's 429 once its retries run out; those are
	// not absorbed.
	passed := 0
	for i, r := range results {
		switch {
		case r.err != nil:
			t.Fatalf("request %d: %v", i, r.err)
		case r.status == http.StatusTooManyRequests:
			passed++
		case r.status != 200:
			t.Fatalf("request %d: %v", i, r.response)
		}
	}
	st := up.Stats()
	attempts := func(status string) float64 {
		return delta(fmt.Sprintf(`caddy_llm_rate_limit_upstream_attempts_total{model=%q,status=%q}`, model, status))
	}
	if ok, limited := attempts("2xx"), attempts("429"); ok != float64(st.OK) || limited != float64(st.Limited) {
		t.Errorf("attempts 2xx +%v, 429 +%v; the upstream answered %d OK, %d limited", ok, limited, st.OK, st.Limited)
	}
	if got := delta(fmt.Sprintf(`caddy_llm_rate_limit_upstream_absorbed_total{model=%q,status="429"}`, model)); got != float64(st.Limited-passed) {
		t.Errorf("absorbed 429s +%v, want %d (the upstream's %d, less the %d clients saw)", got, st.Limited-passed, st.Limited, passed)
	}
	learned := fmt.Sprintf(`caddy_llm_rate_limit_learned_limit{limit="requests_per_second",model=%q,zone=""}`, model)
	if got := scrape(t, h, fmt.Sprintf("http://127.0.0.1:%d/metrics", mport))[learned]; got != 2 {
		t.Errorf("%s = %v, want 2 (120 RPM)", learned, got)
	}
}

// The {http.llm_rate_limit.*} placeholders put each decision in Caddy's
// access log, through log_append.
func TestPlaceholdersInAccessLog(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	logFile := filepath.Join(t.TempDir(), "access.json")
	fields := []string{"rule", "unit", "rules", "decision", "model", "user", "wait_ms", "tokens_estimated", "tokens_used", "attempts"}
	var appends strings.Builder
	for _, f := range fields {
		fmt.Fprintf(&appends, "\tlog_append llm_%s {http.llm_rate_limit.%s}\n", f, f)
	}
	h.load(fmt.Sprintf(`:%d {
	log {
		output file %s
		format json
	}
%s	llm_rate_limit {
		user {http.request.header.X-User}
		virtualaccount {http.request.header.Authorization}
		rule p-per-user {
			limit 1 requests_per_minute
			applies_per user
		}
		rule p-tokens {
			limit 1000000 tokens_per_minute
		}
	}
	reverse_proxy %s
}
`, h.port, logFile, appends.String(), hostPort(up)))
	wantStatus(t, "first", h.chat("gpt-4o", "X-User", "pl-alice"), 200)
	wantStatus(t, "second", h.chat("gpt-4o", "X-User", "pl-alice"), 429)
	const secret = "sk-placeholder-secret"
	wantStatus(t, "keyed", h.chat("gpt-4o", "Authorization", "Bearer "+secret), 200)

	var entries []map[string]any
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	waitFor(ctx, func() bool {
		entries = readJSONLines(t, logFile)
		return len(entries) >= 3
	})
	if len(entries) != 3 {
		t.Fatalf("%d access log entries, want 3", len(entries))
	}
	raw, _ := os.ReadFile(logFile)
	if strings.Contains(string(raw), secret) {
		t.Error("the access log holds the API key")
	}
	want := []map[string]any{
		{"llm_rule": "p-per-user", "llm_unit": "requests_per_minute", "llm_rules": "p-per-user,p-tokens",
			"llm_decision": "admitted", "llm_model": "gpt-4o", "llm_user": "pl-alice", "llm_attempts": 1.0},
		{"llm_rule": "p-per-user", "llm_decision": "refused", "llm_user": "pl-alice", "llm_tokens_used": 0.0, "llm_attempts": 0.0},
		{"llm_decision": "admitted"},
	}
	for i, w := range want {
		for k, v := range w {
			if got := entries[i][k]; got != v {
				t.Errorf("entry %d: %s = %#v, want %#v", i, k, got, v)
			}
		}
	}
	if est, used := entries[0]["llm_tokens_estimated"], entries[0]["llm_tokens_used"]; est == 0.0 || used == 0.0 {
		t.Errorf("entry 0: tokens estimated %v, used %v; want both set", est, used)
	}
	if u, _ := entries[2]["llm_user"].(string); !strings.HasPrefix(u, "sha256:") || len(u) != len("sha256:")+32 {
		t.Errorf("a keyed request's user is %q, want sha256: and the key's hash", u)
	}
}

func readJSONLines(t *testing.T, path string) []map[string]any {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []map[string]any
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("access log line %q: %v", sc.Text(), err)
		}
		out = append(out, m)
	}
	return out
}
