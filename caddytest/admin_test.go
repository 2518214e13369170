package caddytest

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
	"github.com/llmratelimit/caddy-llm-ratelimit/internal/redistest"
)

// withAdmin picks a port for Caddy's admin endpoint on localhost, and
// returns the endpoint's base URL; loadAdmin loads with the endpoint on. It
// is stopped when the test ends (an `admin off` load replaces it).
func withAdmin(t *testing.T) (port int, base string) {
	t.Helper()
	port = freePort(t)
	t.Cleanup(func() {
		if err := loadRaw(withGlobalOptions("")); err != nil {
			t.Errorf("stopping the admin endpoint: %v", err)
		}
	})
	return port, fmt.Sprintf("http://localhost:%d", port)
}

// loadAdmin is loadHandler with the admin endpoint on at port, in place of
// the test options' `admin off`.
func (h *harness) loadAdmin(port int, handlerBlock string, up *fakellm.Server) {
	h.t.Helper()
	cfg := withGlobalOptions(h.site(handlerBlock, hostPort(up)))
	on := strings.Replace(cfg, "\tadmin off\n", fmt.Sprintf("\tadmin localhost:%d\n", port), 1)
	if on == cfg {
		h.t.Fatal("the test global options no longer say `admin off`")
	}
	if err := loadRaw(on); err != nil {
		h.t.Fatalf("loading config: %v\n%s", err, on)
	}
	h.closeIdle()
	h.justLoaded.Store(true)
}

// adminJSON calls the admin endpoint and decodes its JSON answer into v
// (when not nil); it returns the status and the raw body.
func (h *harness) adminJSON(method, url string, v any) (int, string) {
	h.t.Helper()
	r := h.do(h.newReqURL(method, url, nil))
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		h.t.Fatalf("%s %s: Content-Type %q, want application/json: %v", method, url, ct, r)
	}
	if v != nil {
		if err := json.Unmarshal(r.body, v); err != nil {
			h.t.Fatalf("%s %s: %v in %s", method, url, err, r.body)
		}
	}
	return r.status, string(r.body)
}

// adminBucket is what the test reads of a listed bucket.
type adminBucket struct {
	Rule       string            `json:"rule"`
	Unit       string            `json:"unit"`
	Key        string            `json:"key"`
	AppliesPer map[string]string `json:"applies_per"`
	Limit      struct {
		LimitTo       int64 `json:"limit_to"`
		WindowSeconds int64 `json:"window_seconds"`
	} `json:"limit"`
	Used              int64   `json:"used"`
	Remaining         int64   `json:"remaining"`
	Reset             string  `json:"reset"`
	ResetAfterSeconds float64 `json:"reset_after_seconds"`
}

func (h *harness) adminBuckets(admin, query string) map[string]adminBucket {
	h.t.Helper()
	var out struct{ Buckets []adminBucket }
	if code, body := h.adminJSON(http.MethodGet, admin+"/llm_rate_limit/buckets"+query, &out); code != http.StatusOK {
		h.t.Fatalf("GET buckets%s: %d %s", query, code, body)
	}
	m := make(map[string]adminBucket)
	for _, b := range out.Buckets {
		m[b.AppliesPer["user"]] = b
	}
	return m
}

