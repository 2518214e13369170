package fakellm

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// rateLimitHeaders lists the provider rate-limit headers in h.
func rateLimitHeaders(h http.Header) []string {
	var out []string
	for k := range h {
		lk := strings.ToLower(k)
		if strings.HasPrefix(lk, "x-ratelimit-") || strings.HasPrefix(lk, "anthropic-ratelimit-") {
			out = append(out, lk)
		}
	}
	slices.Sort(out)
	return out
}

// hasRetryInfo reports whether a Gemini error body carries RetryInfo.
func hasRetryInfo(t *testing.T, b []byte) bool {
	t.Helper()
	e := decode[struct {
		Error struct{ Details []map[string]string }
	}](t, b).Error
	for _, d := range e.Details {
		if d["@type"] == "type.googleapis.com/google.rpc.RetryInfo" && d["retryDelay"] == "1s" {
			return true
		}
	}
	return false
}

func TestHeaderOptions(t *testing.T) {
	options := []struct {
		name string
		cfg  Config
		// rateLimit: provider headers on 200s and 429s of dialects that
		// have them; retry: retry-after headers on 429s; retryInfo:
		// RetryInfo in Gemini 429 bodies.
		rateLimit, retry, retryInfo bool
	}{
		{"default", Config{}, false, false, true},
		{"RateLimitHeaders", Config{RateLimitHeaders: true}, true, true, true},
		{"RateLimitHeaders+NoRetryAfter", Config{RateLimitHeaders: true, NoRetryAfter: true}, true, false, false},
		{"RetryAfterOnly", Config{RetryAfterOnly: true}, false, true, true},
		{"RetryAfterOnly+RateLimitHeaders", Config{RetryAfterOnly: true, RateLimitHeaders: true}, false, true, true},
		{"NoRetryAfter", Config{NoRetryAfter: true}, false, false, false},
	}
	dialects := []struct {
		name, path string
		headers    []string // the rate-limit headers it sends, if any
	}{
		{"openai", "/v1/chat/completions", []string{
			"x-ratelimit-limit-requests", "x-ratelimit-limit-tokens",
			"x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens",
			"x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"}},
		{"azure", "/openai/deployments/d/chat/completions?api-version=1", []string{
			"x-ratelimit-limit-requests", "x-ratelimit-limit-tokens",
			"x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens",
			"x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"}},
		{"anthropic", "/v1/messages", []string{
			"anthropic-ratelimit-requests-limit", "anthropic-ratelimit-requests-remaining",
			"anthropic-ratelimit-requests-reset", "anthropic-ratelimit-tokens-limit",
			"anthropic-ratelimit-tokens-remaining", "anthropic-ratelimit-tokens-reset"}},
		{"gemini", "/v1beta/models/g:generateContent", nil},
		{"ollama", "/api/chat", nil},
	}
	for _, o := range options {
		t.Run(o.name, func(t *testing.T) {
			clock := newClock()
			cfg := o.cfg
			cfg.RPM, cfg.Burst, cfg.TPM, cfg.Now = 60, 1, 6000, clock.Now
			s := start(t, cfg)
			for _, d := range dialects {
				s.Reset()
				var want []string
				if o.rateLimit {
					want = d.headers
				}
				code, h, b := post(t, s, d.path, `{"stream":false}`)
				if code != 200 {
					t.Fatalf("%s: first request %d %s", d.name, code, b)
				}
				if got := rateLimitHeaders(h); !slices.Equal(got, want) {
					t.Errorf("%s 200: rate-limit headers %v, want %v", d.name, got, want)
				}
				if h.Get("retry-after") != "" || h.Get("retry-after-ms") != "" {
					t.Errorf("%s 200: retry headers %v", d.name, h)
				}

				code, h, b = post(t, s, d.path, `{"stream":false}`)
				if code != 429 {
					t.Fatalf("%s: second request %d %s", d.name, code, b)
				}
				if got := rateLimitHeaders(h); !slices.Equal(got, want) {
					t.Errorf("%s 429: rate-limit headers %v, want %v", d.name, got, want)
				}
				ra, ram := h.Get("retry-after"), h.Get("retry-after-ms")
				if o.retry && (ra != "1" || ram != "1000") || !o.retry && (ra != "" || ram != "") {
					t.Errorf("%s 429: retry-after %q, retry-after-ms %q, want them: %v", d.name, ra, ram, o.retry)
				}
				if d.name == "gemini" && hasRetryInfo(t, b) != o.retryInfo {
					t.Errorf("gemini 429 body %s, want RetryInfo: %v", b, o.retryInfo)
				}
			}
		})
	}
}

