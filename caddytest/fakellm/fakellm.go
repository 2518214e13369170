// Package fakellm is a fake LLM upstream for end-to-end tests and load
// scripts. It stands in for OpenAI, Azure OpenAI, Anthropic, Gemini and
// Ollama, speaking their real wire formats (JSON, SSE and NDJSON
// streaming), and it enforces rate limits of its own so that a proxy in
// front of it can be tested against realistic refusals.
//
// Every request is recorded (method, path, query, headers, body hash and
// the status it got), so tests can assert that a proxy forwarded a request
// byte for byte.
//
// Generated text is deterministic: chunk i (counting from 1) of a response
// is "fake<i>", preceded by a space for every chunk but the first, so a
// three-chunk response reads "fake1 fake2 fake3". Non-streaming responses
// carry the same text as their streaming counterparts.
//
// # Rate-limit and retry headers
//
// Which headers a response carries depends on RateLimitHeaders,
// RetryAfterOnly and NoRetryAfter. "Rate-limit headers" are OpenAI's and
// Azure's x-ratelimit-* and Anthropic's anthropic-ratelimit-*; Gemini and
// Ollama never send any. "Retry headers" are retry-after and
// retry-after-ms, sent in every dialect.
//
//	options                          rate-limit headers on   retry headers on
//	none                             no response             no response
//	RateLimitHeaders                 limiter answers         429s
//	RateLimitHeaders + NoRetryAfter  limiter answers         no response
//	RetryAfterOnly                   no response             429s and busy 503s
//
// "Limiter answers" are the responses of requests that got past routing,
// fault injection and MaxConcurrent to the rate limiter: 2xx, 429, and 400
// for an unreadable body. 404, 405, busy 503s (MaxConcurrent), injected
// 503s (FailRate) and hung requests (HangRate) never carry rate-limit
// headers. Injected 503s never carry retry headers either.
//
// Gemini's 429 body carries a RetryInfo detail whose retryDelay is
// retry-after's figure, "<seconds>s", in every configuration but
// NoRetryAfter, which removes it.
package fakellm

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// Config sets the fake upstream's hidden limits and the shape of its
// answers. The zero value is a server without limits or rate-limit headers.
type Config struct {
	// RPM is the hidden requests-per-minute limit, enforced as a token
	// bucket whose capacity is Burst, refilled continuously at RPM/60
	// per second. 0 means unlimited.
	RPM int
	// Burst is the request bucket's capacity (default: RPM/60 rounded
	// up, at least 1). A small default keeps the limit strict enough that
	// tests can hit it with a handful of requests.
	Burst int

	// TPM is the hidden tokens-per-minute limit, enforced as a token
	// bucket of capacity TPM refilled continuously at TPM/60 per second.
	// Each request is charged its prompt plus completion tokens when it is
	// admitted, as providers reserve capacity up front. 0 means unlimited,
	// in which case no token rate-limit headers are sent.
	TPM int

	// MaxConcurrent caps requests in flight; above it the server answers
	// 503, as vLLM does when its queue is full. 0 means unlimited. A hung
	// request (HangRate) holds a slot until it ends. Server.SetMaxConcurrent
	// changes it at run time.
	MaxConcurrent int

	// RateLimitHeaders makes the answers of requests that reached the rate
	// limiter (2xx, 429, and 400 for an unreadable body) carry the
	// provider's own rate-limit headers (OpenAI/Azure:
	// x-ratelimit-{limit,remaining,reset}-requests and -tokens, reset as a
	// Go duration such as "6m0s" or "20ms"; Anthropic:
	// anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}, reset
	// in RFC 3339; none for Gemini and Ollama), and makes 429s carry
	// retry-after (whole seconds, rounded up, at least 1) and
	// retry-after-ms (milliseconds, rounded up, at least 1) in every
	// dialect. A dimension without a limit (RPM or TPM 0) has no headers.
	// Busy 503s (MaxConcurrent) carry no headers. See the package
	// documentation for how it combines with RetryAfterOnly and
	// NoRetryAfter.
	RateLimitHeaders bool

	// RetryAfterOnly makes the server say when to come back but never how
	// much capacity is left. 429s carry retry-after (the wait until the
	// refused request would be admitted, in whole seconds rounded up, at
	// least 1) and retry-after-ms (the same wait in milliseconds, rounded
	// up, at least 1), in every dialect; busy 503s (MaxConcurrent) carry
	// retry-after: 1 and retry-after-ms: 1000. No response carries
	// x-ratelimit-* or anthropic-ratelimit-* headers, even if
	// RateLimitHeaders is set too, which then makes no difference. Gemini
	// 429 bodies keep their RetryInfo retryDelay. Injected 503s (FailRate)
	// carry no retry headers. It cannot be combined with NoRetryAfter.
	RetryAfterOnly bool

	// NoRetryAfter removes every retry hint from 429s: no retry-after or
	// retry-after-ms header, and no RetryInfo detail in Gemini's 429 body.
	// It is meant for use with RateLimitHeaders, whose rate-limit headers
	// are then still sent on every answer of the limiter, 429s included,
	// so that a client must work the wait out from the reset headers.
	// Without RateLimitHeaders no response has retry headers anyway, and
	// its only effect is on Gemini's 429 body.
	NoRetryAfter bool

	// PromptTokens is the prompt size reported in usage (default:
	// len(body)/4, at least 1).
	PromptTokens int
	// CompletionTokens is the completion size reported in usage
	// (default 10).
	CompletionTokens int

	// StreamChunks is how many content chunks a stream sends (default 3).
	StreamChunks int
	// ChunkDelay is the pause between content chunks (default 0). It is
	// real time, not Now, so that a long delay holds a stream open.
	ChunkDelay time.Duration

	// FailRate is the fraction of requests, from 0 to 1, that fail: they
	// are answered 503 in the dialect's error shape (OpenAI: type
	// "server_error"; Anthropic: "overloaded_error"; Gemini: status
	// "UNAVAILABLE"; Ollama: {"error":...}), with a message containing
	// "injected failure" and no rate-limit or retry headers. A failed
	// request is not charged to the rate limiter, takes no concurrency
	// slot, and counts as refused in Counts. Faults apply to every
	// request, whatever its path or method, before routing.
	FailRate float64
	// HangRate is the fraction of requests, from 0 to 1, that hang: the
	// server reads the body, then holds the request without writing
	// anything until the client goes away or Close is called, and then
	// drops the connection without a response. A hung request counts in
	// InFlight and holds one of MaxConcurrent's slots while it hangs (it is
	// never itself refused for want of one), is not charged to the rate
	// limiter, and its Received.Status stays 0. FailRate+HangRate must not
	// exceed 1.
	HangRate float64
	// Seed seeds the pseudo-random generator that picks the faulty
	// requests. One number in [0,1) is drawn per request, in order of
	// arrival (the order of Requests): below FailRate the request fails;
	// below FailRate+HangRate it hangs. So the same seed gives the same
	// choices for the same sequence of requests, and a request that fails
	// at some FailRate fails at every higher one. 0 is a seed like any
	// other. Reset reseeds.
	Seed uint64

	// Now is the limiter's and timestamps' clock (default time.Now), so
	// tests can drive the limiter without sleeping.
	Now func() time.Time
}

