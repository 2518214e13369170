package caddytest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/llmratelimit/caddy-llm-ratelimit"
	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
)

// globalOptions keep Caddy in-process, quiet and on loopback: no admin
// endpoint (configs are loaded with caddy.Load, which is what the admin
// API's /load calls), nothing persisted, no automatic HTTPS, and every
// listener bound to 127.0.0.1. Set LLMRL_E2E_LOG=1 to see Caddy's logs,
// LLMRL_E2E_LOG=debug for its debug logs too.
func globalOptions(extra string) string {
	opts := extra + "\tadmin off\n\tpersist_config off\n\tauto_https off\n\tdefault_bind 127.0.0.1\n\tgrace_period 5s\n"
	switch os.Getenv("LLMRL_E2E_LOG") {
	case "debug":
		opts += "\tdebug\n"
	case "":
		opts += "\tlog {\n\t\toutput discard\n\t}\n"
	}
	return opts
}

// withGlobalOptions prepends the test global options to a Caddyfile that
// has no global options block of its own.
func withGlobalOptions(caddyfile string) string {
	return withGlobalOptionsExtra("", caddyfile)
}

// withGlobalOptionsExtra is withGlobalOptions with more global options.
func withGlobalOptionsExtra(extra, caddyfile string) string {
	return "{\n" + globalOptions(extra) + "}\n\n" + caddyfile
}

// adapt turns a Caddyfile into Caddy's JSON config.
func adapt(caddyfile string) ([]byte, error) {
	adapter := caddyconfig.GetAdapter("caddyfile")
	if adapter == nil {
		return nil, fmt.Errorf("caddyfile adapter not registered")
	}
	cfg, _, err := adapter.Adapt([]byte(caddyfile), map[string]any{"filename": "Caddyfile"})
	return cfg, err
}

// loadRaw adapts a complete Caddyfile and loads it, forcing a reload even
// when the config is unchanged. It returns the first error.
func loadRaw(caddyfile string) error {
	cfg, err := adapt(caddyfile)
	if err != nil {
		return err
	}
	return caddy.Load(cfg, true)
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("finding a free port: %v", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// startFake starts a fake LLM upstream for the test.
func startFake(t testing.TB, cfg fakellm.Config) *fakellm.Server {
	t.Helper()
	s, err := fakellm.Start(cfg)
	if err != nil {
		t.Fatalf("starting fakellm: %v", err)
	}
	t.Cleanup(s.Close)
	return s
}

// hostPort is a fake upstream's address without the scheme.
func hostPort(s *fakellm.Server) string { return strings.TrimPrefix(s.URL, "http://") }

// harness is one test's Caddy and client.
type harness struct {
	// extraGlobal is added to the global options of every load.
	extraGlobal string
	t           testing.TB
	port        int
	base        string
	client      *http.Client
	// justLoaded is set by load and cleared by the next request (see do).
	justLoaded *atomic.Bool
}

// newHarness picks a port for the test's site and arranges for Caddy to be
// stopped when the test ends, so that no state leaks into the next test.
func newHarness(t testing.TB) *harness {
	t.Helper()
	tr := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConnsPerHost: 16,
	}
	h := &harness{t: t, port: freePort(t), client: &http.Client{Transport: tr, Timeout: 20 * time.Second}, justLoaded: new(atomic.Bool)}
	h.base = fmt.Sprintf("http://127.0.0.1:%d", h.port)
	t.Cleanup(func() {
		h.closeIdle()
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping caddy: %v", err)
		}
	})
	return h
}

// site returns a site block on the harness port with the given handler
// block in front of reverse_proxy to upstream.
func (h *harness) site(handlerBlock, upstream string) string {
	return fmt.Sprintf(":%d {\n\tllm_rate_limit {\n%s\n\t}\n\treverse_proxy %s\n}\n", h.port, handlerBlock, upstream)
}

// load loads sites (one or more site blocks) with the test global options,
// failing the test on error.
func (h *harness) load(sites string) {
	h.t.Helper()
	if err := loadRaw(withGlobalOptionsExtra(h.extraGlobal, sites)); err != nil {
		h.t.Fatalf("loading config: %v\n%s", err, sites)
	}
	// A reload closes the old servers' idle connections; a POST sent on one
	// of them before the client notices fails without being retried.
	h.closeIdle()
	h.justLoaded.Store(true)
}

