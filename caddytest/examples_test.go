package caddytest

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
	"github.com/llmratelimit/caddy-llm-ratelimit/internal/redistest"
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
		"Caddyfile":                    {"model:gpt-4o", "demo-per-user"},
		"seed000-per-model.Caddyfile":  {"model:gpt-4", "model:gpt-4o", "model:llama3*"},
		"queue.Caddyfile":              {"model:gpt-4o", "local-gpu"},
		"cost-per-developer.Caddyfile": {"dev-daily-tokens", "model-tpm"},
		"onprem-fallback.Caddyfile":    {"onprem-slots"},
		"customer-tiers.Caddyfile":     {"free-tier", "gold-tier", "shared-capacity"},
		// Its other rules are in seed003-rules.yaml, read at provisioning.
		"rules-file.Caddyfile": {"production-requests"},
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
// {$LLM_UPSTREAM}, with LLM_UPSTREAM set to a fake upstream configured by
// cfg.
func loadSeedExample(t *testing.T, name string, cfg fakellm.Config) (*harness, *fakellm.Server) {
	t.Helper()
	up := startFake(t, cfg)
	t.Setenv("LLM_UPSTREAM", hostPort(up))
	return loadExample(t, name), up
}

// loadExample loads an example that listens on :8080, as written but for
// its port, with the environment the test has set for its placeholders.
func loadExample(t *testing.T, name string) *harness {
	t.Helper()
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
	return h
}

// refilled is the range of r= a bucket can show after a charge of cost,
// when it already held level units charged at most elapsed ago and refills
// perSecond: r = capacity − cost − ⌈what is left of level⌉, so from
// capacity − cost − level (nothing refilled) up by ⌊elapsed × perSecond⌋,
// and never above capacity − cost. elapsed must run from before the first
// of those charges to after the response read.
func refilled(capacity, cost, level int64, elapsed time.Duration, perSecond float64) [2]int64 {
	lo := capacity - cost - level
	return [2]int64{lo, min(capacity-cost, lo+int64(math.Floor(elapsed.Seconds()*perSecond)))}
}

// exactly is the range of a single value.
func exactly(n int64) [2]int64 { return [2]int64{n, n} }

// wantRemainingWithin checks the r= of each named policy against its
// range, and that no other policy is listed.
func wantRemainingWithin(t *testing.T, what string, r response, want map[string][2]int64) {
	t.Helper()
	st := parseState(t, r.header)
	pol, _ := parsePolicy(t, r.header)
	if len(st) != len(want) || len(pol) != len(want) {
		t.Fatalf("%s: RateLimit %q, RateLimit-Policy %q: want exactly the policies %v",
			what, r.header.Get("RateLimit"), r.header.Get("RateLimit-Policy"), want)
	}
	for name, rng := range want {
		s, ok := st[name]
		if _, okp := pol[name]; !ok || !okp {
			t.Fatalf("%s: RateLimit %q or RateLimit-Policy %q lacks %q", what, r.header.Get("RateLimit"), r.header.Get("RateLimit-Policy"), name)
		}
		if s.r < rng[0] || s.r > rng[1] {
			if rng[0] == rng[1] {
				t.Errorf("%s: %s r=%d, want %d (RateLimit %q)", what, name, s.r, rng[0], r.header.Get("RateLimit"))
			} else {
				t.Errorf("%s: %s r=%d, want %d..%d (RateLimit %q)", what, name, s.r, rng[0], rng[1], r.header.Get("RateLimit"))
			}
		}
	}
}

// wantPolicies checks RateLimit-Policy: exactly these policies.
func wantPolicies(t *testing.T, what string, r response, want map[string]policyItem) {
	t.Helper()
	pol, _ := parsePolicy(t, r.header)
	if !maps.Equal(pol, want) {
		t.Errorf("%s: RateLimit-Policy %q, want %v", what, r.header.Get("RateLimit-Policy"), want)
	}
}

// chatEstimate is what chatBody charges a token limit at admission: its
// prompt, "hi", estimates 1 token, and since it names no max_tokens the
// completion estimate is the default 1024.
const chatEstimate = 1 + 1024