// TestAdminEndToEnd lists a running rule's buckets on Caddy's admin
// endpoint, resets one user's, and shows that the user is served again
// while another user's bucket is as it was.
func TestAdminEndToEnd(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	port, admin := withAdmin(t)
	h.loadAdmin(port, `		user {http.request.header.X-User}
		rule per-user {
			limit 3 requests_per_minute
			applies_per user
		}`, up)

	if r := h.chat("gpt-4o", "X-User", "bob"); r.status != 200 {
		t.Fatalf("bob: %v", r)
	}
	for i := range 3 {
		if r := h.chat("gpt-4o", "X-User", "alice"); r.status != 200 {
			t.Fatalf("alice's request %d: %v", i+1, r)
		}
	}
	if r := h.chat("gpt-4o", "X-User", "alice"); r.status != http.StatusTooManyRequests {
		t.Fatalf("alice's 4th request: %v, want 429", r)
	}

	bs := h.adminBuckets(admin, "?rule=per-user")
	alice, bob := bs["alice"], bs["bob"]
	if len(bs) != 2 || alice.Key != "user=alice" || alice.Unit != "requests_per_minute" || alice.Limit.LimitTo != 3 || alice.Limit.WindowSeconds != 60 ||
		alice.Used != 3 || alice.Remaining != 0 || alice.ResetAfterSeconds <= 0 || alice.ResetAfterSeconds > 60 {
		t.Fatalf("buckets: %+v; want alice's with 3 used and 0 remaining", bs)
	}
	reset, err := time.Parse(time.RFC3339Nano, alice.Reset)
	if err != nil || time.Until(reset) > time.Minute || time.Until(reset) <= 0 {
		t.Fatalf("alice's reset %q (%v): want within the next minute", alice.Reset, err)
	}
	if bob.Used != 1 || bob.Remaining != 2 {
		t.Fatalf("bob's bucket: %+v; want 1 used, 2 remaining", bob)
	}

	var res struct{ Reset int }
	if code, body := h.adminJSON(http.MethodPost, admin+"/llm_rate_limit/reset?rule=per-user&key=user=alice", &res); code != 200 || res.Reset != 1 {
		t.Fatalf("reset alice: %d %s; want 1 bucket reset", code, body)
	}
	if r := h.chat("gpt-4o", "X-User", "alice"); r.status != 200 {
		t.Fatalf("alice after the reset: %v, want 200", r)
	}
	bs = h.adminBuckets(admin, "?rule=per-user")
	if a, b := bs["alice"], bs["bob"]; a.Used != 1 || a.Remaining != 2 || b.Used != 1 || b.Remaining != 2 {
		t.Fatalf("after the reset and one more request: alice %+v, bob %+v; want 1 used each", a, b)
	}

	// Errors are the admin endpoint's JSON errors.
	for _, c := range []struct {
		method, path string
		code         int
		msg          string
	}{
		{http.MethodGet, "/llm_rate_limit/reset?rule=per-user&all=1", 405, "use POST"},
		{http.MethodGet, "/llm_rate_limit/buckets?limit=0", 400, "limit must be"},
		{http.MethodGet, "/llm_rate_limit/buckets?rule=nope", 404, `no running llm_rate_limit rule "nope"`},
		{http.MethodPost, "/llm_rate_limit/reset?rule=per-user&key=team=x", 400, "splits by [user]"},
	} {
		var e struct{ Error string }
		if code, body := h.adminJSON(c.method, admin+c.path, &e); code != c.code || !strings.Contains(e.Error, c.msg) {
			t.Errorf("%s %s: %d %s; want %d saying %q", c.method, c.path, code, body, c.code, c.msg)
		}
	}
}

// TestAdminLearned shows what adaptive mode learned in front of upstreams
// with limits it is not told: one that advertises them in headers, and one
// whose refusals only say when to come back.
func TestAdminLearned(t *testing.T) {
	type rate struct {
		LimitTo int64  `json:"limit_to"`
		Source  string `json:"source"`
	}
	type learned struct {
		Model        string `json:"model"`
		Requests     *rate  `json:"requests"`
		Tokens       *rate  `json:"tokens"`
		BlockedUntil string `json:"blocked_until"`
		Accepted     int64  `json:"accepted"`
	}
	for _, tc := range []struct {
		name    string
		cfg     fakellm.Config
		sources []string
		tokens  bool
	}{
		{"headers", fakellm.Config{RPM: 600, TPM: 100000, RateLimitHeaders: true}, []string{"headers"}, true},
		{"retry-after only", fakellm.Config{RPM: 60, Burst: 2, RetryAfterOnly: true}, []string{"retry-after", "measured"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := startFake(t, tc.cfg)
			h := newHarness(t)
			port, admin := withAdmin(t)
			h.loadAdmin(port, `		user {http.request.header.X-User}
		adaptive`, up)
			get := func() []learned {
				var out struct{ Learned []learned }
				if code, body := h.adminJSON(http.MethodGet, admin+"/llm_rate_limit/learned?model=gpt-4o", &out); code != 200 {
					t.Fatalf("GET learned: %d %s", code, body)
				}
				return out.Learned
			}
			if got := get(); len(got) != 0 {
				t.Fatalf("before any request: %+v, want no learner", got)
			}
			// Requests until the upstream has said something about its
			// limit: its headers on the first answer, or a refusal (which
			// the module retries: the client sees 200).
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			var last []learned
			ok := waitFor(ctx, func() bool {
				if r := h.chat("gpt-4o", "X-User", "u"); r.status != 200 {
					t.Fatalf("request: %v", r)
				}
				last = get()
				return len(last) == 1 && last[0].Requests != nil
			})
			if !ok {
				t.Fatalf("nothing learned after 15 s: %+v; upstream %+v", last, up.Stats())
			}
			l := last[0]
			found := false
			for _, s := range tc.sources {
				found = found || l.Requests.Source == s
			}
			if l.Model != "gpt-4o" || !found || l.Requests.LimitTo <= 0 || l.Accepted < 1 {
				t.Fatalf("learned %+v (requests %+v); want a request rate from %v", l, l.Requests, tc.sources)
			}
			if tc.tokens != (l.Tokens != nil) {
				t.Fatalf("learned tokens %+v; want them only from headers", l.Tokens)
			}
			if tc.tokens && (l.Tokens.LimitTo != 100000 || l.Tokens.Source != "headers" || l.Requests.LimitTo != 600) {
				t.Fatalf("learned %+v and %+v; want the advertised 600 requests and 100000 tokens a minute", l.Requests, l.Tokens)
			}
		})
	}
}