func (h *harness) closeIdle() { h.client.CloseIdleConnections() }

// loadHandler loads a single site: the llm_rate_limit block, then
// reverse_proxy to the fake upstream.
func (h *harness) loadHandler(handlerBlock string, up *fakellm.Server) {
	h.t.Helper()
	h.load(h.site(handlerBlock, hostPort(up)))
}

// loadBeforeSite loads the handler block in front of a second site, on a
// port of its own, whose directives (backend) stand in for the upstream.
func (h *harness) loadBeforeSite(handlerBlock, backend string) {
	h.t.Helper()
	back := freePort(h.t)
	h.load(h.site(handlerBlock, fmt.Sprintf("127.0.0.1:%d", back)) + fmt.Sprintf(":%d {\n%s\n}\n", back, backend))
}

// response is a fully read response.
type response struct {
	status int
	header http.Header
	body   []byte
}

func (r response) String() string {
	return fmt.Sprintf("%d %s", r.status, truncate(string(r.body), 300))
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// do sends req and reads the whole response, failing the test on a
// transport error.
//
// The first request after a load may be retried once, when its body can be
// replayed and its connection was reset or closed before any response.
// During a graceful reload the old server stops serving the shared
// listener: the kernel resets connections still queued on the old socket,
// and the old server closes the ones it accepted last. Such a request never
// reached a handler (Caddy and the kernel, not the module). Any other
// request that fails, fails the test.
func (h *harness) do(req *http.Request) response {
	h.t.Helper()
	res, err := h.client.Do(req)
	retryable := h.justLoaded.Swap(false) && (errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF))
	if err != nil && retryable && (req.Body == nil || req.GetBody != nil) {
		retry := req.Clone(req.Context())
		if req.GetBody != nil {
			if retry.Body, err = req.GetBody(); err != nil {
				h.t.Fatalf("%s %s: replaying the body: %v", req.Method, req.URL.Path, err)
			}
		}
		res, err = h.client.Do(retry)
	}
	if err != nil {
		h.t.Fatalf("%s %s: %v", req.Method, req.URL.Path, err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		h.t.Fatalf("%s %s: reading body: %v", req.Method, req.URL.Path, err)
	}
	return response{status: res.StatusCode, header: res.Header, body: b}
}

// newReq builds a request to the harness with headers given as
// name, value pairs.
func (h *harness) newReq(method, path string, body io.Reader, hdr ...string) *http.Request {
	h.t.Helper()
	return h.newReqURL(method, h.base+path, body, hdr...)
}

// newReqURL is newReq for a full URL.
func (h *harness) newReqURL(method, url string, body io.Reader, hdr ...string) *http.Request {
	h.t.Helper()
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		h.t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if len(hdr)%2 != 0 {
		h.t.Fatalf("odd header list %q", hdr)
	}
	for i := 0; i < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	return req
}

// post sends a POST with a body of known length.
func (h *harness) post(path, body string, hdr ...string) response {
	h.t.Helper()
	return h.do(h.newReq(http.MethodPost, path, strings.NewReader(body), hdr...))
}

// get sends a GET.
func (h *harness) get(path string, hdr ...string) response {
	h.t.Helper()
	return h.do(h.newReq(http.MethodGet, path, nil, hdr...))
}

// chat sends an OpenAI chat completion for model.
func (h *harness) chat(model string, hdr ...string) response {
	h.t.Helper()
	return h.post("/v1/chat/completions", chatBody(model), hdr...)
}

// openStream starts a streamed gpt-4o chat completion under ctx and returns
// the response with its body unread, or the transport's error.
func (h *harness) openStream(ctx context.Context) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.base+"/v1/chat/completions",
		strings.NewReader(`{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}`))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	return h.client.Do(req)
}

func chatBody(model string) string {
	b, _ := json.Marshal(map[string]any{
		"model":    model,
		"messages": []map[string]string{{"role": "user", "content": "hi"}},
	})
	return string(b)
}

// unknownReader hides a body's length, so that the client sends it with
// chunked transfer encoding.
type unknownReader struct{ r io.Reader }

func (u unknownReader) Read(p []byte) (int, error) { return u.r.Read(p) }