func TestExampleSeed000PerModel(t *testing.T) {
	// The upstream reports 20 prompt and 30 completion tokens.
	h, up := loadSeedExample(t, "seed000-per-model.Caddyfile", fakellm.Config{PromptTokens: 20, CompletionTokens: 30})

	// gpt-4o: rpm 120 burst 4, so a burst of 8 gets 4 through (refilling
	// at 2 per second).
	rs, elapsed := concurrently(8, func() response { return h.chat("gpt-4o") })
	wantBurst(t, "gpt-4o", rs, elapsed, 4, 2, "model:gpt-4o", "requests_per_minute")

	// gpt-4: its rpm and its tpm both apply. The tpm bucket is charged the
	// estimate at admission.
	const rpm, tpm = "model:gpt-4/requests_per_minute", "model:gpt-4/tokens_per_minute"
	start := time.Now()
	r := h.chat("gpt-4")
	wantStatus(t, "gpt-4", r, 200)
	wantRemaining(t, "gpt-4", r, map[string]int64{rpm: 49, tpm: 10000 - chatEstimate})
	wantPolicies(t, "gpt-4", r, map[string]policyItem{rpm: {50, 60}, tpm: {10000, 60}})
	// It was settled on the 50 tokens the upstream reported before the
	// next request, which is charged its own estimate. The tpm bucket
	// refills a token every 6 ms meanwhile, the rpm bucket one request
	// every 1.2 s.
	r = h.chat("gpt-4")
	elapsed = time.Since(start)
	wantStatus(t, "gpt-4 again", r, 200)
	wantRemainingWithin(t, "gpt-4 again", r, map[string][2]int64{
		rpm: refilled(50, 1, 1, elapsed, 50.0/60),
		tpm: refilled(10000, chatEstimate, 50, elapsed, 10000.0/60),
	})

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

	if total, _ := up.Counts(); total < 4+2+4+1 {
		t.Errorf("upstream saw %d requests", total)
	}
}

