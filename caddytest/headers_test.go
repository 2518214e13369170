package caddytest

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
)

// wantAllRateLimitHeaders checks the full set of rate-limit fields for a
// response on which the single policy name applied with quota q over window
// w seconds and rem remaining.
func wantAllRateLimitHeaders(t *testing.T, what string, r response, name string, q, w, rem int64) {
	t.Helper()
	pol, _ := parsePolicy(t, r.header)
	if len(pol) != 1 || pol[name] != (policyItem{q, w}) {
		t.Errorf("%s: RateLimit-Policy %q, want %q;q=%d;w=%d", what, r.header.Get("RateLimit-Policy"), `"`+name+`"`, q, w)
	}
	st := parseState(t, r.header)
	s, ok := st[name]
	if len(st) != 1 || !ok || s.r != rem {
		t.Errorf("%s: RateLimit %q, want %q with r=%d", what, r.header.Get("RateLimit"), `"`+name+`"`, rem)
	}
	if ok && (s.t < 1 || s.t > w) {
		t.Errorf("%s: RateLimit t=%d, want 1..%d for a bucket that is not full", what, s.t, w)
	}
	for field, want := range map[string]string{
		"X-RateLimit-Limit":     strconv.FormatInt(q, 10),
		"X-RateLimit-Remaining": strconv.FormatInt(rem, 10),
	} {
		if got := r.header.Values(field); len(got) != 1 || got[0] != want {
			t.Errorf("%s: %s %q, want %q", what, field, got, want)
		}
	}
	reset, err := strconv.ParseInt(r.header.Get("X-RateLimit-Reset"), 10, 64)
	now := time.Now().Unix()
	if err != nil || reset < now || reset > now+w+1 {
		t.Errorf("%s: X-RateLimit-Reset %q, want a Unix time within %d s from now (%d)", what, r.header.Get("X-RateLimit-Reset"), w, now)
	}
}

// Every response a rule applied to carries the rate-limit fields: a 200, an
// upstream 429 and 404, a 502 Caddy writes when the upstream is down, and
// our own 429. The upstream's own rate-limit fields pass through unchanged.
func TestRateLimitHeadersOnEveryStatus(t *testing.T) {
	// The fake upstream allows 1 request (burst 1) and never refills, since
	// its clock stands still, so its headers are known exactly.
	fixed := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	up := startFake(t, fakellm.Config{RPM: 1, Burst: 1, RateLimitHeaders: true, Now: func() time.Time { return fixed }})
	h := newHarness(t)
	deadPort := freePort(t) // nothing listens there
	deadSitePort := freePort(t)
	h.load(h.site(`
		rule all {
			limit 4 requests_per_hour
		}`, hostPort(up)) + fmt.Sprintf(`
:%d {
	llm_rate_limit {
		rule dead {
			limit 4 requests_per_hour
		}
	}
	reverse_proxy 127.0.0.1:%d
}
`, deadSitePort, deadPort))
	const p = "all/requests_per_hour"

	upstreamHeaders := func(what string, r response, want map[string]string) {
		t.Helper()
		for k, v := range want {
			if got := r.header.Values(k); len(got) != 1 || got[0] != v {
				t.Errorf("%s: upstream header %s = %q, want exactly %q", what, k, got, v)
			}
		}
	}

	r := h.chat("gpt-4o")
	wantStatus(t, "200", r, http.StatusOK)
	wantAllRateLimitHeaders(t, "200", r, p, 4, 3600, 3)
	upstreamHeaders("200", r, map[string]string{
		"X-Ratelimit-Limit-Requests":     "1",
		"X-Ratelimit-Remaining-Requests": "0",
		"X-Ratelimit-Reset-Requests":     "1m0s",
	})
	if r.header.Get("Retry-After") != "" {
		t.Errorf("200: Retry-After %q", r.header.Get("Retry-After"))
	}

	r = h.chat("gpt-4o")
	wantStatus(t, "upstream 429", r, http.StatusTooManyRequests)
	wantAllRateLimitHeaders(t, "upstream 429", r, p, 4, 3600, 2)
	upstreamHeaders("upstream 429", r, map[string]string{
		"X-Ratelimit-Limit-Requests":     "1",
		"X-Ratelimit-Remaining-Requests": "0",
		"X-Ratelimit-Reset-Requests":     "1m0s",
		"Retry-After":                    "60",
		"Retry-After-Ms":                 "60000",
	})
	var e openAIError
	decodeStrict(t, "upstream 429", r.body, &e)
	if e.Error.Code != "rate_limit_exceeded" || e.Error.Message == "" {
		t.Errorf("upstream 429 body changed: %s", r.body)
	}

	r = h.post("/v1/no-such-endpoint", `{"model":"gpt-4o"}`)
	wantStatus(t, "upstream 404", r, http.StatusNotFound)
	wantAllRateLimitHeaders(t, "upstream 404", r, p, 4, 3600, 1)

	// Caddy itself answers 502: the upstream is down.
	deadURL := fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", deadSitePort)
	r = h.do(h.newReqURL(http.MethodPost, deadURL, strings.NewReader(chatBody("gpt-4o"))))
	wantStatus(t, "502", r, http.StatusBadGateway)
	wantAllRateLimitHeaders(t, "502", r, "dead/requests_per_hour", 4, 3600, 3)

	// Our own 429, after the fourth admitted request.
	r = h.chat("gpt-4o")
	wantStatus(t, "upstream 429 again", r, http.StatusTooManyRequests)
	wantAllRateLimitHeaders(t, "upstream 429 again", r, p, 4, 3600, 0)
	r = h.chat("gpt-4o")
	wantOpenAI429(t, "our 429", r, "all", "requests_per_hour")
	wantAllRateLimitHeaders(t, "our 429", r, p, 4, 3600, 0)
	if got := r.header.Values("X-Ratelimit-Limit-Requests"); len(got) != 0 {
		t.Errorf("our 429 carries the upstream's header %q: it never reached the upstream", got)
	}
	if total, _ := up.Counts(); total != 4 {
		t.Errorf("upstream saw %d requests, want 4", total)
	}
}