// withDefaults validates c and fills in its defaults.
func (c Config) withDefaults() (Config, error) {
	if c.RPM < 0 || c.Burst < 0 || c.TPM < 0 || c.MaxConcurrent < 0 ||
		c.PromptTokens < 0 || c.CompletionTokens < 0 || c.StreamChunks < 0 ||
		c.ChunkDelay < 0 {
		return c, errors.New("fakellm: negative value in Config")
	}
	for _, r := range []struct {
		name string
		v    float64
	}{{"FailRate", c.FailRate}, {"HangRate", c.HangRate}} {
		if math.IsNaN(r.v) || r.v < 0 || r.v > 1 {
			return c, fmt.Errorf("fakellm: %s %v is not within [0, 1]", r.name, r.v)
		}
	}
	if c.FailRate+c.HangRate > 1+epsilon {
		return c, fmt.Errorf("fakellm: FailRate+HangRate %v exceeds 1", c.FailRate+c.HangRate)
	}
	if c.RetryAfterOnly && c.NoRetryAfter {
		return c, errors.New("fakellm: RetryAfterOnly and NoRetryAfter contradict each other")
	}
	if c.Burst == 0 {
		c.Burst = max(1, (c.RPM+59)/60)
	}
	if c.CompletionTokens == 0 {
		c.CompletionTokens = 10
	}
	if c.StreamChunks == 0 {
		c.StreamChunks = 3
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return c, nil
}

// Received is one recorded request, for byte-for-byte assertions on what a
// proxy forwarded.
type Received struct {
	Method   string
	Path     string
	RawQuery string
	// Header is a copy of the request headers as the server saw them.
	Header http.Header
	// BodySHA256 is the hex SHA-256 of the whole request body.
	BodySHA256 string
	BodyLen    int
	// Status is the status code the server answered with; 0 while the
	// request is still being served, and for good when it hung.
	Status int
	// Arrived is when the request arrived, by Config.Now.
	Arrived time.Time
	// Fault is the fault injected into the request: FaultNone, FaultFail
	// (it was answered 503) or FaultHang (it was never answered).
	Fault Fault
}

// Fault is a fault injected into a request by Config.FailRate or
// Config.HangRate.
type Fault string

// The faults that can be injected.
const (
	FaultNone Fault = ""     // the request was served normally
	FaultFail Fault = "fail" // answered 503 by FailRate
	FaultHang Fault = "hang" // never answered, by HangRate
)

// Stats counts requests by outcome. Total is the sum of the others plus
// the requests still being served that have not hung.
type Stats struct {
	// Total is how many requests arrived.
	Total int
	// OK is how many were answered with a 2xx status, counted once the
	// response is complete (for a stream, when it ends or is aborted).
	OK int
	// Limited is how many were refused 429 by the RPM or TPM limit.
	Limited int
	// Busy is how many were refused 503 by MaxConcurrent.
	Busy int
	// Failed is how many were answered 503 by FailRate.
	Failed int
	// Hung is how many were hung by HangRate, counted on arrival, so
	// including those still hanging.
	Hung int
	// Other is how many were answered with any other status: 400 for a
	// bad body, 404 for an unknown endpoint, 405 for a method other than
	// POST.
	Other int
}

// Server is a running fake upstream. Its methods are safe for concurrent
// use.
type Server struct {
	// URL is the base URL, http://127.0.0.1:port, when the server was
	// started with Start or Listen; empty for one made with New.
	URL string

	cfg      Config
	lim      *limiter
	inflight atomic.Int64
	// handling counts the requests inside the handler, refused ones
	// included, and peak is the most there have been at once.
	handling, peak atomic.Int64
	maxConcurrent  atomic.Int64 // 0 means unlimited
	seq            atomic.Uint64
	done           chan struct{}

	mu     sync.Mutex
	reqs   []*Received
	stats  Stats
	epoch  int        // bumped by Reset, so stale requests are not counted
	rng    *rand.Rand // draws faults, in order of arrival
	closed bool
	wg     sync.WaitGroup // handlers in progress, so Close can wait

	hs *http.Server
}

// New returns a Server that is not listening, for mounting its Handler in
// httptest or another mux.
func New(cfg Config) (*Server, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	s := &Server{
		cfg:  cfg,
		lim:  newLimiter(cfg),
		done: make(chan struct{}),
		rng:  newRand(cfg.Seed),
	}
	s.maxConcurrent.Store(int64(cfg.MaxConcurrent))
	return s, nil
}

// newRand returns the fault generator for seed.
func newRand(seed uint64) *rand.Rand {
	return rand.New(rand.NewPCG(seed, 0x9e3779b97f4a7c15))
}

// Start starts a Server listening on 127.0.0.1 at a free port.
func Start(cfg Config) (*Server, error) {
	return Listen("127.0.0.1:0", cfg)
}

// Listen starts a Server listening on addr, for load scripts that need a
// fixed port.
func Listen(addr string, cfg Config) (*Server, error) {
	s, err := New(cfg)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("fakellm: %w", err)
	}
	s.URL = "http://" + ln.Addr().String()
	s.hs = &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second}
	go s.hs.Serve(ln) //nolint:errcheck // returns ErrServerClosed on Close
	return s, nil
}