func TestExampleSeed003Rules(t *testing.T) {
	// The upstream reports 1 prompt and 1 completion token per request.
	h, up := loadSeedExample(t, "seed003-rules.Caddyfile", fakellm.Config{PromptTokens: 1, CompletionTokens: 1})
	prodAs := func(user string) []string {
		return []string{
			"X-User", user, "X-Team", "backend", "Authorization", "Bearer virtualaccount1",
			"X-LLM-Metadata", `{"project_id":"p-42","environment":"production"}`,
		}
	}
	prod := prodAs("alice")
	const (
		p            = "production-requests/requests_per_minute"
		backend      = "backend-gpt4-tokens/tokens_per_minute"
		va1          = "va1-gpt4-tokens/tokens_per_minute"
		perModel     = "per-model-daily/tokens_per_day"
		perUser      = "per-user-daily/tokens_per_day"
		perUserModel = "per-user-model-daily/tokens_per_day"
		project      = "per-project-hourly/tokens_per_hour"
		bobDaily     = "bob-gpt4-daily/requests_per_day"
		// The buckets' refill rates, per second.
		tpm20k   = 20000.0 / 60
		tpd1m    = 1000000.0 / 86400
		tph50k   = 50000.0 / 3600
		realUsed = 2 // what the upstream reports for every request
	)
	// Every rule applies to a production gpt-4 request but bob's.
	gpt4Policies := map[string]policyItem{
		backend: {20000, 60}, va1: {20000, 60}, perModel: {1000000, 86400}, perUser: {1000000, 86400},
		perUserModel: {1000000, 86400}, project: {50000, 3600}, p: {600, 60},
	}

	// dave, in team backend with virtualaccount1 on project p-42, comes
	// first: every bucket is fresh, and charged the estimate.
	start := time.Now()
	r := h.chat("gpt-4", prodAs("dave")...)
	wantStatus(t, "dave gpt-4", r, 200)
	wantPolicies(t, "dave gpt-4", r, gpt4Policies)
	wantRemaining(t, "dave gpt-4", r, map[string]int64{
		backend: 20000 - chatEstimate, va1: 20000 - chatEstimate, perModel: 1000000 - chatEstimate,
		perUser: 1000000 - chatEstimate, perUserModel: 1000000 - chatEstimate, project: 50000 - chatEstimate, p: 19,
	})

	// production-requests: 600 per minute, burst 20, per user and model.
	// The burst's requests ask for 1 token at most: their estimate, 2, is
	// what the upstream reports, so the token buckets (20000 and more)
	// neither refuse them nor change when they settle, and the request rule
	// alone limits the burst.
	burst := `{"max_tokens":1,"messages":[{"content":"hi","role":"user"}],"model":"gpt-4"}`
	rs, elapsed := concurrently(30, func() response { return h.post("/v1/chat/completions", burst, prod...) })
	wantBurst(t, "alice gpt-4", rs, elapsed, 20, 10, "production-requests", "requests_per_minute")
	burstOK := int64(0)
	for _, r := range rs {
		if r.status == 200 {
			if burstOK == 0 {
				wantPolicies(t, "alice gpt-4", r, gpt4Policies)
			}
			burstOK++
		}
		if r.status == 429 && !strings.Contains(string(r.body), "per user, model") {
			t.Errorf("429 %s does not say per user, model", r.body)
		}
	}
	burstUsed := realUsed * burstOK

	// Another model has its own buckets, per model and per user and model;
	// alice's own and project p-42's are shared with the burst (and dave),
	// and refill meanwhile.
	r = h.chat("gpt-4o", prod...)
	wantStatus(t, "alice gpt-4o", r, 200)
	e := time.Since(start)
	wantRemainingWithin(t, "alice gpt-4o", r, map[string][2]int64{
		perModel:     exactly(1000000 - chatEstimate),
		perUser:      refilled(1000000, chatEstimate, burstUsed, e, tpd1m),
		perUserModel: exactly(1000000 - chatEstimate),
		project:      refilled(50000, chatEstimate, realUsed+burstUsed, e, tph50k),
		p:            exactly(19),
	})
	// bob@email.com on gpt-4 also meets bob-gpt4-daily, and shares team
	// backend's, virtualaccount1's, gpt-4's and p-42's buckets. Every
	// earlier request was settled at 2 tokens.
	r = h.chat("gpt-4", prodAs("bob@email.com")...)
	wantStatus(t, "bob gpt-4", r, 200)
	e = time.Since(start)
	wantRemainingWithin(t, "bob gpt-4", r, map[string][2]int64{
		bobDaily:     exactly(999),
		backend:      refilled(20000, chatEstimate, realUsed+burstUsed, e, tpm20k),
		va1:          refilled(20000, chatEstimate, realUsed+burstUsed, e, tpm20k),
		perModel:     refilled(1000000, chatEstimate, realUsed+burstUsed, e, tpd1m),
		perUser:      exactly(1000000 - chatEstimate),
		perUserModel: exactly(1000000 - chatEstimate),
		project:      refilled(50000, chatEstimate, 2*realUsed+burstUsed, e, tph50k),
		p:            exactly(19),
	})

	// Outside production no request limit applies; the token rules that
	// name no team or account still do, and a request without a
	// project_id shares the empty project's bucket.
	r = h.chat("gpt-4", "X-User", "alice", "X-LLM-Metadata", `{"environment":"staging"}`)
	wantStatus(t, "staging", r, 200)
	e = time.Since(start)
	wantPolicies(t, "staging", r, map[string]policyItem{
		perModel: {1000000, 86400}, perUser: {1000000, 86400}, perUserModel: {1000000, 86400}, project: {50000, 3600},
	})
	wantRemainingWithin(t, "staging", r, map[string][2]int64{
		perModel:     refilled(1000000, chatEstimate, 2*realUsed+burstUsed, e, tpd1m),
		perUser:      refilled(1000000, chatEstimate, realUsed+burstUsed, e, tpd1m),
		perUserModel: refilled(1000000, chatEstimate, burstUsed, e, tpd1m),
		project:      exactly(50000 - chatEstimate),
	})

	// The key the virtual account was hashed from reaches the upstream
	// unchanged, on every admitted request that carried it.
	admitted := int(burstOK) + 3 // dave, alice gpt-4o, bob gpt-4
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

// The queue example: a burst larger than the gpt-4o bucket waits instead of
// being refused, and the self-hosted model never has more than four
// requests in flight, so its server (which answers 503 above four) refuses
// none.
func TestExampleQueue(t *testing.T) {
	h, up := loadSeedExample(t, "queue.Caddyfile", fakellm.Config{MaxConcurrent: 4, StreamChunks: 3, ChunkDelay: 10 * time.Millisecond})
	rs := h.parallel(12, "alice", "X-Priority", "interactive")
	for i, r := range rs {
		wantServed(t, fmt.Sprintf("gpt-4o request %d", i), r)
	}
	out := parallelDo(16, func(i int) queued { return h.sendModel("llama3.1-8b", fmt.Sprint("u", i%3)) })
	waited := 0
	for i, r := range out {
		wantServed(t, fmt.Sprintf("llama request %d", i), r)
		if queueWait(r) > 0 {
			waited++
		}
	}
	if total, limited := up.Counts(); limited != 0 || total != 28 {
		t.Fatalf("upstream saw %d requests and refused %d, want 28 and 0", total, limited)
	}
	if waited == 0 {
		t.Errorf("no llama request waited for a slot")
	}
}

// TestExampleRedis: the Redis example as written, against a real
// redis-server: the per-user limit is counted in Redis.
func TestExampleRedis(t *testing.T) {
	rs := redistest.Start(t)
	t.Setenv("REDIS_ADDR", rs.Addr())
	t.Setenv("REDIS_PASSWORD", "")
	h, _ := loadSeedExample(t, "redis.Caddyfile", fakellm.Config{})
	for i := range 50 {
		wantStatus(t, fmt.Sprintf("alice %d", i), h.chat("gpt-4o", "X-User", "alice"), http.StatusOK)
	}
	wantStatus(t, "alice 51", h.chat("gpt-4o", "X-User", "alice"), http.StatusTooManyRequests)
	wantStatus(t, "bob", h.chat("gpt-4o", "X-User", "bob"), http.StatusOK)
	keys, err := rs.Client(t).Keys(context.Background(), "{team-gateway}*").Result()
	if err != nil || len(keys) == 0 {
		t.Fatalf("no bucket under {team-gateway} in Redis (%v): the example does not use it", err)
	}
}
