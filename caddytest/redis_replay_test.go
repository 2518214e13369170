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
	stream := `{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}`

	done := make(chan response, 1)
	go func() { done <- h.post("/v1/chat/completions", stream) }()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if !waitFor(ctx, func() bool { return len(up.Requests()) == 1 }) {
		t.Fatal("the streaming request did not reach the upstream")
	}
	// Redis stops answering for 3 s; the stream (about 1 s) ends meanwhile.
	if err := rs.Client(t).ClientPause(ctx, 3*time.Second).Err(); err != nil {
		t.Fatal(err)
	}
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
