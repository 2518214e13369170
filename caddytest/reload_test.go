package caddytest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
)

// loadStats counts what concurrent clients saw.
type loadStats struct {
	mu       sync.Mutex
	byStatus map[int]int
	errs     []error
	// afterReload counts responses to requests sent after the last reload
	// returned.
	afterReload int
}

func (s *loadStats) add(status int, err error, after bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.errs = append(s.errs, err)
		return
	}
	s.byStatus[status]++
	if after {
		s.afterReload++
	}
}

// State carries over graceful reloads: the same rule keeps its level, a
// changed limit applies to the existing level, and a removed rule's buckets
// are freed. No request fails while Caddy reloads.
func TestReloadUnderLoad(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	h.extraGlobal = "\tservers {\n\t\tprotocols h1 h2c\n\t}\n"
	cfg := func(limit int, withRule bool, extra string) string {
		block := "\t\trule other {\n\t\t\twhen {\n\t\t\t\tmodels nothing-sends-this\n\t\t\t}\n\t\t\tlimit 1 requests_per_day\n\t\t}\n"
		if withRule {
			block += fmt.Sprintf("\t\trule shared {\n\t\t\tlimit %d requests_per_hour\n\t\t}\n", limit)
		}
		return h.site(block+extra, hostPort(up))
	}
	const p = "shared/requests_per_hour"
	const limit, k = 20, 8

	h.load(cfg(limit, true, ""))
	for i := 0; i < k; i++ {
		r := h.chat("gpt-4o")
		wantStatus(t, "before reload", r, 200)
		wantRemaining(t, "before reload", r, map[string]int64{p: int64(limit - 1 - i)})
	}

	// The load clients speak HTTP/2 without TLS (h2c). Over HTTP/1.1 a
	// graceful reload loses requests below the module: the old server closes
	// idle keep-alive connections under a client about to use them, and
	// connections queued on the old SO_REUSEPORT socket are reset when it
	// closes. HTTP/2's GOAWAY tells the client which requests the old server
	// never took, and Go's transport resends exactly those; a request that
	// fails inside a handler (a panic) is still an error. A dial that is
	// reset is retried: nothing was sent on it.
	var dialRetries atomic.Int64
	protocols := new(http.Protocols)
	protocols.SetUnencryptedHTTP2(true)
	loadClient := &http.Client{
		Timeout: 20 * time.Second,
		Transport: &http.Transport{
			Protocols: protocols,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				d := net.Dialer{Timeout: 5 * time.Second}
				var err error
				for attempt := 0; attempt < 10; attempt++ {
					var c net.Conn
					if c, err = d.DialContext(ctx, network, addr); err == nil {
						return c, nil
					}
					if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.ECONNREFUSED) {
						return nil, err
					}
					dialRetries.Add(1)
				}
				return nil, err
			},
		},
	}
	// The checks between the reloads below go through the same client, for
	// the same reason.
	h.client = loadClient
	stats := &loadStats{byStatus: map[int]int{}}
	var reloadDone bool
	var reloadMu sync.Mutex
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	const workers = 4
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				reloadMu.Lock()
				after := reloadDone
				reloadMu.Unlock()
				req, _ := http.NewRequestWithContext(ctx, http.MethodPost, h.base+"/v1/chat/completions", strings.NewReader(chatBody("gpt-4o")))
				req.Header.Set("Content-Type", "application/json")
				res, err := loadClient.Do(req)
				if err == nil {
					_, err = io.Copy(io.Discard, res.Body)
					res.Body.Close()
				}
				if err != nil && errors.Is(ctx.Err(), context.Canceled) {
					return
				}
				if err == nil && res.ProtoMajor != 2 {
					err = fmt.Errorf("response over %s, want HTTP/2", res.Proto)
				}
				if err == nil {
					stats.add(res.StatusCode, nil, after)
				} else {
					stats.add(0, err, after)
				}
			}
		}()
	}
	// Reload the same rule (forced, as the admin API's /load does) twice
	// while the workers run, the second time with an unrelated change.
	waitSome := func(n int) {
		t.Helper()
		wctx, wcancel := context.WithTimeout(ctx, 20*time.Second)
		defer wcancel()
		start := stats.total()
		if !waitFor(wctx, func() bool { return stats.total() >= start+n }) {
			t.Fatalf("workers made no progress: %d responses", stats.total())
		}
	}
	waitSome(4)
	h.load(cfg(limit, true, ""))
	waitSome(4)
	h.load(cfg(limit, true, "\t\tzone \"\"\n"))
	reloadMu.Lock()
	reloadDone = true
	reloadMu.Unlock()
	// Keep going until every worker has surely crossed the limit after the
	// last reload.
	wctx, wcancel := context.WithTimeout(ctx, 20*time.Second)
	ok := waitFor(wctx, func() bool {
		stats.mu.Lock()
		defer stats.mu.Unlock()
		return stats.afterReload >= 4*workers && stats.byStatus[200]+stats.byStatus[429] >= limit
	})
	wcancel()
	cancel()
	wg.Wait()
	if !ok {
		t.Fatalf("load did not finish: %+v", stats.byStatus)
	}

	stats.mu.Lock()
	if len(stats.errs) > 0 {
		t.Errorf("%d transport errors during reload, first: %v", len(stats.errs), stats.errs[0])
	}
	for st, n := range stats.byStatus {
		if st != 200 && st != 429 {
			t.Errorf("%d responses with status %d during reload", n, st)
		}
	}
	// Exactly the remaining limit-k were admitted across the reloads: the
	// bucket's level carried over (a reset bucket would admit more).
	if got := stats.byStatus[200]; got != limit-k {
		t.Errorf("admitted %d requests across the reloads, want exactly %d (limit %d, %d before)", got, limit-k, limit, k)
	}
	t.Logf("under load: %v; dials retried: %d", stats.byStatus, dialRetries.Load())
	if got := len(up.Requests()); got != limit {
		t.Errorf("upstream saw %d requests in all, want %d", got, limit)
	}
	stats.mu.Unlock()
	h.closeIdle()
	wantOpenAI429(t, "after load", h.chat("gpt-4o"), "shared", "requests_per_hour")

	// A reload that doubles the limit applies it to the level: the bucket
	// held 20 of 20, that is 20 of 40 now, so exactly 20 more pass.
	h.load(cfg(2*limit, true, ""))
	for i := 0; i < limit; i++ {
		r := h.chat("gpt-4o")
		wantStatus(t, fmt.Sprintf("after raising the limit #%d", i+1), r, 200)
		wantRemaining(t, "after raising the limit", r, map[string]int64{p: int64(limit - 1 - i)})
		if i == 0 {
			if pol, _ := parsePolicy(t, r.header); pol[p] != (policyItem{q: 2 * limit, w: 3600}) {
				t.Errorf("policy after reload %+v", pol[p])
			}
		}
	}
	wantOpenAI429(t, "after raising the limit", h.chat("gpt-4o"), "shared", "requests_per_hour")

	// Halving it again: 40 of 40 is 20 of 20, still full.
	h.load(cfg(limit, true, ""))
	r := h.chat("gpt-4o")
	wantOpenAI429(t, "after lowering the limit", r, "shared", "requests_per_hour")
	wantRemaining(t, "after lowering the limit", r, map[string]int64{p: 0})

	// Removing the rule lets everything through and frees its buckets...
	h.load(cfg(limit, false, ""))
	for i := 0; i < 3; i++ {
		r := h.chat("gpt-4o")
		wantStatus(t, "rule removed", r, 200)
		wantNoRateLimitHeaders(t, "rule removed", r)
	}
	// ...so that putting it back starts from a full bucket.
	h.load(cfg(limit, true, ""))
	r = h.chat("gpt-4o")
	wantStatus(t, "rule restored", r, 200)
	wantRemaining(t, "rule restored", r, map[string]int64{p: limit - 1})
}

