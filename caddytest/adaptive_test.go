package caddytest

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
)

// adaptiveRun sends requests at a steady rate from several users for d,
// each in its own goroutine, and returns every result.
func (h *harness) adaptiveRun(d time.Duration, perSecond float64, model string, hdr ...string) []queued {
	var mu sync.Mutex
	var out []queued
	var wg sync.WaitGroup
	interval := time.Duration(float64(time.Second) / perSecond)
	ctx, cancel := context.WithTimeout(context.Background(), d+60*time.Second)
	defer cancel()
	for i, start := 0, time.Now(); time.Since(start) < d; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := h.sendModelCtx(ctx, model, fmt.Sprint("u", i%5), hdr...)
			mu.Lock()
			out = append(out, r)
			mu.Unlock()
		}()
		time.Sleep(interval)
	}
	wg.Wait()
	return out
}

func attempts(r queued) int {
	n, _ := strconv.Atoi(r.header.Get("X-Upstream-Attempts"))
	return n
}

// With no limit configured, the module learns the upstream's limit from its
// headers and its refusals, holds requests until the upstream can take
// them, and sends refused ones again: clients see no 429.
func TestAdaptiveLearnsAndAbsorbs(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  fakellm.Config
	}{
		{"headers", fakellm.Config{RPM: 120, Burst: 10, RateLimitHeaders: true}},
		{"retry-after only", fakellm.Config{RPM: 120, Burst: 10, RetryAfterOnly: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := startFake(t, tc.cfg)
			h := newHarness(t)
			h.loadHandler(`		user {http.request.header.X-User}
		adaptive {
			attempts_header X-Upstream-Attempts
		}`, up)
			rs := h.adaptiveRun(8*time.Second, 5, "gpt-4o")
			var refused, retried int
			for i, r := range rs {
				if r.err != nil {
					t.Fatalf("request %d: %v", i, r.err)
				}
				if r.status != 200 {
					refused++
					t.Logf("request %d: %v after %s", i, r.response, r.elapsed)
				}
				if attempts(r) > 1 {
					retried++
				}
			}
			st := up.Stats()
			t.Logf("%d requests, %d refused to the client, %d retried; upstream: %+v", len(rs), refused, retried, st)
			if refused > len(rs)/100 {
				t.Errorf("%d of %d requests refused to the client", refused, len(rs))
			}
			if st.Limited > st.Total/4 {
				t.Errorf("the upstream refused %d of %d attempts", st.Limited, st.Total)
			}
		})
	}
}

// closedLoop runs workers that each send requests one after another for d.
func (h *harness) closedLoop(workers int, d time.Duration, body func(i int) string) []queued {
	var mu sync.Mutex
	var out []queued
	var wg sync.WaitGroup
	ctx, cancel := context.WithTimeout(context.Background(), d+60*time.Second)
	defer cancel()
	stop := time.Now().Add(d)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stop) {
				r := h.sendBody(ctx, body(w), fmt.Sprint("u", w%3))
				mu.Lock()
				out = append(out, r)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return out
}

// An upstream that says nothing and answers 503 above a concurrency cap (as
// vLLM does) teaches the module its cap: the 503s are absorbed, and few
// reach the upstream at all.
func TestAdaptiveLearnsAConcurrencyCap(t *testing.T) {
	up := startFake(t, fakellm.Config{MaxConcurrent: 3, StreamChunks: 4, ChunkDelay: 25 * time.Millisecond})
	h := newHarness(t)
	h.loadHandler(`		user {http.request.header.X-User}
		adaptive {
			attempts_header X-Upstream-Attempts
		}`, up)
	stream := `{"model":"llama3","stream":true,"messages":[{"role":"user","content":"hi"}]}`
	rs := h.closedLoop(9, 6*time.Second, func(int) string { return stream })
	bad := 0
	for i, r := range rs {
		if r.err != nil {
			t.Fatalf("request %d: %v", i, r.err)
		}
		if r.status != 200 {
			bad++
		}
	}
	st := up.Stats()
	t.Logf("%d requests, %d not 200; upstream: %+v", len(rs), bad, st)
	if bad > 0 {
		t.Errorf("%d requests were not served", bad)
	}
	// Learning costs a handful of refusals at the start (the requests
	// already in flight when the first 503 came), and each probe for a
	// higher cap one more; over a few seconds that is several per cent.
	// bench/adaptive measures the share over a longer run.
	if st.Busy > st.Total/10 {
		t.Errorf("the upstream answered 503 to %d of %d attempts", st.Busy, st.Total)
	}
}