// TestRetryAfterFractional checks that retry-after rounds up to whole
// seconds under RetryAfterOnly, as it does under RateLimitHeaders.
func TestRetryAfterFractional(t *testing.T) {
	clock := newClock()
	s := start(t, Config{RPM: 40, Burst: 1, Now: clock.Now, RetryAfterOnly: true}) // 1.5s a request
	post(t, s, "/v1/messages", `{}`)
	code, h, _ := post(t, s, "/v1/messages", `{}`)
	if code != 429 || h.Get("retry-after") != "2" || h.Get("retry-after-ms") != "1500" || len(rateLimitHeaders(h)) != 0 {
		t.Fatalf("%d %v", code, h)
	}
}

// holdStream starts a stream that stays in flight until the test ends.
func holdStream(t *testing.T, s *Server) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	resp := do(t, ctx, http.MethodPost, s.URL+"/v1/chat/completions", `{"model":"m","stream":true}`)
	t.Cleanup(func() {
		cancel()
		resp.Body.Close()
		waitFor(t, "in-flight requests to end", func() bool { return s.InFlight() == 0 })
	})
	if _, err := readEvent(bufio.NewReader(resp.Body)); err != nil {
		t.Fatal(err)
	}
}

// waitFor polls cond for up to 10 seconds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestBusyHeaders(t *testing.T) {
	for _, tc := range []struct {
		name  string
		cfg   Config
		retry bool
	}{
		{"default", Config{}, false},
		{"RateLimitHeaders", Config{RateLimitHeaders: true}, false},
		{"RetryAfterOnly", Config{RetryAfterOnly: true}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			cfg.RPM, cfg.MaxConcurrent, cfg.StreamChunks, cfg.ChunkDelay = 6000, 1, 2, time.Hour
			s := start(t, cfg)
			holdStream(t, s)
			for _, path := range []string{"/v1/chat/completions", "/v1/messages", "/v1beta/models/g:generateContent"} {
				code, h, b := post(t, s, path, `{}`)
				if code != 503 || len(rateLimitHeaders(h)) != 0 {
					t.Fatalf("%s: %d %v %s", path, code, h, b)
				}
				ra, ram := h.Get("retry-after"), h.Get("retry-after-ms")
				if tc.retry && (ra != "1" || ram != "1000") || !tc.retry && (ra != "" || ram != "") {
					t.Fatalf("%s: retry-after %q, retry-after-ms %q", path, ra, ram)
				}
			}
			if st := s.Stats(); st.Busy != 3 || st.Total != 4 || st.Limited != 0 {
				t.Fatalf("Stats %+v", st)
			}
		})
	}
}