// Close stops the listener, aborts streams that are pausing between
// chunks, drops hung requests' connections without a response, and waits
// for every handler to return.
func (s *Server) Close() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	s.mu.Unlock()
	close(s.done)
	if s.hs != nil {
		s.hs.Close()
	}
	s.wg.Wait()
}

// Handler returns the server's HTTP handler. It shares the Server's limits
// and records, so it can be mounted in httptest as well.
func (s *Server) Handler() http.Handler {
	return http.HandlerFunc(s.serveHTTP)
}

// PeakInFlight returns the most requests there have been inside the
// server's handler at once since it started or was Reset, refused ones
// included: what a client that overruns a concurrency cap sends.
func (s *Server) PeakInFlight() int { return int(s.peak.Load()) }

// Requests returns a copy of the recorded requests, in arrival order.
func (s *Server) Requests() []Received {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Received, len(s.reqs))
	for i, r := range s.reqs {
		out[i] = *r
		out[i].Header = r.Header.Clone()
	}
	return out
}

// Counts returns how many requests arrived and how many of them were
// refused by the server's own limits (429 or 503), injected 503s
// (FailRate) included: Stats's Limited+Busy+Failed.
func (s *Server) Counts() (total, limited int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stats.Total, s.stats.Limited + s.stats.Busy + s.stats.Failed
}

