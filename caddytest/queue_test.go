package caddytest

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
)

// queued is one response and how long it took.
type queued struct {
	response
	err     error
	elapsed time.Duration
	user    string
}

// send posts a gpt-4o chat completion as user without failing the test
// from a goroutine; errors come back in the result.
func (h *harness) send(ctx context.Context, user string, hdr ...string) queued {
	return h.sendModelCtx(ctx, "gpt-4o", user, hdr...)
}

// sendModel is send for another model.
func (h *harness) sendModel(model, user string, hdr ...string) queued {
	return h.sendModelCtx(context.Background(), model, user, hdr...)
}

func (h *harness) sendModelCtx(ctx context.Context, model, user string, hdr ...string) queued {
	return h.sendBody(ctx, chatBody(model), user, hdr...)
}

// sendBody posts a chat completion body as user.
func (h *harness) sendBody(ctx context.Context, body, user string, hdr ...string) queued {
	start := time.Now()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.base+"/v1/chat/completions", strings.NewReader(body))
	if err != nil {
		return queued{err: err}
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-User", user)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	res, err := h.client.Do(req)
	if err != nil {
		return queued{err: err, elapsed: time.Since(start), user: user}
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	return queued{response: response{status: res.StatusCode, header: res.Header, body: b}, err: err, elapsed: time.Since(start), user: user}
}

// parallel sends n requests at once as user and returns their results.
func (h *harness) parallel(n int, user string, hdr ...string) []queued {
	return parallelDo(n, func(int) queued { return h.send(context.Background(), user, hdr...) })
}

// parallelDo runs send(0) to send(n-1) at once and returns their results.
func parallelDo(n int, send func(i int) queued) []queued {
	out := make([]queued, n)
	var wg sync.WaitGroup
	for i := range out {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i] = send(i)
		}()
	}
	wg.Wait()
	return out
}

func queueWait(r queued) int64 {
	v, err := strconv.ParseInt(r.header.Get("X-Queue-Wait-Ms"), 10, 64)
	if err != nil {
		return -1
	}
	return v
}

// wantServed checks that a request sent without the harness (send,
// parallel) got through and was answered 200.
func wantServed(t testing.TB, what string, r queued) {
	t.Helper()
	if r.err != nil || r.status != 200 {
		t.Fatalf("%s: %v %v", what, r.err, r.response)
	}
}

// queueConfig is the handler block of most queue tests: users named by
// X-User, a queue that waits up to maxWait, and one rule with its limit.
func queueConfig(maxWait, rule, limit string) string {
	return fmt.Sprintf(`		user {http.request.header.X-User}
		queue {
			max_wait %s
		}
		rule %s {
			limit %s
		}`, maxWait, rule, limit)
}

// Requests a bucket cannot take at once wait for their turn, one service
// interval apart, and say how long they waited; none is refused.
func TestQueueWaitsInsteadOfRefusing(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	h.loadHandler(queueConfig("10s", "r", "10 requests_per_second burst 1"), up)
	start := time.Now()
	rs := h.parallel(6, "alice")
	elapsed := time.Since(start)
	var waits []int64
	for i, r := range rs {
		wantServed(t, fmt.Sprintf("request %d", i), r)
		if w := queueWait(r); w > 0 {
			waits = append(waits, w)
			if d := r.header.Get("X-Queue-Depth"); d == "" {
				t.Errorf("request %d waited but has no X-Queue-Depth", i)
			}
		}
	}
	// One went through at once; five waited 100, 200, ... 500 ms (give
	// or take the time the requests took to arrive).
	if len(waits) < 5 {
		t.Fatalf("%d requests report a wait, want 5: %v", len(waits), waits)
	}
	sort.Slice(waits, func(i, j int) bool { return waits[i] < waits[j] })
	if waits[len(waits)-1] < 350 || elapsed < 450*time.Millisecond {
		t.Fatalf("waits %v ms in %s: the bucket's pace was not kept", waits, elapsed)
	}
	if n := len(up.Requests()); n != 6 {
		t.Fatalf("upstream saw %d requests, want 6", n)
	}
}

// A request whose turn would come after max_wait is refused at once, with
// the predicted wait as Retry-After.
func TestQueuePredictiveRefusal(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	h.loadHandler(queueConfig("1s", "r", "1 requests_per_minute"), up)
	wantStatus(t, "first", h.chat("gpt-4o", "X-User", "a"), 200)
	start := time.Now()
	r := h.chat("gpt-4o", "X-User", "a")
	if el := time.Since(start); el > 500*time.Millisecond {
		t.Fatalf("refusal took %s: it should not wait", el)
	}
	e := wantOpenAI429(t, "second", r, "r", "requests")
	if !strings.Contains(e.Error.Message, "longer than the 1s it may wait") {
		t.Errorf("message %q does not explain the queue", e.Error.Message)
	}
	if secs, _ := wantRetryAfter(t, "second", r); secs < 55 || secs > 60 {
		t.Errorf("Retry-After %d, want about 60", secs)
	}
	if r.header.Get("X-Queue-Depth") != "0" || r.header.Get("X-Queue-Wait-Ms") != "0" {
		t.Errorf("queue headers %q %q", r.header.Get("X-Queue-Depth"), r.header.Get("X-Queue-Wait-Ms"))
	}
}

