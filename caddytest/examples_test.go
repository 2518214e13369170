package caddytest

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
)

const examplesDir = "../examples"

func readExample(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(examplesDir, name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// ruleIDs lists the ids of the llm_rate_limit rules in an adapted config.
func ruleIDs(t *testing.T, cfg []byte) []string {
	t.Helper()
	var ids []string
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			if v["handler"] == "llm_rate_limit" {
				rules, _ := v["rules"].([]any)
				for _, r := range rules {
					id, _ := r.(map[string]any)["id"].(string)
					ids = append(ids, id)
				}
			}
			for _, e := range v {
				walk(e)
			}
		case []any:
			for _, e := range v {
				walk(e)
			}
		}
	}
	var root any
	if err := json.Unmarshal(cfg, &root); err != nil {
		t.Fatal(err)
	}
	walk(root)
	return ids
}

// Every example Caddyfile adapts as written, to the rules it describes.
func TestExamplesAdapt(t *testing.T) {
	want := map[string][]string{
		"Caddyfile":                   {"model:gpt-4o", "demo-per-user"},
		"seed000-per-model.Caddyfile": {"model:gpt-4", "model:gpt-4o", "model:llama3*"},
		"seed003-rules.Caddyfile": {"bob-gpt4-daily", "backend-gpt4-tokens", "va1-gpt4-tokens", "per-model-daily",
			"per-user-daily", "per-user-model-daily", "per-project-hourly", "production-requests"},
	}
	entries, err := os.ReadDir(examplesDir)
	if err != nil {
		t.Fatal(err)
	}
	seen := 0
	for _, e := range entries {
		if e.IsDir() || (e.Name() != "Caddyfile" && !strings.HasSuffix(e.Name(), ".Caddyfile")) {
			continue
		}
		seen++
		t.Run(e.Name(), func(t *testing.T) {
			cfg, err := adapt(readExample(t, e.Name()))
			if err != nil {
				t.Fatalf("adapting: %v", err)
			}
			ids := ruleIDs(t, cfg)
			if w, ok := want[e.Name()]; ok && !slices.Equal(ids, w) {
				t.Errorf("rules %q, want %q", ids, w)
			} else if len(ids) == 0 {
				t.Errorf("no llm_rate_limit rules in %s", cfg)
			}
		})
	}
	if seen < len(want) {
		t.Errorf("found %d example Caddyfiles, want at least %d", seen, len(want))
	}
}

// portsFree skips the test unless every port can be bound on loopback.
func portsFree(t *testing.T, ports ...int) {
	t.Helper()
	for _, p := range ports {
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			t.Skipf("port %d is busy, so the example cannot run as written: %v", p, err)
		}
		ln.Close()
	}
}

// The demo Caddyfile, as written: its sites on :8080 and :8081. Only the
// test's global options are added to its global block (no admin endpoint,
// quiet logs, loopback only).
func TestExampleDemoCaddyfile(t *testing.T) {
	portsFree(t, 8080, 8081)
	src := readExample(t, "Caddyfile")
	if !strings.Contains(src, "\n{\n") {
		t.Fatal("examples/Caddyfile has no global options block")
	}
	cf := strings.Replace(src, "\n{\n", "\n{\n"+globalOptions(""), 1)
	m := regexp.MustCompile("respond `([^`]*)` 200").FindStringSubmatch(src)
	if m == nil {
		t.Fatal("cannot find the demo upstream's reply in examples/Caddyfile")
	}
	demoReply := m[1]

	h := newHarness(t)
	h.port, h.base = 8080, "http://127.0.0.1:8080"
	if err := loadRaw(cf); err != nil {
		t.Fatalf("loading examples/Caddyfile: %v", err)
	}
	rs := wantStatuses(t, "alice", func() response { return h.chat("gpt-4o", "X-User", "alice") }, 200, 200, 200, 429)
	for i, r := range rs[:3] {
		if string(r.body) != demoReply {
			t.Errorf("alice #%d: body %q, want the demo upstream's reply", i+1, r.body)
		}
		wantRemaining(t, "alice", r, map[string]int64{
			"model:gpt-4o/requests_per_minute":  int64(29 - i),
			"demo-per-user/requests_per_minute": int64(2 - i),
		})
	}
	e := wantOpenAI429(t, "alice #4", rs[3], "demo-per-user", "requests_per_minute")
	if !strings.Contains(e.Error.Message, "per user") {
		t.Errorf("message %q does not say per user", e.Error.Message)
	}
	// The refusal charged the per-model rule nothing.
	wantRemaining(t, "alice #4", rs[3], map[string]int64{
		"model:gpt-4o/requests_per_minute":  27,
		"demo-per-user/requests_per_minute": 0,
	})
	r := h.chat("gpt-4o", "X-User", "bob")
	wantStatus(t, "bob", r, 200)
	wantRemaining(t, "bob", r, map[string]int64{
		"model:gpt-4o/requests_per_minute":  26,
		"demo-per-user/requests_per_minute": 2,
	})
}