// Stats returns the requests counted by outcome since the start or the
// last Reset.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stats
}

// SetLimits changes the hidden limits at run time, with the meaning of
// Config's RPM, Burst and TPM: 0 for rpm or tpm lifts that limit, 0 for
// burst means RPM/60 rounded up, at least 1. A bucket that stays limited
// keeps the tokens it holds, counted up to now at the old rate and
// clamped to the new capacity, so that lowering a limit never refills
// it; from then on it refills at the new rate. A bucket that was unlimited
// starts full. Rate-limit headers report the new limits from the next
// request on. Reset keeps the limits set here. It panics on a negative
// value. It is safe to call while requests are in flight.
func (s *Server) SetLimits(rpm, burst, tpm int) {
	if rpm < 0 || burst < 0 || tpm < 0 {
		panic(fmt.Sprintf("fakellm: SetLimits(%d, %d, %d): negative value", rpm, burst, tpm))
	}
	if burst == 0 {
		burst = max(1, (rpm+59)/60)
	}
	s.lim.setLimits(s.cfg.Now(), rpm, burst, tpm)
}

// SetMaxConcurrent changes MaxConcurrent at run time; 0 lifts the cap. It
// panics on a negative value. Requests in flight keep their slots, so
// after lowering the cap below InFlight, new requests are refused until
// enough of them end.
func (s *Server) SetMaxConcurrent(n int) {
	if n < 0 {
		panic(fmt.Sprintf("fakellm: SetMaxConcurrent(%d): negative value", n))
	}
	s.maxConcurrent.Store(int64(n))
}

// InFlight returns how many requests are being served right now, so tests
// can wait for a cancelled stream to release its slot.
func (s *Server) InFlight() int {
	return int(s.inflight.Load())
}