func TestSetLimitsHalving(t *testing.T) {
	clock := newClock()
	s := start(t, Config{RPM: 600, Burst: 10, TPM: 6000, PromptTokens: 90, Now: clock.Now, RateLimitHeaders: true})
	chat := func() (int, http.Header) {
		code, h, _ := post(t, s, "/v1/chat/completions", `{}`)
		return code, h
	}
	// Eight of ten requests spent, at a standstill clock.
	for i := range 8 {
		if code, h := chat(); code != 200 || h.Get("x-ratelimit-remaining-requests") != fmt.Sprint(9-i) {
			t.Fatalf("request %d: %d %v", i, code, h)
		}
	}
	// Halved: the two left stay two (no refill to the new burst of 5),
	// and the token bucket, at 5200, is clamped to its new capacity.
	s.SetLimits(300, 5, 3000)
	for i, want := range []string{"1", "0"} {
		code, h := chat()
		if code != 200 || h.Get("x-ratelimit-remaining-requests") != want ||
			h.Get("x-ratelimit-limit-requests") != "300" || h.Get("x-ratelimit-limit-tokens") != "3000" ||
			h.Get("x-ratelimit-remaining-tokens") != fmt.Sprint(3000-100*(i+1)) {
			t.Fatalf("after halving, request %d: %d %v", i, code, h)
		}
	}
	// Refills now at the new rate, 5 a second: 200ms a request, and the
	// bucket is full again 1s after it emptied.
	code, h := chat()
	if code != 429 || h.Get("retry-after-ms") != "200" || h.Get("x-ratelimit-reset-requests") != "1s" {
		t.Fatalf("after the halved burst: %d %v", code, h)
	}
	clock.Advance(200 * time.Millisecond)
	if code, h := chat(); code != 200 || h.Get("x-ratelimit-remaining-requests") != "0" {
		t.Fatalf("after 200ms: %d %v", code, h)
	}
	if code, _ := chat(); code != 429 {
		t.Fatalf("200ms gave more than one request: %d", code)
	}
	// The bucket never holds more than the new burst.
	clock.Advance(time.Hour)
	for i := range 6 {
		want := 200
		if i == 5 {
			want = 429
		}
		if code, _ := chat(); code != want {
			t.Fatalf("after a long wait, request %d: %d, want %d", i, code, want)
		}
	}

	// Anthropic's headers follow the new limits as well.
	clock.Advance(time.Hour)
	s.SetLimits(60, 2, 0)
	_, h, _ = post(t, s, "/v1/messages", `{}`)
	if h.Get("anthropic-ratelimit-requests-limit") != "60" || h.Get("anthropic-ratelimit-requests-remaining") != "1" ||
		h.Get("anthropic-ratelimit-tokens-limit") != "" {
		t.Fatalf("anthropic after SetLimits(60, 2, 0): %v", h)
	}

	// Lifting the limits removes them and their headers; imposing them
	// again starts with a full bucket.
	s.SetLimits(0, 0, 0)
	for range 20 {
		if code, h := chat(); code != 200 || len(rateLimitHeaders(h)) != 0 {
			t.Fatalf("unlimited: %d %v", code, h)
		}
	}
	s.SetLimits(120, 0, 0) // default burst 2
	for i, want := range []int{200, 200, 429} {
		if code, _ := chat(); code != want {
			t.Fatalf("re-imposed, request %d: %d, want %d", i, code, want)
		}
	}
	// Reset refills to the current limits, not the configured ones.
	s.Reset()
	for i, want := range []int{200, 200, 429} {
		if code, h := chat(); code != want || h.Get("x-ratelimit-limit-requests") != "120" {
			t.Fatalf("after Reset, request %d: %d, want %d", i, code, want)
		}
	}
}

func TestSetLimitsRaise(t *testing.T) {
	clock := newClock()
	s := start(t, Config{RPM: 60, Burst: 2, Now: clock.Now, RateLimitHeaders: true})
	post(t, s, "/v1/chat/completions", `{}`)
	// Doubling keeps the one token left; the new rate fills the rest.
	s.SetLimits(120, 4, 0)
	if code, h, _ := post(t, s, "/v1/chat/completions", `{}`); code != 200 || h.Get("x-ratelimit-remaining-requests") != "0" {
		t.Fatalf("after raising: %d %v", code, h)
	}
	clock.Advance(time.Second) // two tokens at 2 a second
	for i, want := range []int{200, 200, 429} {
		if code, _, _ := post(t, s, "/v1/chat/completions", `{}`); code != want {
			t.Fatalf("request %d: %d, want %d", i, code, want)
		}
	}
	// A bucket never used keeps starting full, at its new capacity.
	fresh := start(t, Config{RPM: 60, Burst: 1, Now: clock.Now})
	fresh.SetLimits(60, 3, 0)
	for i, want := range []int{200, 200, 200, 429} {
		if code, _, _ := post(t, fresh, "/v1/chat/completions", `{}`); code != want {
			t.Fatalf("fresh request %d: %d, want %d", i, code, want)
		}
	}
}

// TestSetLimitsConcurrent changes limits under load, for the race
// detector.
func TestSetLimitsConcurrent(t *testing.T) {
	s := start(t, Config{RPM: 6000, TPM: 600000, RateLimitHeaders: true, MaxConcurrent: 8})
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 8 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				resp, err := http.Post(s.URL+"/v1/chat/completions", "application/json", strings.NewReader(`{}`))
				if err != nil {
					t.Error(err)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if code := resp.StatusCode; code != 200 && code != 429 && code != 503 {
					t.Errorf("status %d", code)
					return
				}
			}
		})
	}
	for i := range 200 {
		s.SetLimits(6000>>(i%4), i%3, 600000>>(i%5))
		s.SetMaxConcurrent(i % 5)
	}
	close(stop)
	wg.Wait()
	st := s.Stats()
	if total, _ := s.Counts(); st.Total != total || st.OK+st.Limited+st.Busy != st.Total {
		t.Fatalf("Stats %+v, total %d", st, total)
	}
}

