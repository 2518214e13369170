package caddytest

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
)

// A request that joins an existing lane and is refused there without any
// store call (queue full here; predicted too late, or timed out before its
// first try, take the same path) gets its rate-limit headers from the
// states the handler passed in, which are zeros: every bucket reads r=0 and
// t=0, even one with 99 of 100 left, and X-RateLimit-Reset says "now" while
// Retry-After says later.
func TestReviewQueueRefusalHeadersFromNoState(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	h.loadHandler(`		user {http.request.header.X-User}
		queue {
			max_wait 10s
			max_depth 1
		}
		rule fast {
			limit 2 requests_per_second burst 1
		}
		rule wide {
			limit 100 requests_per_minute
		}`, up)
	wantStatus(t, "first", h.chat("gpt-4o", "X-User", "a"), 200)
	// The second waits in fast's lane (about 500 ms) and fills it.
	second := make(chan queued, 1)
	go func() { second <- h.send(context.Background(), "b") }()
	time.Sleep(100 * time.Millisecond)
	// The third joins the full lane; its own flow has the most waiting, so
	// it is the one turned away.
	r := h.chat("gpt-4o", "X-User", "b")
	if r.status != 429 || r.header.Get("X-Queue-Depth") == "" {
		t.Fatalf("third: %v, want a queue refusal", r)
	}
	st := parseState(t, r.header)
	t.Logf("RateLimit: %q, X-RateLimit-Reset %q, Retry-After %q", r.header.Get("RateLimit"), r.header.Get("X-RateLimit-Reset"), r.header.Get("Retry-After"))
	if got := st["wide/requests_per_minute"].r; got < 90 {
		t.Errorf("wide/requests_per_minute r=%d, want about 99: the bucket was never looked at", got)
	}
	if got := st["fast/requests_per_second"].t; got < 1 {
		t.Errorf("fast/requests_per_second t=%d on a refusal for that bucket, want ≥ 1", got)
	}
	if reset, _ := strconv.ParseInt(r.header.Get("X-RateLimit-Reset"), 10, 64); reset < time.Now().Unix() {
		t.Errorf("X-RateLimit-Reset %d is in the past", reset)
	}
	wantServed(t, "second", <-second)
}