// When the upstream sends rate-limit fields of the same names as ours, the
// client sees the upstream's alone, unchanged.
func TestUpstreamSameNamedHeadersWin(t *testing.T) {
	h := newHarness(t)
	h.loadBeforeSite(`
		rule all {
			limit 10 requests_per_hour
		}`, `	header {
		RateLimit-Policy "\"upstream\";q=100;w=60"
		RateLimit "\"upstream\";r=99;t=1"
		X-RateLimit-Limit 100
		X-RateLimit-Remaining 99
		X-RateLimit-Reset 12345
		X-Upstream-Only yes
	}
	respond "from upstream" 200`)
	r := h.chat("gpt-4o")
	wantStatus(t, "proxied", r, http.StatusOK)
	if string(r.body) != "from upstream" {
		t.Errorf("body %q", r.body)
	}
	for k, v := range map[string]string{
		"RateLimit-Policy":      `"upstream";q=100;w=60`,
		"RateLimit":             `"upstream";r=99;t=1`,
		"X-RateLimit-Limit":     "100",
		"X-RateLimit-Remaining": "99",
		"X-RateLimit-Reset":     "12345",
		"X-Upstream-Only":       "yes",
	} {
		if got := r.header.Values(k); len(got) != 1 || got[0] != v {
			t.Errorf("%s = %q, want exactly the upstream's %q", k, got, v)
		}
	}
	// The rule still counted the request.
	h.load(h.site(`
		rule all {
			limit 10 requests_per_hour
		}`, "127.0.0.1:1"))
	r = h.chat("gpt-4o")
	wantStatus(t, "upstream gone", r, http.StatusBadGateway)
	wantRemaining(t, "after reload", r, map[string]int64{"all/requests_per_hour": 8})
}

// An upstream 503 (its concurrency cap) carries our fields too.
func TestRateLimitHeadersOnUpstream503(t *testing.T) {
	up := startFake(t, fakellm.Config{MaxConcurrent: 1, StreamChunks: 2, ChunkDelay: 30 * time.Second})
	h := newHarness(t)
	h.loadHandler(`
		rule all {
			limit 4 requests_per_hour
		}`, up)

	// Hold the upstream's only slot with a slow stream.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	held := make(chan error, 1)
	go func() {
		res, err := h.openStream(ctx)
		if err == nil {
			_, err = io.Copy(io.Discard, res.Body)
			res.Body.Close()
		}
		held <- err
	}()
	wctx, wcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer wcancel()
	if !waitFor(wctx, func() bool { return up.InFlight() == 1 }) {
		t.Fatal("the slow stream never reached the upstream")
	}

	r := h.chat("gpt-4o")
	wantStatus(t, "upstream 503", r, http.StatusServiceUnavailable)
	wantAllRateLimitHeaders(t, "upstream 503", r, "all/requests_per_hour", 4, 3600, 2)
	var e openAIError
	decodeStrict(t, "upstream 503", r.body, &e)
	if e.Error.Code != "overloaded" {
		t.Errorf("upstream 503 body changed: %s", r.body)
	}

	cancel()
	select {
	case <-held:
	case <-wctx.Done():
		t.Fatal("the held stream did not end after its client went away")
	}
}

// A streamed response reaches the client as it is produced, with our
// fields on it: the module's response wrapper does not buffer.
func TestStreamingPassesThrough(t *testing.T) {
	up := startFake(t, fakellm.Config{StreamChunks: 2, ChunkDelay: 30 * time.Second})
	h := newHarness(t)
	h.loadHandler(`
		model gpt-4o {
			rpm 10
		}`, up)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := h.openStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	r := response{status: res.StatusCode, header: res.Header}
	wantStatus(t, "stream", r, http.StatusOK)
	wantAllRateLimitHeaders(t, "stream", r, "model:gpt-4o/requests_per_minute", 10, 60, 9)
	if ct := res.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") {
		t.Errorf("Content-Type %q", ct)
	}
	// The first chunk arrives while the upstream still holds the second
	// back for 30 s.
	br := bufio.NewReader(res.Body)
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("reading the stream before its second chunk: %v", err)
		}
		if strings.HasPrefix(line, "data: ") {
			if !strings.Contains(line, `"content":"fake1"`) {
				t.Errorf("first event %q, want the first chunk", line)
			}
			break
		}
	}
	if up.InFlight() != 1 {
		t.Errorf("upstream in flight %d, want the stream still open", up.InFlight())
	}
}