func TestSetMaxConcurrent(t *testing.T) {
	s := start(t, Config{StreamChunks: 2, ChunkDelay: time.Hour})
	holdStream(t, s)
	s.SetMaxConcurrent(1)
	if code, _, b := post(t, s, "/v1/chat/completions", `{}`); code != 503 || !strings.Contains(string(b), "1 requests in flight") {
		t.Fatalf("after SetMaxConcurrent(1): %d %s", code, b)
	}
	s.SetMaxConcurrent(2)
	if code, _, _ := post(t, s, "/v1/chat/completions", `{}`); code != 200 {
		t.Fatalf("after SetMaxConcurrent(2): %d", code)
	}
	s.SetMaxConcurrent(1)
	s.SetMaxConcurrent(0)
	if code, _, _ := post(t, s, "/v1/chat/completions", `{}`); code != 200 {
		t.Fatalf("after SetMaxConcurrent(0): %d", code)
	}
	if st := s.Stats(); st.Busy != 1 || st.OK != 2 || st.Total != 4 {
		t.Fatalf("Stats %+v", st)
	}
}

func TestSetterPanics(t *testing.T) {
	s := start(t, Config{})
	for name, f := range map[string]func(){
		"SetLimits rpm":    func() { s.SetLimits(-1, 0, 0) },
		"SetLimits burst":  func() { s.SetLimits(0, -1, 0) },
		"SetLimits tpm":    func() { s.SetLimits(0, 0, -1) },
		"SetMaxConcurrent": func() { s.SetMaxConcurrent(-1) },
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%s: negative value accepted", name)
				}
			}()
			f()
		}()
	}
}

// expectedFaults predicts, with the server's own generator, the fault of
// each of the first n requests.
func expectedFaults(seed uint64, failRate, hangRate float64, n int) []Fault {
	r := newRand(seed)
	out := make([]Fault, n)
	for i := range out {
		switch u := r.Float64(); {
		case u < failRate:
			out[i] = FaultFail
		case u < failRate+hangRate:
			out[i] = FaultHang
		}
	}
	return out
}

// findSeed returns the first seed whose first n faults satisfy ok.
func findSeed(t *testing.T, ok func([]Fault) bool, failRate, hangRate float64, n int) uint64 {
	t.Helper()
	for seed := range uint64(1000) {
		if ok(expectedFaults(seed, failRate, hangRate, n)) {
			return seed
		}
	}
	t.Fatal("no seed found")
	return 0
}

// failedIndices sends n sequential requests and returns the indices of
// those that got an injected 503, as seen by the client and as recorded.
func failedIndices(t *testing.T, s *Server, path string, n int) (seen, recorded []int) {
	t.Helper()
	base := len(s.Requests())
	for i := range n {
		code, h, b := post(t, s, path, `{"model":"m"}`)
		switch code {
		case 503:
			if !strings.Contains(string(b), "injected failure") || len(rateLimitHeaders(h)) != 0 ||
				h.Get("retry-after") != "" || h.Get("retry-after-ms") != "" {
				t.Fatalf("request %d: injected 503 %v %s", i, h, b)
			}
			seen = append(seen, i)
		case 200:
		default:
			t.Fatalf("request %d: %d %s", i, code, b)
		}
	}
	for i, r := range s.Requests()[base:] {
		switch {
		case r.Fault == FaultFail && r.Status == 503:
			recorded = append(recorded, i)
		case r.Fault != FaultNone || r.Status != 200:
			t.Fatalf("record %d: %+v", i, r)
		}
	}
	return seen, recorded
}