// concurrently sends n requests at once and returns the responses and how
// long they took in all.
func concurrently(n int, send func() response) ([]response, time.Duration) {
	out := make([]response, n)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i] = send()
		}()
	}
	wg.Wait()
	return out, time.Since(start)
}

// wantBurst checks that a burst admitted the bucket's capacity, and more
// only as far as the refill during the burst allows.
func wantBurst(t *testing.T, what string, rs []response, elapsed time.Duration, capacity int, perSecond float64, rule, unit string) {
	t.Helper()
	ok, refused := 0, 0
	for _, r := range rs {
		switch r.status {
		case 200:
			ok++
		case 429:
			refused++
			wantOpenAI429(t, what, r, rule, unit)
		default:
			t.Errorf("%s: status %d: %s", what, r.status, r.body)
		}
	}
	most := capacity + int(elapsed.Seconds()*perSecond)
	if ok < capacity || ok > most || refused == 0 {
		t.Errorf("%s: %d admitted and %d refused in %s, want %d..%d admitted and some refused",
			what, ok, refused, elapsed, capacity, most)
	}
}

// loadSeedExample loads an example that listens on :8080 and proxies to
// {$LLM_UPSTREAM}, with LLM_UPSTREAM set to a fake upstream.
func loadSeedExample(t *testing.T, name string) (*harness, *fakellm.Server) {
	t.Helper()
	up := startFake(t, fakellm.Config{})
	t.Setenv("LLM_UPSTREAM", hostPort(up))
	h := newHarness(t)
	src := readExample(t, name)
	// The example listens on :8080; move it to a free port so that the test
	// does not depend on (or disturb) whatever uses 8080.
	if strings.Count(src, ":8080 {") != 1 {
		t.Fatalf("%s: expected exactly one \":8080 {\" site", name)
	}
	cf := withGlobalOptions(strings.Replace(src, ":8080 {", fmt.Sprintf(":%d {", h.port), 1))
	if err := loadRaw(cf); err != nil {
		t.Fatalf("loading %s: %v", name, err)
	}
	return h, up
}

