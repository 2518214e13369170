package caddytest

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
)

// The examples for seed 003's three use cases: cost per developer, a
// self-hosted model that bursts to the cloud, and customer tiers. Each is
// loaded as written, with only its port and its environment placeholders
// set by the test.

func TestExampleCostPerDeveloper(t *testing.T) {
	// A budget of 2000 tokens a day refills one token every 43.2 s, so
	// within this test every level below is exact. Every request is
	// estimated at chatEstimate (1025) tokens and reports 400.
	const (
		budget = 2000
		used   = 10 + 390
		daily  = "dev-daily-tokens/tokens_per_day"
		tpm    = "model-tpm/tokens_per_minute"
	)
	t.Setenv("DEV_DAILY_TOKENS", strconv.Itoa(budget))
	h, up := loadSeedExample(t, "cost-per-developer.Caddyfile", fakellm.Config{PromptTokens: 10, CompletionTokens: 390})

	// level reads a developer's budget through a request that charges no
	// tokens (a path no dialect claims; the upstream answers 404).
	level := func(what string, hdr ...string) int64 {
		t.Helper()
		r := h.post("/v1/models", "", hdr...)
		wantStatus(t, what+" level probe", r, http.StatusNotFound)
		return remaining(t, r, daily)
	}

	alice := []string{"X-User", "alice"}
	r := h.chat("gpt-4o", alice...)
	wantStatus(t, "alice #1", r, http.StatusOK)
	wantPolicies(t, "alice #1", r, map[string]policyItem{daily: {budget, 86400}, tpm: {1000000, 60}})
	wantRemaining(t, "alice #1", r, map[string]int64{daily: budget - chatEstimate, tpm: 1000000 - chatEstimate})
	// Settlement: the 1025 charged at admission became the 400 the
	// upstream reported, so the budget went back up.
	want := int64(budget - used)
	if l := level("alice #1", alice...); l != want {
		t.Fatalf("alice after #1: r=%d, want %d: the request was not settled on its real usage", l, want)
	}
	for i := 2; i <= 3; i++ {
		r := h.chat("gpt-4o", alice...)
		wantStatus(t, fmt.Sprint("alice #", i), r, http.StatusOK)
		if got := remaining(t, r, daily); got != want-chatEstimate {
			t.Errorf("alice #%d at admission: r=%d, want %d", i, got, want-chatEstimate)
		}
		want -= used
		if l := level(fmt.Sprint("alice #", i), alice...); l != want {
			t.Errorf("alice after #%d: r=%d, want %d", i, l, want)
		}
	}
	// 800 left, and the next request is estimated at 1025: refused,
	// charging nothing, and never sent.
	before := len(up.Requests())
	r = h.chat("gpt-4o", alice...)
	e := wantOpenAI429(t, "alice #4", r, "dev-daily-tokens", "tokens_per_day")
	if !strings.Contains(e.Error.Message, "per user, virtualaccount") {
		t.Errorf("alice #4: message %q does not say per user, virtualaccount", e.Error.Message)
	}
	if got := remaining(t, r, daily); got != want {
		t.Errorf("alice #4: r=%d, want %d", got, want)
	}
	if n := len(requestsSince(up, before)); n != 0 {
		t.Errorf("the upstream saw %d refused requests", n)
	}

	// Another developer still passes, with a budget of its own.
	r = h.chat("gpt-4o", "X-User", "bob")
	wantStatus(t, "bob", r, http.StatusOK)
	if got := remaining(t, r, daily); got != budget-chatEstimate {
		t.Errorf("bob: r=%d, want %d", got, budget-chatEstimate)
	}

	// Without X-User the developer is the API key: a budget per key. The
	// key reaches the upstream unchanged.
	carol := []string{"Authorization", "Bearer sk-carol-0123456789"}
	before = len(up.Requests())
	r = h.chat("gpt-4o", carol...)
	wantStatus(t, "carol's key", r, http.StatusOK)
	if got := remaining(t, r, daily); got != budget-chatEstimate {
		t.Errorf("carol's key: r=%d, want %d", got, budget-chatEstimate)
	}
	if got := requestsSince(up, before); len(got) != 1 || got[0].Header.Get("Authorization") != carol[1] {
		t.Errorf("the upstream did not get carol's request with her key unchanged: %+v", got)
	}

	// stream_usage: an OpenAI stream is sent on asking for its usage, and
	// settled on it (without, it would be settled on its prompt estimate
	// and the text counted as it passed: 1 + 5 tokens).
	stream := `{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}`
	before = len(up.Requests())
	r = h.post("/v1/chat/completions", stream, "X-User", "bob")
	wantStatus(t, "bob's stream", r, http.StatusOK)
	if !strings.Contains(string(r.body), `"usage":{"completion_tokens":390,"prompt_tokens":10,"total_tokens":400}`) {
		t.Errorf("bob's stream carries no usage chunk: %s", truncate(string(r.body), 2000))
	}
	sent := `{"stream_options":{"include_usage":true},` + stream[1:]
	if got := requestsSince(up, before); len(got) != 1 || got[0].BodySHA256 != sha([]byte(sent)) {
		t.Errorf("the upstream did not get the stream with include_usage added: %+v", got)
	}
	if l := level("bob's stream", "X-User", "bob"); l != budget-2*used {
		t.Errorf("bob after the stream: r=%d, want %d (settled on the reported usage)", l, budget-2*used)
	}
}