func TestFailRateDeterministic(t *testing.T) {
	const n, rate = 200, 0.3
	var want []int
	for i, f := range expectedFaults(42, rate, 0, n) {
		if f == FaultFail {
			want = append(want, i)
		}
	}
	if len(want) < n/6 || len(want) > n/2 {
		t.Fatalf("%d of %d failures at rate %v", len(want), n, rate)
	}
	cfg := Config{FailRate: rate, Seed: 42, RPM: 6000, Burst: n, RateLimitHeaders: true}
	a, b := start(t, cfg), start(t, cfg)
	for _, s := range []*Server{a, b} {
		seen, recorded := failedIndices(t, s, "/v1/chat/completions", n)
		if !slices.Equal(seen, want) || !slices.Equal(recorded, want) {
			t.Fatalf("failed requests\nseen     %v\nrecorded %v\nwant     %v", seen, recorded, want)
		}
		st := s.Stats()
		if st.Total != n || st.Failed != len(want) || st.OK != n-len(want) || st.Limited+st.Busy+st.Hung+st.Other != 0 {
			t.Fatalf("Stats %+v", st)
		}
		if total, limited := s.Counts(); total != n || limited != len(want) {
			t.Fatalf("Counts %d, %d", total, limited)
		}
	}

	// Reset reseeds: the same choices again.
	a.Reset()
	if seen, _ := failedIndices(t, a, "/v1/messages", n); !slices.Equal(seen, want) {
		t.Fatalf("after Reset: %v, want %v", seen, want)
	}
	// Another seed makes other choices.
	cfg.Seed = 43
	if seen, _ := failedIndices(t, start(t, cfg), "/v1/chat/completions", n); slices.Equal(seen, want) {
		t.Fatal("seeds 42 and 43 failed the same requests")
	}
}

// TestFailRateConcurrent checks that with requests racing, the number of
// failures is still the seed's: the draws are the same, only their
// assignment to requests follows the order of arrival.
func TestFailRateConcurrent(t *testing.T) {
	const n = 64
	want := 0
	for _, f := range expectedFaults(7, 0.5, 0, n) {
		if f == FaultFail {
			want++
		}
	}
	s := start(t, Config{FailRate: 0.5, Seed: 7})
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			resp, err := http.Post(s.URL+"/api/chat", "application/json", strings.NewReader(`{"stream":false}`))
			if err != nil {
				t.Error(err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		})
	}
	wg.Wait()
	if st := s.Stats(); st.Failed != want || st.OK != n-want {
		t.Fatalf("Stats %+v, want %d failed", st, want)
	}
	failed := 0
	for _, r := range s.Requests() {
		if r.Fault == FaultFail {
			failed++
		}
	}
	if failed != want {
		t.Fatalf("%d recorded failures, want %d", failed, want)
	}
}

// TestFailuresSpareTheLimiter checks that injected failures are not
// charged: with a one-request bucket and a stopped clock, the first
// request that is not failed is admitted whatever failed before it.
func TestFailuresSpareTheLimiter(t *testing.T) {
	const n = 20
	// A seed that fails the first two requests and not all of them.
	seed := findSeed(t, func(f []Fault) bool {
		return f[0] == FaultFail && f[1] == FaultFail && slices.Contains(f, FaultNone)
	}, 0.5, 0, n)
	faults := expectedFaults(seed, 0.5, 0, n)
	first := slices.Index(faults, FaultNone)
	clock := newClock()
	s := start(t, Config{RPM: 60, Burst: 1, Now: clock.Now, FailRate: 0.5, Seed: seed, RateLimitHeaders: true})
	for i, f := range faults {
		want := 429
		switch {
		case f == FaultFail:
			want = 503
		case i == first:
			want = 200
		}
		if code, _, b := post(t, s, "/v1/messages", `{}`); code != want {
			t.Fatalf("request %d (%q): %d, want %d: %s", i, f, code, want, b)
		}
	}
	// Faults come before routing: every path can fail.
	s2 := start(t, Config{FailRate: 1})
	code, _, b := post(t, s2, "/nowhere", `{}`)
	if code != 503 || decode[struct{ Error struct{ Type, Code string } }](t, b).Error.Type != "server_error" {
		t.Fatalf("unknown path: %d %s", code, b)
	}
	code, _, b = post(t, s2, "/v1/messages", `{}`)
	if code != 503 || decode[struct{ Error struct{ Type string } }](t, b).Error.Type != "overloaded_error" {
		t.Fatalf("anthropic: %d %s", code, b)
	}
	code, _, b = post(t, s2, "/v1beta/models/g:generateContent", `{}`)
	if e := decode[struct{ Error struct{ Status string } }](t, b).Error; code != 503 || e.Status != "UNAVAILABLE" {
		t.Fatalf("gemini: %d %s", code, b)
	}
}