func (s *loadStats) total() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := len(s.errs)
	for _, c := range s.byStatus {
		n += c
	}
	return n
}

// A request that is in the middle of its body when Caddy reloads is
// finished by the old configuration's handler, which Caddy has already
// cleaned up by then (a reload does not wait for old requests). It must
// still be answered normally.
//
// Expect: 100-continue makes the server say when the handler starts reading
// the body, so the reload happens exactly while the handler waits for it.
func TestReloadWithRequestInFlight(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	cfg := func(limit int) string {
		return h.site(fmt.Sprintf("\t\trule inflight {\n\t\t\tlimit %d requests_per_hour\n\t\t}\n", limit), hostPort(up))
	}
	h.load(cfg(10))

	conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", h.port), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(15 * time.Second)); err != nil {
		t.Fatal(err)
	}
	body := chatBody("gpt-4o")
	fmt.Fprintf(conn, "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"+
		"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n", len(body))
	br := bufio.NewReader(conn)
	line, err := br.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "HTTP/1.1 100 ") {
		t.Fatalf("waiting for 100 Continue: %q, %v", line, err)
	}
	if blank, err := br.ReadString('\n'); err != nil || blank != "\r\n" {
		t.Fatalf("after 100 Continue: %q, %v", blank, err)
	}

	// The handler is now reading the body. Reload, with a changed limit so
	// that the old handler's rules are really replaced.
	h.load(cfg(20))

	if _, err := io.WriteString(conn, body); err != nil {
		t.Fatalf("sending the body after the reload: %v", err)
	}
	// The upstream's own 100 Continue is relayed too: skip informational
	// responses to reach the final one.
	res, err := http.ReadResponse(br, nil)
	for err == nil && res.StatusCode < 200 {
		res, err = http.ReadResponse(br, nil)
	}
	if err != nil {
		t.Fatalf("no response to the request in flight during the reload: %v", err)
	}
	b, _ := io.ReadAll(res.Body)
	res.Body.Close()
	r := response{status: res.StatusCode, header: res.Header, body: b}
	wantStatus(t, "request in flight", r, http.StatusOK)
	wantRemaining(t, "request in flight", r, map[string]int64{"inflight/requests_per_hour": 9})

	// And the bucket the old handler charged is the one the new one uses.
	r = h.chat("gpt-4o")
	wantStatus(t, "after the reload", r, http.StatusOK)
	wantRemaining(t, "after the reload", r, map[string]int64{"inflight/requests_per_hour": 20 - 2})
}