// postChunked sends a POST whose body length is unknown to the client.
func (h *harness) postChunked(path string, body []byte, hdr ...string) response {
	h.t.Helper()
	req := h.newReq(http.MethodPost, path, unknownReader{bytes.NewReader(body)}, hdr...)
	if req.ContentLength != 0 || req.TransferEncoding != nil {
		h.t.Fatalf("request is not chunked: ContentLength %d", req.ContentLength)
	}
	return h.do(req)
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// ---- assertions -------------------------------------------------------

func wantStatus(t testing.TB, what string, r response, status int) {
	t.Helper()
	if r.status != status {
		t.Fatalf("%s: status %d, want %d; body: %s", what, r.status, status, truncate(string(r.body), 500))
	}
}

// wantStatuses sends one request per expected status and checks each.
func wantStatuses(t testing.TB, what string, send func() response, statuses ...int) []response {
	t.Helper()
	var out []response
	for i, st := range statuses {
		r := send()
		wantStatus(t, fmt.Sprintf("%s #%d", what, i+1), r, st)
		out = append(out, r)
	}
	return out
}

// policyItem is one member of RateLimit-Policy.
type policyItem struct{ q, w int64 }

// stateItem is one member of RateLimit.
type stateItem struct{ r, t int64 }

var (
	policyRe = regexp.MustCompile(`^"([^"\\]+)";q=(\d+);w=(\d+)$`)
	stateRe  = regexp.MustCompile(`^"([^"\\]+)";r=(\d+);t=(\d+)$`)
)

// parsePolicy parses RateLimit-Policy strictly: every member must be
// `"id/unit";q=N;w=S`.
func parsePolicy(t testing.TB, h http.Header) (map[string]policyItem, []string) {
	t.Helper()
	vals := h.Values("RateLimit-Policy")
	if len(vals) != 1 {
		t.Fatalf("RateLimit-Policy: %d field lines %q, want 1", len(vals), vals)
	}
	out := map[string]policyItem{}
	var order []string
	for _, m := range strings.Split(vals[0], ", ") {
		g := policyRe.FindStringSubmatch(m)
		if g == nil {
			t.Fatalf("RateLimit-Policy member %q does not match %s (field %q)", m, policyRe, vals[0])
		}
		q, _ := strconv.ParseInt(g[2], 10, 64)
		w, _ := strconv.ParseInt(g[3], 10, 64)
		if _, dup := out[g[1]]; dup {
			t.Fatalf("RateLimit-Policy: %q listed twice in %q", g[1], vals[0])
		}
		out[g[1]] = policyItem{q, w}
		order = append(order, g[1])
	}
	return out, order
}

// parseState parses RateLimit strictly: every member must be
// `"id/unit";r=N;t=S`.
func parseState(t testing.TB, h http.Header) map[string]stateItem {
	t.Helper()
	vals := h.Values("RateLimit")
	if len(vals) != 1 {
		t.Fatalf("RateLimit: %d field lines %q, want 1", len(vals), vals)
	}
	out := map[string]stateItem{}
	for _, m := range strings.Split(vals[0], ", ") {
		g := stateRe.FindStringSubmatch(m)
		if g == nil {
			t.Fatalf("RateLimit member %q does not match %s (field %q)", m, stateRe, vals[0])
		}
		r, _ := strconv.ParseInt(g[2], 10, 64)
		tt, _ := strconv.ParseInt(g[3], 10, 64)
		out[g[1]] = stateItem{r, tt}
	}
	return out
}

// remaining returns the r= of policy name (`id/unit`), failing when absent.
func remaining(t testing.TB, r response, name string) int64 {
	t.Helper()
	st := parseState(t, r.header)
	s, ok := st[name]
	if !ok {
		t.Fatalf("RateLimit %q has no %q", r.header.Get("RateLimit"), name)
	}
	return s.r
}

// wantRemaining checks the r= of each named policy, and that no other
// policy is listed.
func wantRemaining(t testing.TB, what string, r response, want map[string]int64) {
	t.Helper()
	st := parseState(t, r.header)
	pol, _ := parsePolicy(t, r.header)
	if len(st) != len(want) || len(pol) != len(want) {
		t.Fatalf("%s: RateLimit %q, RateLimit-Policy %q: want exactly the policies %v",
			what, r.header.Get("RateLimit"), r.header.Get("RateLimit-Policy"), want)
	}
	for name, rem := range want {
		s, ok := st[name]
		if !ok {
			t.Fatalf("%s: RateLimit %q lacks %q", what, r.header.Get("RateLimit"), name)
		}
		if _, ok := pol[name]; !ok {
			t.Fatalf("%s: RateLimit-Policy %q lacks %q", what, r.header.Get("RateLimit-Policy"), name)
		}
		if s.r != rem {
			t.Errorf("%s: %s r=%d, want %d (RateLimit %q)", what, name, s.r, rem, r.header.Get("RateLimit"))
		}
	}
}

// wantNoRateLimitHeaders checks that no rule applied.
func wantNoRateLimitHeaders(t testing.TB, what string, r response) {
	t.Helper()
	for _, name := range []string{"RateLimit-Policy", "RateLimit", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "Retry-After", "Retry-After-Ms"} {
		if v := r.header.Values(name); len(v) > 0 {
			t.Errorf("%s: unexpected %s: %q", what, name, v)
		}
	}
}

// openAIError is OpenAI's (and Azure's) error envelope.
type openAIError struct {
	Error struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    string  `json:"code"`
	} `json:"error"`
}