// rawPost writes a chat request on a fresh TCP connection.
func rawPost(t *testing.T, addr string) net.Conn {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	body := `{"model":"m"}`
	_, err = fmt.Fprintf(conn, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	if err != nil {
		t.Fatal(err)
	}
	return conn
}

// goroutinesBack waits, for a bounded time, until the number of
// goroutines is back to at most base.
func goroutinesBack(t *testing.T, base int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		n := runtime.NumGoroutine()
		if n <= base {
			return
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines, %d before:\n%s", n, base, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestHangRate(t *testing.T) {
	s := start(t, Config{HangRate: 1, RPM: 60, Burst: 1, RateLimitHeaders: true})
	tr := &http.Transport{}
	client := &http.Client{Transport: tr, Timeout: 300 * time.Millisecond}
	base := runtime.NumGoroutine()

	began := time.Now()
	resp, err := client.Post(s.URL+"/v1/chat/completions", "application/json", strings.NewReader(`{"model":"m"}`))
	if err == nil {
		resp.Body.Close()
		t.Fatalf("hung request answered %d", resp.StatusCode)
	}
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("want a timeout, got %v", err)
	}
	if el := time.Since(began); el < 250*time.Millisecond {
		t.Fatalf("timed out after %v only", el)
	}
	waitFor(t, "the hung request to end", func() bool { return s.InFlight() == 0 })
	tr.CloseIdleConnections()
	goroutinesBack(t, base)

	// Several more, left by their clients.
	for range 3 {
		if resp, err := client.Post(s.URL+"/v1/messages", "application/json", strings.NewReader(`{}`)); err == nil {
			resp.Body.Close()
			t.Fatal("hung request answered")
		}
	}
	waitFor(t, "the hung requests to end", func() bool { return s.InFlight() == 0 })
	tr.CloseIdleConnections()
	goroutinesBack(t, base)

	for i, r := range s.Requests() {
		if r.Fault != FaultHang || r.Status != 0 || r.BodyLen == 0 {
			t.Fatalf("record %d: %+v", i, r)
		}
	}
	if st := s.Stats(); st != (Stats{Total: 4, Hung: 4}) {
		t.Fatalf("Stats %+v", st)
	}
	if total, limited := s.Counts(); total != 4 || limited != 0 {
		t.Fatalf("Counts %d, %d", total, limited)
	}
}

// TestHangWritesNothing reads a hung request's connection byte by byte:
// nothing arrives while it hangs, nor when the server closes.
func TestHangWritesNothing(t *testing.T) {
	s, err := Start(Config{HangRate: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	conn := rawPost(t, strings.TrimPrefix(s.URL, "http://"))
	defer conn.Close()
	waitFor(t, "the request to hang", func() bool { return s.InFlight() == 1 && s.Stats().Hung == 1 })
	if got := s.Requests()[0]; got.BodyLen != len(`{"model":"m"}`) || got.Fault != FaultHang {
		t.Fatalf("record %+v", got)
	}

	conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	var buf [1]byte
	if n, err := conn.Read(buf[:]); n != 0 || !isTimeout(err) {
		t.Fatalf("hung request wrote %d bytes, err %v", n, err)
	}

	closed := make(chan struct{})
	go func() { s.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("Close hung on a hung request")
	}
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if b, err := io.ReadAll(conn); len(b) != 0 || isTimeout(err) {
		t.Fatalf("after Close: read %q, %v", b, err)
	}
	if s.InFlight() != 0 {
		t.Fatalf("InFlight %d after Close", s.InFlight())
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestCloseWithHungRequest closes the server under a client that would
// wait forever, both listening itself and mounted in httptest.
func TestCloseWithHungRequest(t *testing.T) {
	for _, mounted := range []bool{false, true} {
		t.Run(fmt.Sprintf("httptest=%v", mounted), func(t *testing.T) {
			var s *Server
			var err error
			url := ""
			if mounted {
				s, err = New(Config{HangRate: 1})
				if err != nil {
					t.Fatal(err)
				}
				ts := httptest.NewServer(s.Handler())
				defer ts.Close()
				url = ts.URL
			} else {
				s, err = Start(Config{HangRate: 1})
				if err != nil {
					t.Fatal(err)
				}
				url = s.URL
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			result := make(chan error, 1)
			go func() {
				req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url+"/v1/messages", strings.NewReader(`{}`))
				resp, err := http.DefaultClient.Do(req)
				if err == nil {
					resp.Body.Close()
					err = fmt.Errorf("answered %d", resp.StatusCode)
				}
				result <- err
			}()
			waitFor(t, "the request to hang", func() bool { return s.InFlight() == 1 })

			began := time.Now()
			s.Close()
			if el := time.Since(began); el > 5*time.Second {
				t.Fatalf("Close took %v", el)
			}
			select {
			case err := <-result:
				if err == nil || strings.Contains(err.Error(), "answered") || ctx.Err() != nil {
					t.Fatalf("client: %v", err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("client still waiting after Close")
			}
		})
	}
}

// TestHangHoldsConcurrencySlot checks that a hung request takes a slot
// of MaxConcurrent until its client leaves.
func TestHangHoldsConcurrencySlot(t *testing.T) {
	// A seed that hangs the first request and not the next three.
	seed := findSeed(t, func(f []Fault) bool {
		return f[0] == FaultHang && f[1] == FaultNone && f[2] == FaultNone && f[3] == FaultNone
	}, 0, 0.5, 4)
	s := start(t, Config{HangRate: 0.5, Seed: seed, MaxConcurrent: 1})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	left := make(chan struct{})
	go func() {
		defer close(left)
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, s.URL+"/v1/chat/completions", strings.NewReader(`{}`))
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
			t.Errorf("hung request answered %d", resp.StatusCode)
		}
	}()
	waitFor(t, "the request to hang", func() bool { return s.Stats().Hung == 1 && s.InFlight() == 1 })
	if code, _, _ := post(t, s, "/v1/chat/completions", `{}`); code != 503 {
		t.Fatalf("request while another hangs: %d", code)
	}
	cancel()
	<-left
	waitFor(t, "the hung request to end", func() bool { return s.InFlight() == 0 })
	for i := range 2 {
		if code, _, _ := post(t, s, "/v1/chat/completions", `{}`); code != 200 {
			t.Fatalf("request %d after the hung one left: %d", i, code)
		}
	}
	if st := s.Stats(); st != (Stats{Total: 4, Hung: 1, Busy: 1, OK: 2}) {
		t.Fatalf("Stats %+v", st)
	}
}

func TestFaultValidation(t *testing.T) {
	bad := []Config{
		{FailRate: -0.1},
		{FailRate: 1.1},
		{FailRate: math.NaN()},
		{HangRate: math.NaN()},
		{HangRate: math.Inf(1)},
		{HangRate: -1},
		{FailRate: 0.6, HangRate: 0.5},
		{RetryAfterOnly: true, NoRetryAfter: true},
	}
	for _, cfg := range bad {
		if s, err := New(cfg); err == nil {
			s.Close()
			t.Errorf("accepted %+v", cfg)
		}
	}
	good := []Config{
		{FailRate: 1},
		{HangRate: 1},
		{FailRate: 0.7, HangRate: 0.3},
		{RetryAfterOnly: true, RateLimitHeaders: true},
		{NoRetryAfter: true},
	}
	for _, cfg := range good {
		s, err := New(cfg)
		if err != nil {
			t.Errorf("refused %+v: %v", cfg, err)
			continue
		}
		s.Close()
	}
}

// Requests carry their arrival time, and PeakInFlight counts every request
// inside the handler at once, refused ones included.
func TestArrivedAndPeakInFlight(t *testing.T) {
	s := start(t, Config{MaxConcurrent: 1, StreamChunks: 2, ChunkDelay: 200 * time.Millisecond})
	before := time.Now()
	var wg sync.WaitGroup
	for range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			post(t, s, "/v1/chat/completions", `{"model":"m","stream":true,"messages":[{"role":"user","content":"x"}]}`)
		}()
	}
	wg.Wait()
	if p := s.PeakInFlight(); p < 2 || p > 3 {
		t.Errorf("peak %d, want 2 or 3 (one served, the others refused while it streamed)", p)
	}
	for i, r := range s.Requests() {
		if r.Arrived.Before(before) || r.Arrived.After(time.Now()) {
			t.Errorf("request %d arrived at %v", i, r.Arrived)
		}
	}
}