// TestAdminRedis lists and resets buckets kept in Redis, and during an
// outage lists the local stand-in's buckets, marked as such, under the
// divided limit.
func TestAdminRedis(t *testing.T) {
	srv := redistest.Start(t)
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	port, admin := withAdmin(t)
	h.loadAdmin(port, fmt.Sprintf(`		user {http.request.header.X-User}
		store redis {
			address %s
			key_prefix admintest
			timeout 2s
			fail_mode local
			instances 3
		}
		rule per-user {
			limit 6 requests_per_minute
			applies_per user
		}`, srv.Addr()), up)
	for range 6 {
		if r := h.chat("gpt-4o", "X-User", "alice"); r.status != 200 {
			t.Fatalf("alice: %v", r)
		}
	}
	h.chat("gpt-4o", "X-User", "bob")
	var out struct {
		Buckets []struct {
			Store, Key      string
			Used, Remaining int64
			Fallback        bool
			Limit           struct {
				LimitTo int64 `json:"limit_to"`
			}
		}
	}
	if code, body := h.adminJSON(http.MethodGet, admin+"/llm_rate_limit/buckets?rule=per-user", &out); code != 200 || len(out.Buckets) != 2 {
		t.Fatalf("buckets: %d %s", code, body)
	}
	a := out.Buckets[0]
	if !strings.HasPrefix(a.Store, "redis:") || a.Key != "user=alice" || a.Used != 6 || a.Remaining != 0 || a.Fallback {
		t.Fatalf("alice's bucket in Redis: %+v", a)
	}
	aliceKey := "{admintest}\x1fper-user\x1fuser\x1frequests_per_minute\x1f\x05alice"
	rc := srv.Client(t)
	if n, err := rc.Exists(context.Background(), aliceKey).Result(); err != nil || n != 1 {
		t.Fatalf("alice's key in Redis before the reset: %d, %v", n, err)
	}
	var res struct{ Reset int }
	if code, body := h.adminJSON(http.MethodPost, admin+"/llm_rate_limit/reset?rule=per-user&key=user=alice", &res); code != 200 || res.Reset != 1 {
		t.Fatalf("reset alice: %d %s", code, body)
	}
	if n, err := rc.Exists(context.Background(), aliceKey).Result(); err != nil || n != 0 {
		t.Fatalf("alice's key in Redis after the reset: %d, %v", n, err)
	}

	// Redis goes away: requests are limited here, at 6/3 = 2 a minute.
	srv.Stop()
	if r := h.chat("gpt-4o", "X-User", "alice"); r.status != 200 {
		t.Fatalf("alice during the outage: %v", r)
	}
	if code, body := h.adminJSON(http.MethodGet, admin+"/llm_rate_limit/buckets?rule=per-user", &out); code != 200 || len(out.Buckets) != 1 {
		t.Fatalf("buckets during the outage: %d %s; want alice's local one", code, body)
	}
	if a := out.Buckets[0]; !a.Fallback || a.Limit.LimitTo != 2 || a.Used != 1 || a.Remaining != 1 {
		t.Fatalf("alice's local bucket: %+v; want 1 used of 2, marked fallback", a)
	}
	if code, body := h.adminJSON(http.MethodPost, admin+"/llm_rate_limit/reset?rule=per-user&all=1", nil); code != http.StatusServiceUnavailable || !strings.Contains(body, "primary store is down") {
		t.Fatalf("reset during the outage: %d %s; want 503", code, body)
	}
}