// A light user behind a flooding one waits about one service interval, not
// the flood's backlog, and is never refused.
func TestQueueFairnessThroughCaddy(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	h.loadHandler(queueConfig("20s", "shared", "20 requests_per_second burst 1"), up)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	stop := make(chan struct{})
	var heavy sync.WaitGroup
	var heavyOK, heavyOther sync.Map
	for w := 0; w < 12; w++ {
		heavy.Add(1)
		go func() {
			defer heavy.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				r := h.send(ctx, "heavy")
				if r.err == nil && r.status == 200 {
					heavyOK.Store(time.Now(), true)
				} else {
					heavyOther.Store(time.Now(), r)
				}
			}
		}()
	}
	// Let the flood build a backlog: 12 waiting at 50 ms each is 600 ms.
	time.Sleep(300 * time.Millisecond)
	var light []queued
	for i := 0; i < 8; i++ {
		light = append(light, h.send(ctx, "light"))
		time.Sleep(100 * time.Millisecond)
	}
	close(stop)
	heavy.Wait()
	for i, r := range light {
		wantServed(t, fmt.Sprintf("light request %d", i), r)
		// One interval is 50 ms; allow for the request in service and the
		// machine's noise, but far below the flood's 600 ms backlog.
		if r.elapsed > 250*time.Millisecond {
			t.Errorf("light request %d took %s (waited %d ms)", i, r.elapsed, queueWait(r))
		}
	}
	n := 0
	heavyOK.Range(func(any, any) bool { n++; return true })
	heavyOther.Range(func(k, v any) bool { t.Errorf("heavy request: %+v", v); return false })
	if n < 10 {
		t.Errorf("heavy user got %d requests through", n)
	}
}

// With a concurrency limit equal to the upstream's own, the upstream never
// answers 503, and every request is served.
func TestQueueConcurrencyLimit(t *testing.T) {
	up := startFake(t, fakellm.Config{MaxConcurrent: 2, StreamChunks: 3, ChunkDelay: 20 * time.Millisecond})
	h := newHarness(t)
	h.loadHandler(queueConfig("20s", "gpu", "2 concurrent_requests"), up)
	for round := 0; round < 2; round++ {
		rs := h.parallel(10, fmt.Sprint("u", round))
		for i, r := range rs {
			wantServed(t, fmt.Sprintf("round %d request %d", round, i), r)
		}
	}
	if total, limited := up.Counts(); limited != 0 || total != 20 {
		t.Fatalf("upstream saw %d requests and refused %d, want 20 and 0", total, limited)
	}
}

// A client that leaves while waiting gives its place back at once: the next
// request is served when the canceled one would have been, and the canceled
// one never reaches the upstream.
func TestQueueCancelGivesBackTheSlot(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	h.loadHandler(queueConfig("10s", "r", "2 requests_per_second burst 1"), up)
	wantStatus(t, "first", h.chat("gpt-4o", "X-User", "a"), 200)
	start := time.Now()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan queued, 1)
	go func() { done <- h.send(ctx, "b") }()
	time.Sleep(100 * time.Millisecond)
	cancel()
	if r := <-done; r.err == nil {
		t.Fatalf("canceled request got %v", r.response)
	}
	wantServed(t, "third", h.send(context.Background(), "c"))
	// Its turn is the canceled one's: 500 ms after the first, not 1 s.
	if el := time.Since(start); el > 800*time.Millisecond {
		t.Errorf("third request served %s after the first, want about 500ms", el)
	}
	if n := len(up.Requests()); n != 2 {
		t.Fatalf("upstream saw %d requests, want 2", n)
	}
}

// A concurrency slot held by a stream is released when the client leaves in
// the middle of it.
func TestQueueSlotReleasedOnDisconnect(t *testing.T) {
	up := startFake(t, fakellm.Config{StreamChunks: 50, ChunkDelay: 50 * time.Millisecond})
	h := newHarness(t)
	h.loadHandler(queueConfig("10s", "gpu", "1 concurrent_requests"), up)
	ctx, cancel := context.WithCancel(context.Background())
	res, err := h.openStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	if _, err := res.Body.Read(buf); err != nil {
		t.Fatal(err)
	}
	cancel()
	res.Body.Close()
	start := time.Now()
	wantServed(t, "after the disconnect", h.send(context.Background(), "next"))
	if el := time.Since(start); el > 2*time.Second {
		t.Errorf("the slot came back after %s", el)
	}
}

// Requests waiting in the queue during a graceful reload are neither dropped
// nor duplicated: each is answered once and reaches the upstream once.
func TestQueueSurvivesReload(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	cfg := func(extra string) string {
		return h.site(queueConfig("20s", "r", "10 requests_per_second burst 1")+extra, hostPort(up))
	}
	h.load(cfg(""))
	const n = 12
	results := make(chan queued, n)
	for i := 0; i < n; i++ {
		go func() { results <- h.send(context.Background(), fmt.Sprint("u", i)) }()
	}
	// The queue holds most of them for up to 1.2 s; reload in the middle.
	time.Sleep(300 * time.Millisecond)
	h.load(cfg("\n\t\tzone z"))
	h.load(cfg(""))
	for i := 0; i < n; i++ {
		select {
		case r := <-results:
			wantServed(t, "request", r)
		case <-time.After(15 * time.Second):
			t.Fatal("a waiting request was never answered")
		}
	}
	if got := len(up.Requests()); got != n {
		t.Fatalf("upstream saw %d requests, want %d", got, n)
	}
}
