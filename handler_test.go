package llmratelimit

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/llmratelimit/caddy-llm-ratelimit/bucket"
	"go.uber.org/zap"
)

// fakeClock is a clock tests move by hand.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time          { return c.t }
func (c *fakeClock) advance(d time.Duration) { c.t = c.t.Add(d) }

// newTestHandler provisions a handler on a fake clock. It registers cleanup.
func newTestHandler(t testing.TB, h *Handler) *fakeClock {
	t.Helper()
	clock := &fakeClock{t: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
	h.now = clock.now
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	if err := h.Provision(ctx); err != nil {
		t.Fatalf("Provision: %v", err)
	}
	h.logger = zap.NewNop()
	if err := h.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	t.Cleanup(func() { h.Cleanup() })
	return clock
}

// upstream is the next handler: it answers 200, or the status in the
// X-Test-Status request header, and counts calls.
type upstream struct{ calls int }

func (u *upstream) ServeHTTP(w http.ResponseWriter, r *http.Request) error {
	u.calls++
	status := http.StatusOK
	if s := r.Header.Get("X-Test-Status"); s != "" {
		json.Unmarshal([]byte(s), &status)
	}
	if v := r.Header.Get("X-Test-Upstream-Header"); v != "" {
		w.Header().Add(headerLimit, v)
	}
	w.WriteHeader(status)
	_, err := w.Write([]byte(`{"ok":true}`))
	return err
}

func serve(t testing.TB, h *Handler, next caddyhttp.Handler, path, body string, hdr ...string) *httptest.ResponseRecorder {
	t.Helper()
	r := httptest.NewRequest(http.MethodPost, path, strings.NewReader(body))
	for i := 0; i+1 < len(hdr); i += 2 {
		r.Header.Set(hdr[i], hdr[i+1])
	}
	repl := caddy.NewReplacer()
	r = r.WithContext(context.WithValue(r.Context(), caddy.ReplacerCtxKey, repl))
	caddyhttp.NewTestReplacer(r) // adds the http.request.* placeholders
	w := httptest.NewRecorder()
	if err := h.ServeHTTP(w, r, next); err != nil {
		if he, ok := err.(caddyhttp.HandlerError); ok {
			w.Code = he.StatusCode
		} else {
			t.Fatalf("ServeHTTP: %v", err)
		}
	}
	return w
}

const chatBody = `{"model":"gpt-4o","messages":[{"role":"user","content":"hello"}]}`

func TestHandlerLimitsAndHeaders(t *testing.T) {
	h := &Handler{
		User: "{http.request.header.X-User}",
		Rules: []Rule{
			{ID: "per-user", Limits: []Limit{{LimitTo: 60, Unit: "requests_per_minute", Burst: 2}}, AppliesPer: []string{"user"}},
			{ID: "daily", Limits: []Limit{{LimitTo: 1000, Unit: "requests_per_day"}}},
		},
	}
	clock := newTestHandler(t, h)
	up := &upstream{}
	for i := 0; i < 2; i++ {
		w := serve(t, h, up, "/v1/chat/completions", chatBody, "X-User", "alice")
		if w.Code != 200 {
			t.Fatalf("request %d: %d", i, w.Code)
		}
	}
	w := serve(t, h, up, "/v1/chat/completions", chatBody, "X-User", "alice")
	if w.Code != http.StatusTooManyRequests || up.calls != 2 {
		t.Fatalf("third: %d after %d upstream calls", w.Code, up.calls)
	}
	if got := w.Header().Get("Retry-After"); got != "1" {
		t.Fatalf("Retry-After = %q", got)
	}
	if got := w.Header().Get("Retry-After-Ms"); got != "1000" {
		t.Fatalf("Retry-After-Ms = %q", got)
	}
	wantPolicy := `"per-user/requests_per_minute";q=60;w=60, "daily/requests_per_day";q=1000;w=86400`
	if got := w.Header().Get("RateLimit-Policy"); got != wantPolicy {
		t.Fatalf("RateLimit-Policy = %q", got)
	}
	// The refusal charged nothing: daily still has 998 left.
	wantState := `"per-user/requests_per_minute";r=0;t=2, "daily/requests_per_day";r=998;t=173`
	if got := w.Header().Get("RateLimit"); got != wantState {
		t.Fatalf("RateLimit = %q", got)
	}
	if w.Header().Get(headerLimit) != "60" || w.Header().Get(headerRemaining) != "0" {
		t.Fatalf("X-RateLimit: %v", w.Header())
	}
	if got, want := w.Header().Get(headerReset), clock.t.Add(2*time.Second).Unix(); got != strings.TrimSpace(jsonInt(want)) {
		t.Fatalf("X-RateLimit-Reset = %s, want %d", got, want)
	}
	var body struct {
		Error struct{ Message, Type, Code string }
	}
	if err := json.Unmarshal(w.Body.Bytes(), &body); err != nil || body.Error.Code != "rate_limit_exceeded" ||
		!strings.Contains(body.Error.Message, `"per-user"`) || !strings.Contains(body.Error.Message, "requests_per_minute") {
		t.Fatalf("body %s (%v)", w.Body, err)
	}
	// Another user has a bucket of its own.
	if w := serve(t, h, up, "/v1/chat/completions", chatBody, "X-User", "bob"); w.Code != 200 {
		t.Fatalf("bob: %d", w.Code)
	}
	// After a second, alice has one request again.
	clock.advance(time.Second)
	if w := serve(t, h, up, "/v1/chat/completions", chatBody, "X-User", "alice"); w.Code != 200 {
		t.Fatalf("alice after 1s: %d", w.Code)
	}
}

func jsonInt(n int64) string { b, _ := json.Marshal(n); return string(b) }

func TestHandlerHeadersOnEveryStatus(t *testing.T) {
	h := &Handler{Rules: []Rule{{ID: "r", Limits: []Limit{{LimitTo: 100, Unit: "requests_per_minute"}}}}}
	newTestHandler(t, h)
	for _, status := range []string{"200", "404", "500", "503"} {
		w := serve(t, h, &upstream{}, "/v1/chat/completions", chatBody, "X-Test-Status", status)
		if w.Header().Get("RateLimit") == "" || w.Header().Get(headerRemaining) == "" {
			t.Fatalf("status %s: no rate-limit headers: %v", status, w.Header())
		}
	}
	// An upstream's own X-RateLimit-Limit wins over ours.
	w := serve(t, h, &upstream{}, "/v1/chat/completions", chatBody, "X-Test-Upstream-Header", "12345")
	if got := w.Header().Values(headerLimit); len(got) != 1 || got[0] != "12345" {
		t.Fatalf("X-RateLimit-Limit = %q, want the upstream's alone", got)
	}
}

func TestHandlerShadowNeverRefuses(t *testing.T) {
	h := &Handler{Rules: []Rule{{ID: "s", Mode: "shadow", Limits: []Limit{{LimitTo: 1, Unit: "requests_per_minute"}}}}}
	newTestHandler(t, h)
	up := &upstream{}
	for i := 0; i < 3; i++ {
		w := serve(t, h, up, "/v1/chat/completions", chatBody)
		if w.Code != 200 {
			t.Fatalf("shadow refused request %d: %d", i, w.Code)
		}
		if got := w.Header().Get("RateLimit"); got != `"s/requests_per_minute";r=0;t=60` {
			t.Fatalf("RateLimit = %q", got)
		}
	}
	if up.calls != 3 {
		t.Fatalf("upstream calls %d", up.calls)
	}
}

func TestHandlerAtomicAcrossRules(t *testing.T) {
	h := &Handler{Rules: []Rule{
		{ID: "roomy", Limits: []Limit{{LimitTo: 100, Unit: "requests_per_minute"}}},
		{ID: "tight", Limits: []Limit{{LimitTo: 1, Unit: "requests_per_minute"}}, When: &When{Models: []string{"gpt-4o"}}},
	}}
	newTestHandler(t, h)
	up := &upstream{}
	serve(t, h, up, "/v1/chat/completions", chatBody)
	for i := 0; i < 5; i++ {
		if w := serve(t, h, up, "/v1/chat/completions", chatBody); w.Code != 429 {
			t.Fatalf("request %d: %d", i, w.Code)
		}
	}
	w := serve(t, h, up, "/v1/chat/completions", `{"model":"other"}`)
	if got := w.Header().Get("RateLimit"); got != `"roomy/requests_per_minute";r=98;t=2` {
		t.Fatalf("refused requests charged the roomy rule: %q", got)
	}
}

func TestHandlerErrorsPerDialect(t *testing.T) {
	h := &Handler{MaxBody: 64, Rules: []Rule{{ID: "r", Limits: []Limit{{LimitTo: 100, Unit: "requests_per_minute"}}}}}
	newTestHandler(t, h)
	up := &upstream{}
	for _, tc := range []struct {
		path, body string
		status     int
		want       string
	}{
		{"/v1/chat/completions", `{"model":`, 400, `"code":"invalid_request"`},
		{"/v1/messages", `not json`, 400, `"type":"invalid_request_error"`},
		{"/v1beta/models/gemini-2.0-flash:generateContent", strings.Repeat(" ", 65), 413, `"status":"INVALID_ARGUMENT"`},
		{"/api/chat", `[]`, 400, `{"error":`},
		{"/v1/models", `anything at all, it is not read`, 200, `{"ok":true}`},
	} {
		calls := up.calls
		w := serve(t, h, up, tc.path, tc.body)
		if w.Code != tc.status || !strings.Contains(w.Body.String(), tc.want) {
			t.Errorf("%s %q: %d %s; want %d and %s", tc.path, tc.body, w.Code, w.Body, tc.status, tc.want)
		}
		// A request the module answers itself goes no further.
		if forwarded := up.calls > calls; forwarded != (tc.status == 200) {
			t.Errorf("%s %q: forwarded = %v", tc.path, tc.body, forwarded)
		}
	}
	// Operators who prefer handle_errors get a caddyhttp.Error.
	h2 := &Handler{UseHandleErrors: true, Rules: []Rule{{ID: "r", Limits: []Limit{{LimitTo: 1, Unit: "requests_per_minute"}}}}}
	newTestHandler(t, h2)
	serve(t, h2, &upstream{}, "/v1/chat/completions", chatBody)
	w := serve(t, h2, &upstream{}, "/v1/chat/completions", chatBody)
	if w.Code != 429 || w.Body.Len() != 0 || w.Header().Get("Retry-After") == "" {
		t.Fatalf("handle_errors mode: %d %q %v", w.Code, w.Body, w.Header())
	}
}

// TestReloadKeepsState provisions a second handler with the same rules
// before cleaning up the first, as a Caddy reload does.
func TestReloadKeepsState(t *testing.T) {
	rules := func(limit int64) []Rule {
		return []Rule{{ID: "reload", Limits: []Limit{{LimitTo: limit, Unit: "requests_per_minute"}}}}
	}
	old := &Handler{Rules: rules(10)}
	newTestHandler(t, old)
	for i := 0; i < 6; i++ {
		serve(t, old, &upstream{}, "/v1/chat/completions", chatBody)
	}
	// Same rule: the level carries over.
	same := &Handler{Rules: rules(10)}
	newTestHandler(t, same)
	old.Cleanup()
	if got := serve(t, same, &upstream{}, "/v1/chat/completions", chatBody).Header().Get("RateLimit"); got != `"reload/requests_per_minute";r=3;t=42` {
		t.Fatalf("after reload: %q", got)
	}
	// A changed limit applies to the existing level: 7 used of 8.
	changed := &Handler{Rules: rules(8)}
	newTestHandler(t, changed)
	same.Cleanup()
	if got := serve(t, changed, &upstream{}, "/v1/chat/completions", chatBody).Header().Get("RateLimit"); got != `"reload/requests_per_minute";r=0;t=60` {
		t.Fatalf("after a changed limit: %q", got)
	}
	// A removed rule's buckets are freed: a later rule of the same id starts full.
	none := &Handler{}
	newTestHandler(t, none)
	changed.Cleanup()
	if n := none.state.store.(*bucket.MemoryStore).Len(); n != 0 {
		t.Fatalf("%d buckets left after the rule was removed", n)
	}
}