func TestExampleSeed000PerModel(t *testing.T) {
	h, up := loadSeedExample(t, "seed000-per-model.Caddyfile")

	// gpt-4o: rpm 120 burst 4, so a burst of 8 gets 4 through (refilling
	// at 2 per second).
	rs, elapsed := concurrently(8, func() response { return h.chat("gpt-4o") })
	wantBurst(t, "gpt-4o", rs, elapsed, 4, 2, "model:gpt-4o", "requests_per_minute")

	// gpt-4: its rpm applies; its tpm is not charged yet, so it has no
	// policy in the headers.
	r := h.chat("gpt-4")
	wantStatus(t, "gpt-4", r, 200)
	wantRemaining(t, "gpt-4", r, map[string]int64{"model:gpt-4/requests_per_minute": 49})
	if pol, _ := parsePolicy(t, r.header); pol["model:gpt-4/requests_per_minute"] != (policyItem{50, 60}) {
		t.Errorf("gpt-4 policy %+v", pol)
	}

	// llama3*: one bucket per variant.
	sent := map[string]int64{}
	for _, m := range []string{"llama3", "llama3-8b", "llama3:70b", "llama3-8b"} {
		r := h.post("/api/chat", fmt.Sprintf(`{"model":%q,"stream":false,"messages":[{"role":"user","content":"hi"}]}`, m))
		wantStatus(t, m, r, 200)
		sent[m]++
		wantRemaining(t, m, r, map[string]int64{"model:llama3*/requests_per_minute": 600 - sent[m]})
	}
	r = h.chat("mistral-large")
	wantStatus(t, "other model", r, 200)
	wantNoRateLimitHeaders(t, "other model", r)

	if total, _ := up.Counts(); total < 4+1+4+1 {
		t.Errorf("upstream saw %d requests", total)
	}
}

func TestExampleSeed003Rules(t *testing.T) {
	h, up := loadSeedExample(t, "seed003-rules.Caddyfile")
	prod := []string{
		"X-User", "alice", "X-Team", "backend", "Authorization", "Bearer virtualaccount1",
		"X-LLM-Metadata", `{"project_id":"p-42","environment":"production"}`,
	}
	const p = "production-requests/requests_per_minute"

	// production-requests: 600 per minute, burst 20, per user and model.
	// Only it has a request limit; the token rules are not charged yet and
	// so are not in the headers.
	rs, elapsed := concurrently(30, func() response { return h.chat("gpt-4", prod...) })
	wantBurst(t, "alice gpt-4", rs, elapsed, 20, 10, "production-requests", "requests_per_minute")
	for _, r := range rs {
		if r.status == 200 {
			pol, _ := parsePolicy(t, r.header)
			if len(pol) != 1 || pol[p] != (policyItem{600, 60}) {
				t.Errorf("policy %q, want only %s;q=600;w=60", r.header.Get("RateLimit-Policy"), p)
			}
			break
		}
	}
	for _, r := range rs {
		if r.status == 429 && !strings.Contains(string(r.body), "per user, model") {
			t.Errorf("429 %s does not say per user, model", r.body)
		}
	}
	// Another model and another user each have their own bucket.
	r := h.chat("gpt-4o", prod...)
	wantStatus(t, "alice gpt-4o", r, 200)
	wantRemaining(t, "alice gpt-4o", r, map[string]int64{p: 19})
	// bob@email.com on gpt-4 also meets bob-gpt4-daily.
	bob := slices.Clone(prod)
	bob[1] = "bob@email.com"
	r = h.chat("gpt-4", bob...)
	wantStatus(t, "bob gpt-4", r, 200)
	wantRemaining(t, "bob gpt-4", r, map[string]int64{p: 19, "bob-gpt4-daily/requests_per_day": 999})

	// Outside production no request limit applies at all.
	r = h.chat("gpt-4", "X-User", "alice", "X-LLM-Metadata", `{"environment":"staging"}`)
	wantStatus(t, "staging", r, 200)
	wantNoRateLimitHeaders(t, "staging", r)

	// The key the virtual account was hashed from reaches the upstream
	// unchanged, on every admitted request that carried it.
	admitted := 2 // alice gpt-4o, bob gpt-4
	for _, r := range rs {
		if r.status == 200 {
			admitted++
		}
	}
	withKey := 0
	for _, rec := range up.Requests() {
		if rec.Header.Get("Authorization") == "Bearer virtualaccount1" {
			withKey++
		}
	}
	if withKey != admitted {
		t.Errorf("upstream got the Authorization header unchanged on %d requests, want %d", withKey, admitted)
	}
}