// Client errors are never retried: the upstream's answer goes to the
// client after one attempt.
func TestAdaptiveNeverRetriesClientErrors(t *testing.T) {
	h := newHarness(t)
	h.loadBeforeSite(`		adaptive {
			attempts_header X-Upstream-Attempts
		}`, `	respond "{\"error\":\"no\"}" {header.X-Want-Status}`)
	for _, status := range []string{"400", "401", "403", "404", "422"} {
		r := h.post("/v1/chat/completions", chatBody("gpt-4o"), "X-Want-Status", status)
		if fmt.Sprint(r.status) != status || r.header.Get("X-Upstream-Attempts") != "1" {
			t.Errorf("status %s: got %v, attempts %q", status, r, r.header.Get("X-Upstream-Attempts"))
		}
	}
}

// An upstream that hangs or fails now and then: with attempt_timeout, every
// request gets an answer, in bounded time, and nothing is left hanging.
func TestAdaptiveSurvivesHangsAndFailures(t *testing.T) {
	up := startFake(t, fakellm.Config{FailRate: 0.2, HangRate: 0.2, Seed: 7})
	h := newHarness(t)
	h.loadHandler(`		adaptive {
			attempt_timeout 300ms
			retries 5
			attempts_header X-Upstream-Attempts
		}`, up)
	start := time.Now()
	rs := h.parallel(20, "u")
	served, maxAttempts := 0, 0
	for i, r := range rs {
		if r.err != nil {
			t.Fatalf("request %d: %v", i, r.err)
		}
		if r.status == 200 {
			served++
		} else {
			t.Logf("request %d: %v, attempts %d, after %s", i, r.response, attempts(r), r.elapsed)
		}
		maxAttempts = max(maxAttempts, attempts(r))
	}
	st := up.Stats()
	t.Logf("%d of %d served in %s, at most %d attempts; upstream: %+v", served, len(rs), time.Since(start), maxAttempts, st)
	if served < len(rs)-1 {
		t.Errorf("only %d of %d requests were served", served, len(rs))
	}
	if st.Hung == 0 || st.Failed == 0 {
		t.Errorf("the upstream injected no fault: %+v", st)
	}
	if el := time.Since(start); el > 15*time.Second {
		t.Errorf("took %s", el)
	}
}

// What adaptive mode learned survives a graceful reload: the first request
// after it is already held to the learned limit.
func TestAdaptiveLearnedSurvivesReload(t *testing.T) {
	up := startFake(t, fakellm.Config{RPM: 120, Burst: 10, RateLimitHeaders: true})
	h := newHarness(t)
	cfg := func(extra string) string {
		return h.site("\t\tadaptive\n"+extra, hostPort(up))
	}
	h.load(cfg(""))
	const learned = `"adaptive/requests_per_minute";q=120`
	if r := h.chat("gpt-4o"); r.status != 200 || strings.Contains(r.header.Get("RateLimit-Policy"), learned) {
		t.Fatalf("first request: %v, policy %q (nothing is learned before the first answer)", r, r.header.Get("RateLimit-Policy"))
	}
	if r := h.chat("gpt-4o"); !strings.Contains(r.header.Get("RateLimit-Policy"), learned) {
		t.Fatalf("second request: policy %q, want %s", r.header.Get("RateLimit-Policy"), learned)
	}
	h.load(cfg("\t\tmax_body 1MiB\n"))
	if r := h.chat("gpt-4o"); r.status != 200 || !strings.Contains(r.header.Get("RateLimit-Policy"), learned) {
		t.Fatalf("after the reload: %v, policy %q, want %s", r, r.header.Get("RateLimit-Policy"), learned)
	}
}

// A request whose body the module did not read (a path it does not parse)
// cannot be sent again, so it gets one attempt and the upstream's answer;
// one it did read is retried with the same body.
func TestAdaptiveRetriesOnlyReplayableBodies(t *testing.T) {
	h := newHarness(t)
	h.loadBeforeSite(`		adaptive {
			retries 2
			attempts_header X-Upstream-Attempts
		}`, `	respond "busy" 503`)
	r := h.post("/v1/files", strings.Repeat("x", 1000))
	if r.status != 503 || r.header.Get("X-Upstream-Attempts") != "1" {
		t.Errorf("unparsed body: %v, attempts %q; want the upstream's 503 after one attempt", r, r.header.Get("X-Upstream-Attempts"))
	}
	r = h.chat("gpt-4o")
	if r.status != 503 || r.header.Get("X-Upstream-Attempts") != "3" {
		t.Errorf("chat: %v, attempts %q; want the upstream's 503 after three attempts", r, r.header.Get("X-Upstream-Attempts"))
	}
}
