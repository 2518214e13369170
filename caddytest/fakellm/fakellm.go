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
package fakellm

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
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
	// 503, as vLLM does when its queue is full. 0 means unlimited.
	MaxConcurrent int

	// RateLimitHeaders makes responses carry the provider's own rate-limit
	// headers (OpenAI/Azure: x-ratelimit-{limit,remaining,reset}-requests
	// and -tokens, reset as a Go duration such as "6m0s" or "20ms";
	// Anthropic: anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset},
	// reset in RFC 3339), and makes 429s carry retry-after (whole seconds)
	// and retry-after-ms in every dialect.
	RateLimitHeaders bool

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
	// request is still being served.
	Status int
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
	seq      atomic.Uint64
	done     chan struct{}

	mu      sync.Mutex
	reqs    []*Received
	total   int
	limited int
	closed  bool
	wg      sync.WaitGroup // handlers in progress, so Close can wait

	hs *http.Server
}

// New returns a Server that is not listening, for mounting its Handler in
// httptest or another mux.
func New(cfg Config) (*Server, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	return &Server{
		cfg:  cfg,
		lim:  newLimiter(cfg),
		done: make(chan struct{}),
	}, nil
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
// chunks, and waits for every handler to return.
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
// refused by the server's own limits (429 or 503).
func (s *Server) Counts() (total, limited int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.total, s.limited
}

// InFlight returns how many requests are being served right now, so tests
// can wait for a cancelled stream to release its slot.
func (s *Server) InFlight() int {
	return int(s.inflight.Load())
}

// Reset forgets recorded requests and counts and refills the rate-limit
// buckets. Requests in flight keep their concurrency slots.
func (s *Server) Reset() {
	s.mu.Lock()
	s.reqs = nil
	s.total, s.limited = 0, 0
	s.mu.Unlock()
	s.lim.reset()
}

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

	// The body is read whole before anything else so that its hash is
	// recorded even for requests that are refused.
	raw, readErr := io.ReadAll(r.Body)
	rec := s.record(r, raw)
	sw := &statusWriter{ResponseWriter: w}
	defer func() { s.finish(rec, sw.code()) }()

	rt := route(r.URL.Path)
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

	if !s.acquire() {
		s.countLimited()
		rt.dialect.writeError(sw, apiError{status: http.StatusServiceUnavailable,
			message: fmt.Sprintf("server busy: %d requests in flight, try again later", s.cfg.MaxConcurrent)})
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
	if s.cfg.RateLimitHeaders {
		c.dialect.setRateLimitHeaders(sw.Header(), dec.snap)
	}
	if !dec.ok {
		s.countLimited()
		if s.cfg.RateLimitHeaders {
			setRetryAfter(sw.Header(), dec.retryAfter)
		}
		c.dialect.writeError(sw, apiError{
			status:     http.StatusTooManyRequests,
			message:    dec.message(),
			limitType:  dec.limitedBy,
			retryAfter: dec.retryAfter,
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

// acquire takes a concurrency slot, reporting false when none is free.
func (s *Server) acquire() bool {
	n := s.inflight.Add(1)
	if s.cfg.MaxConcurrent > 0 && n > int64(s.cfg.MaxConcurrent) {
		s.inflight.Add(-1)
		return false
	}
	return true
}

// record appends r to the log at arrival, so the log is in arrival order
// even when responses finish out of order.
func (s *Server) record(r *http.Request, body []byte) *Received {
	sum := sha256.Sum256(body)
	rec := &Received{
		Method:     r.Method,
		Path:       r.URL.Path,
		RawQuery:   r.URL.RawQuery,
		Header:     r.Header.Clone(),
		BodySHA256: hex.EncodeToString(sum[:]),
		BodyLen:    len(body),
	}
	s.mu.Lock()
	s.reqs = append(s.reqs, rec)
	s.total++
	s.mu.Unlock()
	return rec
}

// finish stores the status rec was answered with. After a Reset rec is no
// longer in the log, and updating it is harmless.
func (s *Server) finish(rec *Received, status int) {
	s.mu.Lock()
	rec.Status = status
	s.mu.Unlock()
}

func (s *Server) countLimited() {
	s.mu.Lock()
	s.limited++
	s.mu.Unlock()
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