// Reset forgets recorded requests and counts, refills the rate-limit
// buckets and reseeds the fault generator with Config.Seed. Requests in
// flight keep their concurrency slots, and are not counted when they end.
func (s *Server) Reset() {
	s.mu.Lock()
	s.reqs = nil
	s.stats = Stats{}
	s.epoch++
	s.rng = newRand(s.cfg.Seed)
	s.mu.Unlock()
	s.peak.Store(s.handling.Load())
	s.lim.reset()
}

// outcome is the refusal a request got, for Stats.
type outcome int

const (
	outcomeLimited outcome = iota
	outcomeBusy
	outcomeFailed
)

// serveHTTP records the request, then runs it through routing, the
// concurrency cap and the rate limiter before the dialect answers it.
func (s *Server) serveHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		http.Error(w, "fakellm: server closed", http.StatusServiceUnavailable)
		return
	}
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()
	n := s.handling.Add(1)
	for p := s.peak.Load(); n > p && !s.peak.CompareAndSwap(p, n); p = s.peak.Load() {
	}
	defer s.handling.Add(-1)

	// The body is read whole before anything else so that its hash is
	// recorded even for requests that are refused.
	raw, readErr := io.ReadAll(r.Body)
	rec, epoch := s.record(r, raw)
	sw := &statusWriter{ResponseWriter: w}
	refused := false // counted as a refusal already
	defer func() { s.finish(rec, epoch, sw.code(), refused) }()
	refuse := func(o outcome) {
		refused = true
		s.count(epoch, o)
	}

	rt := route(r.URL.Path)
	switch rec.Fault {
	case FaultFail:
		refuse(outcomeFailed)
		rt.dialect.writeError(sw, apiError{status: http.StatusServiceUnavailable,
			message: "fakellm: injected failure (FailRate), try again later"})
		return
	case FaultHang:
		s.inflight.Add(1)
		defer s.inflight.Add(-1)
		s.hang(r) // never returns
	}

	if rt.op == nil {
		rt.dialect.writeError(sw, apiError{status: http.StatusNotFound,
			message: fmt.Sprintf("Invalid URL (%s %s)", r.Method, r.URL.Path)})
		return
	}
	if r.Method != http.MethodPost {
		sw.Header().Set("Allow", http.MethodPost)
		rt.dialect.writeError(sw, apiError{status: http.StatusMethodNotAllowed,
			message: fmt.Sprintf("method %s not allowed, use POST", r.Method)})
		return
	}

	if limit, ok := s.acquire(); !ok {
		refuse(outcomeBusy)
		if s.cfg.RetryAfterOnly {
			setRetryAfter(sw.Header(), time.Second)
		}
		rt.dialect.writeError(sw, apiError{status: http.StatusServiceUnavailable,
			message: fmt.Sprintf("server busy: %d requests in flight, try again later", limit)})
		return
	}
	defer s.inflight.Add(-1)

	c := &call{
		s:                s,
		w:                sw,
		r:                r,
		dialect:          rt.dialect,
		raw:              raw,
		model:            rt.model,
		now:              s.cfg.Now(),
		promptTokens:     s.cfg.PromptTokens,
		completionTokens: s.cfg.CompletionTokens,
	}
	if c.promptTokens == 0 {
		c.promptTokens = max(1, len(raw)/4)
	}

	dec := s.lim.admit(c.now, c.promptTokens+c.completionTokens)
	if s.cfg.RateLimitHeaders && !s.cfg.RetryAfterOnly {
		c.dialect.setRateLimitHeaders(sw.Header(), dec.snap)
	}
	if !dec.ok {
		refuse(outcomeLimited)
		if (s.cfg.RateLimitHeaders || s.cfg.RetryAfterOnly) && !s.cfg.NoRetryAfter {
			setRetryAfter(sw.Header(), dec.retryAfter)
		}
		c.dialect.writeError(sw, apiError{
			status:     http.StatusTooManyRequests,
			message:    dec.message(),
			limitType:  dec.limitedBy,
			retryAfter: dec.retryAfter,
			retryHint:  !s.cfg.NoRetryAfter,
		})
		return
	}

	if readErr != nil {
		c.dialect.writeError(sw, apiError{status: http.StatusBadRequest,
			message: "could not read request body: " + readErr.Error()})
		return
	}
	if err := c.parse(); err != nil {
		c.dialect.writeError(sw, apiError{status: http.StatusBadRequest,
			message: "We could not parse the JSON body of your request: " + err.Error()})
		return
	}
	rt.op(c)
}