// sendTraced posts body to /v1/chat/completions with the headers, and
// calls wrote once the request has been written in full.
func (h *harness) sendTraced(ctx context.Context, body string, wrote func(), hdr ...string) queued {
	start := time.Now()
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
		WroteRequest: func(httptrace.WroteRequestInfo) { wrote() },
	})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.base+"/v1/chat/completions", strings.NewReader(body))
	if err != nil {
		return queued{err: err}
	}
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	res, err := h.client.Do(req)
	if err != nil {
		return queued{err: err, elapsed: time.Since(start)}
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	return queued{response: response{status: res.StatusCode, header: res.Header, body: b}, err: err, elapsed: time.Since(start)}
}

// onpremBody is request i's body, spaced oddly so that a re-encoded body
// could not pass for the client's.
func onpremBody(i int, stream bool) string {
	return fmt.Sprintf(`{ "messages": [ {"role":"user", "content":"request %d"} ],  "model":"llama3.1-8b", "stream": %t }`, i, stream)
}

// loadOnprem loads the on-prem example in front of onprem and cloud.
func loadOnprem(t *testing.T, slots int, onprem, cloud string) *harness {
	t.Helper()
	t.Setenv("ONPREM_UPSTREAM", onprem)
	t.Setenv("CLOUD_UPSTREAM", cloud)
	t.Setenv("ONPREM_SLOTS", strconv.Itoa(slots))
	t.Setenv("CLOUD_API_KEY", "sk-cloud-test")
	return loadExample(t, "onprem-fallback.Caddyfile")
}

// wantCloudGot checks that the cloud received exactly bodies, each once,
// byte for byte, with the cloud key in place of the client's.
func wantCloudGot(t *testing.T, cloud *fakellm.Server, bodies []string) {
	t.Helper()
	want := map[string]int{}
	for _, b := range bodies {
		want[sha([]byte(b))]++
	}
	got := cloud.Requests()
	if len(got) != len(bodies) {
		t.Fatalf("the cloud got %d requests, want %d", len(got), len(bodies))
	}
	for _, rec := range got {
		if want[rec.BodySHA256] == 0 {
			t.Errorf("the cloud got a body (%d bytes, sha256 %s) that no client sent, or got it twice", rec.BodyLen, rec.BodySHA256)
		}
		want[rec.BodySHA256]--
		if cl := rec.Header.Get("Content-Length"); cl != strconv.Itoa(rec.BodyLen) {
			t.Errorf("the cloud got Content-Length %q for %d bytes", cl, rec.BodyLen)
		}
		if a := rec.Header.Get("Authorization"); a != "Bearer sk-cloud-test" {
			t.Errorf("the cloud got Authorization %q, want the cloud key", a)
		}
	}
}

// wantServedBy checks a fallback-example response: 200, from upstream.
func wantServedBy(t *testing.T, what string, r queued, upstream string) {
	t.Helper()
	wantServed(t, what, r)
	if got := r.header.Get("X-LLM-Upstream"); got != upstream {
		t.Errorf("%s: X-LLM-Upstream %q, want %q", what, got, upstream)
	}
}