// decodeStrict decodes a JSON body, failing on trailing data.
func decodeStrict(t testing.TB, what string, b []byte, v any) {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(v); err != nil {
		t.Fatalf("%s: body is not the expected JSON: %v\n%s", what, err, truncate(string(b), 500))
	}
	if dec.More() {
		t.Fatalf("%s: trailing data after the JSON body: %s", what, truncate(string(b), 500))
	}
}

// wantOpenAI429 checks a 429 in OpenAI's shape naming rule and unit. Its
// type is what the unit counts: "tokens" for a tokens_* unit, else
// "requests".
func wantOpenAI429(t testing.TB, what string, r response, rule, unit string) openAIError {
	t.Helper()
	wantStatus(t, what, r, http.StatusTooManyRequests)
	var e openAIError
	decodeStrict(t, what, r.body, &e)
	typ := "requests"
	if strings.HasPrefix(unit, "tokens") {
		typ = "tokens"
	}
	if e.Error.Code != "rate_limit_exceeded" || e.Error.Type != typ || e.Error.Param != nil {
		t.Errorf("%s: error code %q type %q param %v, want rate_limit_exceeded, %s, null", what, e.Error.Code, e.Error.Type, e.Error.Param, typ)
	}
	wantRuleMessage(t, what, e.Error.Message, rule, unit)
	wantRetryAfter(t, what, r)
	return e
}

// wantRuleMessage checks that a refusal names its rule and unit.
func wantRuleMessage(t testing.TB, what, msg, rule, unit string) {
	t.Helper()
	want := fmt.Sprintf("rule %q allows ", rule)
	if !strings.Contains(msg, want) || !strings.Contains(msg, " "+unit) {
		t.Errorf("%s: message %q does not name rule %q and unit %s", what, msg, rule, unit)
	}
}

// wantRetryAfter checks Retry-After (whole seconds ≥ 1) and Retry-After-Ms,
// and that they agree.
func wantRetryAfter(t testing.TB, what string, r response) (secs, ms int64) {
	t.Helper()
	ra, rams := r.header.Get("Retry-After"), r.header.Get("Retry-After-Ms")
	secs, err1 := strconv.ParseInt(ra, 10, 64)
	ms, err2 := strconv.ParseInt(rams, 10, 64)
	if err1 != nil || err2 != nil || secs < 1 || ms < 1 {
		t.Fatalf("%s: Retry-After %q, Retry-After-Ms %q: want positive integers", what, ra, rams)
	}
	if want := (ms + 999) / 1000; secs != want {
		t.Errorf("%s: Retry-After %d disagrees with Retry-After-Ms %d (want %d)", what, secs, ms, want)
	}
	return secs, ms
}

// requestsSince returns the upstream's record from index n on.
func requestsSince(s *fakellm.Server, n int) []fakellm.Received {
	all := s.Requests()
	if n > len(all) {
		return nil
	}
	return all[n:]
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(ctx context.Context, cond func() bool) bool {
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			return cond()
		case <-tick.C:
		}
	}
	return true
}
