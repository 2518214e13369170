package caddytest

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
	"github.com/llmratelimit/caddy-llm-ratelimit/internal/redistest"
)

// TestRedisOutageReleasesSlots: a request holding the only concurrency slot
// ends while Redis does not answer (paused, so that it keeps its data). Its
// release cannot reach Redis then; it is kept and applied when Redis
// answers again, so the slot comes back instead of leaking until its key
// expires an hour later.
func TestRedisOutageReleasesSlots(t *testing.T) {
	rs := redistest.Start(t)
	up := startFake(t, fakellm.Config{StreamChunks: 3, ChunkDelay: 300 * time.Millisecond})
	h := newHarness(t)
	h.load(h.site(fmt.Sprintf(`		store redis {
			address %s
			key_prefix slots
			fail_mode closed
		}
		rule one {
			limit 1 concurrent_requests
		}`, rs.Addr()), hostPort(up)))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Redis stops answering for 3 s; the stream (about 1 s) ends meanwhile.
	done, _ := pauseRedisMidStream(ctx, t, h, up, rs, 3*time.Second)
	if r := <-done; r.status != http.StatusOK || !strings.Contains(string(r.body), "[DONE]") {
		t.Fatalf("the stream: %v", r)
	}
	// Requests get 503s until Redis answers again; then one probes it, the
	// kept release follows, and within a few seconds a request gets the
	// slot.
	var last response
	if !waitFor(ctx, func() bool {
		last = h.chat("gpt-4o")
		return last.status == http.StatusOK
	}) {
		t.Fatalf("no request admitted after Redis came back (last: %v): the slot leaked", last)
	}
}

// TestRedisTLS: the store reaches a Redis that speaks only TLS, trusting
// the authority in ca_file, and a server name it does not match is
// refused (fail_mode closed answers 503).
func TestRedisTLS(t *testing.T) {
	rs, caFile := redistest.StartTLS(t)
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	load := func(serverName string) {
		h.load(h.site(fmt.Sprintf(`		store redis {
			address %s
			key_prefix tls
			# A first TLS handshake under the race detector takes longer
			# than the default 50 ms.
			timeout 2s
			fail_mode closed
			tls {
				ca_file %s
				server_name %s
			}
		}
		rule r {
			limit 2 requests_per_minute
		}`, rs.Addr(), caFile, serverName), hostPort(up)))
	}
	load("localhost")
	wantStatus(t, "first", h.chat("gpt-4o"), http.StatusOK)
	wantStatus(t, "second", h.chat("gpt-4o"), http.StatusOK)
	wantStatus(t, "third", h.chat("gpt-4o"), http.StatusTooManyRequests)
	keys, err := rs.Client(t).Keys(context.Background(), "{tls}*").Result()
	if err != nil || len(keys) == 0 {
		t.Fatalf("no bucket under {tls} in Redis (%v)", err)
	}
	load("not-the-server")
	wantStatus(t, "wrong server name", h.chat("gpt-4o"), http.StatusServiceUnavailable)
}

// TestRedisSettlementOffTheCriticalPath: a response is not held for the
// settlement's round trip to Redis. The stream below ends while Redis does
// not answer; the client still gets the whole response at once (Go's server
// sends the end of a response only when the handler returns, so a
// settlement made inline would hold it until Redis answered), and the
// settlement reaches Redis once it answers again.
func TestRedisSettlementOffTheCriticalPath(t *testing.T) {
	rs := redistest.Start(t)
	up := startFake(t, fakellm.Config{StreamChunks: 3, ChunkDelay: 200 * time.Millisecond})
	h := newHarness(t)
	h.load(h.site(fmt.Sprintf(`		store redis {
			address %s
			key_prefix settle
			timeout 5s
			fail_mode closed
		}
		rule tokens {
			limit 100000 tokens_per_minute
		}`, rs.Addr()), hostPort(up)))
	const policy = "tokens/tokens_per_minute"
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	const pause = 3 * time.Second
	done, paused := pauseRedisMidStream(ctx, t, h, up, rs, pause)
	first := <-done
	if took := time.Since(paused); took > pause*2/3 {
		t.Errorf("the response ended %s after Redis paused for %s: it waited for the settlement", took.Round(time.Millisecond), pause)
	}
	if first.status != http.StatusOK || !strings.Contains(string(first.body), "[DONE]") {
		t.Fatalf("the stream: %v", first)
	}
	charged := 100000 - remaining(t, first, policy) // the first request's estimate
	// Once Redis answers, the settlement (the stream used far fewer tokens
	// than the estimate's 1024 completion tokens) gives most of the charge
	// back.
	var next response
	if !waitFor(ctx, func() bool {
		next = h.chat("gpt-4o")
		return next.status == http.StatusOK && 100000-remaining(t, next, policy) < 2*charged-500
	}) {
		t.Fatalf("the settlement never reached Redis: charged %d, then %v", charged, next)
	}
}

// pauseRedisMidStream sends a streamed chat request and, once the upstream
// has it, pauses Redis for d. It returns the stream's response, to come,
// and when the pause began.
func pauseRedisMidStream(ctx context.Context, t *testing.T, h *harness, up *fakellm.Server, rs *redistest.Server, d time.Duration) (<-chan response, time.Time) {
	t.Helper()
	stream := `{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}`
	done := make(chan response, 1)
	go func() { done <- h.post("/v1/chat/completions", stream) }()
	if !waitFor(ctx, func() bool { return len(up.Requests()) == 1 }) {
		t.Fatal("the streaming request did not reach the upstream")
	}
	paused := time.Now()
	if err := rs.Client(t).ClientPause(ctx, d).Err(); err != nil {
		t.Fatal(err)
	}
	return done, paused
}