// The on-prem example: with every slot taken by a slow stream, the requests
// that come on top wait their short queue, then are served by the cloud,
// with the client's body byte for byte. The on-prem server, which refuses
// (503) anything above its slots, never sees more than its slots at once.
func TestExampleOnpremFallback(t *testing.T) {
	const slots, extra = 2, 4
	// Each on-prem stream lasts 10 × 300 ms: far longer than the 1 s the
	// extra requests wait for a slot before they go to the cloud.
	onprem := startFake(t, fakellm.Config{MaxConcurrent: slots, StreamChunks: 10, ChunkDelay: 300 * time.Millisecond})
	cloud := startFake(t, fakellm.Config{})
	h := loadOnprem(t, slots, hostPort(onprem), hostPort(cloud))
	client := []string{"Authorization", "Bearer internal-token"}

	held := make([]queued, slots)
	var wg sync.WaitGroup
	for i := range slots {
		wg.Add(1)
		go func() {
			defer wg.Done()
			held[i] = h.sendBody(context.Background(), onpremBody(i, true), "u", client...)
		}()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if !waitFor(ctx, func() bool { return onprem.InFlight() == slots }) {
		t.Fatalf("the on-prem server has %d streams in flight, want %d", onprem.InFlight(), slots)
	}

	over := make([]queued, extra)
	var overBodies []string
	var owg sync.WaitGroup
	for i := range extra {
		body := onpremBody(slots+i, true)
		overBodies = append(overBodies, body)
		owg.Add(1)
		go func() {
			defer owg.Done()
			over[i] = h.sendBody(context.Background(), body, "u", client...)
		}()
	}
	owg.Wait()
	inFlight := onprem.InFlight()
	wg.Wait()
	if inFlight != slots {
		t.Errorf("the on-prem streams ended before the extra requests were served (%d in flight): the test proves nothing", inFlight)
	}

	for i, r := range held {
		wantServedBy(t, fmt.Sprint("on-prem stream ", i), r, "onprem")
		if !strings.Contains(string(r.body), "fake10") || !strings.HasSuffix(string(r.body), "data: [DONE]\n\n") {
			t.Errorf("on-prem stream %d is incomplete: %s", i, truncate(string(r.body), 500))
		}
	}
	for i, r := range over {
		what := fmt.Sprint("extra request ", i)
		wantServedBy(t, what, r, "cloud")
		// It waited its queue, then was sent on; the limiter's
		// Retry-After was removed, since it was served.
		if w := queueWait(r); w < 900 {
			t.Errorf("%s: X-Queue-Wait-Ms %q, want about the 1s max_wait", what, r.header.Get("X-Queue-Wait-Ms"))
		}
		if ra := r.header.Values("Retry-After"); len(ra) > 0 || len(r.header.Values("Retry-After-Ms")) > 0 {
			t.Errorf("%s: a served response carries Retry-After %q", what, ra)
		}
		if !strings.Contains(string(r.body), "fake3") {
			t.Errorf("%s: body %s, want the cloud's stream", what, truncate(string(r.body), 500))
		}
	}
	wantCloudGot(t, cloud, overBodies)

	st := onprem.Stats()
	if peak := onprem.PeakInFlight(); peak > slots || st.Busy != 0 || st.Total != slots {
		t.Errorf("on-prem: peak %d in flight, %d refused busy, %d requests; want at most %d, 0 and %d", peak, st.Busy, st.Total, slots, slots)
	}
	for _, rec := range onprem.Requests() {
		if rec.Header.Get("Authorization") != "Bearer internal-token" {
			t.Errorf("on-prem got Authorization %q, want the client's", rec.Header.Get("Authorization"))
		}
	}

	// The slots came back: the next request is served on-prem again.
	r := h.sendBody(context.Background(), onpremBody(99, false), "u", client...)
	wantServedBy(t, "after the surge", r, "onprem")
	if n := onprem.Stats().Total; n != slots+1 {
		t.Errorf("on-prem saw %d requests, want %d", n, slots+1)
	}

	// Any other refusal is answered, not sent to the cloud.
	bad := h.post("/v1/chat/completions", `{"model":`)
	wantStatus(t, "bad JSON", bad, http.StatusBadRequest)
	if !strings.HasPrefix(string(bad.body), "invalid request body") {
		t.Errorf("bad JSON: body %q, want the module's message", bad.body)
	}
	if n := len(cloud.Requests()); n != extra {
		t.Errorf("the cloud saw %d requests, want %d", n, extra)
	}
}

// The on-prem example with the on-prem server down: every request is
// served by the cloud, body unchanged.
func TestExampleOnpremDown(t *testing.T) {
	cloud := startFake(t, fakellm.Config{})
	// A port nothing listens on.
	h := loadOnprem(t, 2, fmt.Sprintf("127.0.0.1:%d", freePort(t)), hostPort(cloud))
	var bodies []string
	for i := range 3 {
		body := onpremBody(i, i%2 == 0)
		bodies = append(bodies, body)
		wantServedBy(t, fmt.Sprint("request ", i), h.sendBody(context.Background(), body, "u"), "cloud")
	}
	wantCloudGot(t, cloud, bodies)
}

// tierHeader is the X-LLM-Metadata of a customer.
func tierHeader(tier, customer string) []string {
	return []string{"X-LLM-Metadata", fmt.Sprintf(`{"tier":%q,"customer":%q}`, tier, customer)}
}

// memberRemaining returns the r= of the RateLimit member name. Unlike
// remaining, it also reads a concurrency limit's member, which has no t=.
func memberRemaining(t *testing.T, r response, name string) int64 {
	t.Helper()
	m := regexp.MustCompile(`(?:^|, )"` + regexp.QuoteMeta(name) + `";r=(\d+)(?:;t=\d+)?(?:,|$)`).FindStringSubmatch(r.header.Get("RateLimit"))
	if m == nil {
		t.Fatalf("RateLimit %q has no %q", r.header.Get("RateLimit"), name)
	}
	n, _ := strconv.ParseInt(m[1], 10, 64)
	return n
}

// The tiers example's plan limits: a free customer is refused at its
// tier's limit at once; another free customer, and a gold one past the
// free limit, are not.
func TestExampleCustomerTiersPlans(t *testing.T) {
	const freeRPM = 5
	t.Setenv("FREE_RPM", strconv.Itoa(freeRPM))
	h, up := loadSeedExample(t, "customer-tiers.Caddyfile", fakellm.Config{})
	const (
		freeReq = "free-tier/requests_per_minute"
		goldReq = "gold-tier/requests_per_minute"
	)
	free := tierHeader("free", "initech")
	for i := range freeRPM {
		r := h.chat("gpt-4o", free...)
		wantStatus(t, fmt.Sprint("initech #", i+1), r, http.StatusOK)
		if got := memberRemaining(t, r, freeReq); got != int64(freeRPM-1-i) {
			t.Errorf("initech #%d: r=%d, want %d", i+1, got, freeRPM-1-i)
		}
	}
	start := time.Now()
	r := h.chat("gpt-4o", free...)
	if el := time.Since(start); el > 500*time.Millisecond {
		t.Errorf("the refusal took %s: a plan limit must not queue", el)
	}
	e := wantOpenAI429(t, fmt.Sprint("initech #", freeRPM+1), r, "free-tier", "requests_per_minute")
	if !strings.Contains(e.Error.Message, "per metadata.customer") {
		t.Errorf("message %q does not say per metadata.customer", e.Error.Message)
	}

	r = h.chat("gpt-4o", tierHeader("free", "hooli")...)
	wantStatus(t, "another free customer", r, http.StatusOK)
	if got := memberRemaining(t, r, freeReq); got != freeRPM-1 {
		t.Errorf("another free customer: r=%d, want %d", got, freeRPM-1)
	}
	gold := tierHeader("gold", "acme")
	for i := range freeRPM + 3 {
		r := h.chat("gpt-4o", gold...)
		wantStatus(t, fmt.Sprint("acme #", i+1), r, http.StatusOK)
		if got := memberRemaining(t, r, goldReq); got != int64(600-1-i) {
			t.Errorf("acme #%d: r=%d, want %d", i+1, got, 600-1-i)
		}
		// One request in flight (this one) of the default 32.
		if got := memberRemaining(t, r, "shared-capacity/concurrent_requests"); got != 31 {
			t.Errorf("acme #%d: shared capacity r=%d, want 31", i+1, got)
		}
	}
	if total, _ := up.Counts(); total != freeRPM+1+freeRPM+3 {
		t.Errorf("the upstream saw %d requests, want %d", total, freeRPM+1+freeRPM+3)
	}
}

// The tiers example's queue: with the shared capacity at one request in
// flight and both customers' requests waiting for it, the gold customer
// (weight 4) is served four times as often as the free one (weight 1).
// The shares are counted from the order in which the upstream received the
// requests, which is the order of the turns, since one is in flight at a
// time.
func TestExampleCustomerTiersWeightedQueue(t *testing.T) {
	const perCustomer = 40
	t.Setenv("FREE_RPM", "1000")
	t.Setenv("SHARED_CONCURRENCY", "1")
	// Streams are long (a blocker holds the capacity with one); the
	// measured requests are not streamed, and are answered at once.
	h, up := loadSeedExample(t, "customer-tiers.Caddyfile", fakellm.Config{StreamChunks: 1000, ChunkDelay: 10 * time.Millisecond})

	// The blocker takes the one slot until the test lets it go.
	bctx, release := context.WithCancel(context.Background())
	defer release()
	req, err := http.NewRequestWithContext(bctx, http.MethodPost, h.base+"/v1/chat/completions",
		strings.NewReader(`{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hold"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("X-LLM-Metadata", `{"tier":"gold","customer":"blocker"}`)
	res, err := h.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := res.Body.Read(make([]byte, 64)); err != nil || res.StatusCode != http.StatusOK {
		t.Fatalf("blocker: %d, %v", res.StatusCode, err)
	}

	// Every request of both customers is sent and waits.
	n := 2 * perCustomer
	out := make([]queued, n)
	var wrote atomic.Int64
	var wg sync.WaitGroup
	for i := range out {
		tier, customer := "gold", "acme"
		if i%2 == 1 {
			tier, customer = "free", "initech"
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i] = h.sendTraced(context.Background(), chatBody("gpt-4o"), func() { wrote.Add(1) }, tierHeader(tier, customer)...)
		}()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if !waitFor(ctx, func() bool { return wrote.Load() == int64(n) }) {
		t.Fatalf("only %d of %d requests were sent", wrote.Load(), n)
	}
	release()
	res.Body.Close()
	wg.Wait()

	deepest := 0
	for i, r := range out {
		wantServed(t, fmt.Sprint("request ", i), r)
		d, _ := strconv.Atoi(r.header.Get("X-Queue-Depth"))
		deepest = max(deepest, d)
	}
	// The first served left (nearly) n-1 behind it: the requests were
	// waiting when the turns began, so both customers were backlogged. A
	// few may have joined a moment after the first turns (a request is
	// written before Caddy queues it); a latecomer gains no credit for it,
	// and its customer still has plenty waiting, so the shares hold.
	if deepest < n*3/4 {
		t.Fatalf("at most %d requests were waiting behind one served, want about %d: the requests were not queued when the blocker left", deepest, n-1)
	}

	var order []string
	for _, rec := range up.Requests() {
		switch m := rec.Header.Get("X-LLM-Metadata"); {
		case strings.Contains(m, "acme"):
			order = append(order, "gold")
		case strings.Contains(m, "initech"):
			order = append(order, "free")
		}
	}
	if len(order) != n {
		t.Fatalf("the upstream saw %d of the customers' requests, want %d", len(order), n)
	}
	// In the first 40 turns both customers still have requests waiting
	// (gold runs out after about 50): free's share is 1/(4+1) of them, 8.
	// Equal weights would give 20.
	const window = perCustomer
	freeTurns := 0
	for _, tier := range order[:window] {
		if tier == "free" {
			freeTurns++
		}
	}
	t.Logf("free got %d of the first %d turns; %d waited behind the first served", freeTurns, window, deepest)
	if freeTurns < 5 || freeTurns > 11 {
		t.Errorf("free got %d of the first %d turns, want about %d (weights 4:1): %v", freeTurns, window, window/5, order[:window])
	}
}