// acquire takes a concurrency slot, reporting false, and the cap, when
// none is free.
func (s *Server) acquire() (limit int64, ok bool) {
	n := s.inflight.Add(1)
	if limit := s.maxConcurrent.Load(); limit > 0 && n > limit {
		s.inflight.Add(-1)
		return limit, false
	}
	return 0, true
}

// hang holds a hung request until its client goes away or the server
// closes, then aborts the handler with http.ErrAbortHandler, so that
// net/http drops the connection (or resets the HTTP/2 stream) without
// logging, rather than answering with an empty 200.
func (s *Server) hang(r *http.Request) {
	select {
	case <-r.Context().Done():
	case <-s.done:
	}
	panic(http.ErrAbortHandler)
}

// record appends r to the log at arrival, so the log is in arrival order
// even when responses finish out of order, and draws its fault, so faults
// are drawn in that same order. It returns the record and the epoch it
// was counted in.
func (s *Server) record(r *http.Request, body []byte) (*Received, int) {
	sum := sha256.Sum256(body)
	rec := &Received{
		Method:     r.Method,
		Path:       r.URL.Path,
		RawQuery:   r.URL.RawQuery,
		Header:     r.Header.Clone(),
		BodySHA256: hex.EncodeToString(sum[:]),
		BodyLen:    len(body),
		Arrived:    s.cfg.Now(),
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	switch u := s.rng.Float64(); {
	case u < s.cfg.FailRate:
		rec.Fault = FaultFail
	case u < s.cfg.FailRate+s.cfg.HangRate:
		rec.Fault = FaultHang
		s.stats.Hung++
	}
	s.reqs = append(s.reqs, rec)
	s.stats.Total++
	return rec, s.epoch
}

// finish stores the status rec was answered with, and counts it unless it
// was counted as a refusal already. A hung request keeps status 0. After a
// Reset rec is no longer in the log, and updating it is harmless.
func (s *Server) finish(rec *Received, epoch, status int, refused bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if rec.Fault == FaultHang {
		return
	}
	rec.Status = status
	if refused || epoch != s.epoch {
		return
	}
	if status >= 200 && status < 300 {
		s.stats.OK++
	} else {
		s.stats.Other++
	}
}

// count counts a refusal, unless a Reset came since the request arrived.
// Refusals are counted before they are written, so a client that got one
// finds it counted.
func (s *Server) count(epoch int, o outcome) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if epoch != s.epoch {
		return
	}
	switch o {
	case outcomeLimited:
		s.stats.Limited++
	case outcomeBusy:
		s.stats.Busy++
	case outcomeFailed:
		s.stats.Failed++
	}
}

// nextID returns a server-unique, deterministic identifier with prefix.
func (s *Server) nextID(prefix string) string {
	return fmt.Sprintf("%s%06d", prefix, s.seq.Add(1))
}

// statusWriter remembers the status code written through it. It exposes
// Flush and Unwrap so streaming still works through it.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(p)
}

// Flush implements http.Flusher for code that type-asserts rather than
// using http.ResponseController.
func (w *statusWriter) Flush() {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	_ = http.NewResponseController(w.ResponseWriter).Flush()
}

// Unwrap lets http.ResponseController reach the underlying writer.
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *statusWriter) code() int {
	if w.status == 0 {
		return http.StatusOK
	}
	return w.status
}
