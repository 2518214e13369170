// Command adaptive measures llm_rate_limit's adaptive mode against
// upstreams whose limits it is not told.
//
// It runs five scenarios. Each one runs twice, each time with a fresh
// caddytest/fakellm upstream and a fresh in-process Caddy in front of it:
//
//	(a) reverse_proxy alone;
//	(b) llm_rate_limit with an adaptive block and no limit at all, then
//	    reverse_proxy.
//
// In both, the clients retry as the OpenAI SDK does (see sdkCall). The
// scenarios:
//
//	headers      a hidden 120 RPM upstream (burst 10) that sends
//	             x-ratelimit-* headers, and retry-after on its 429s;
//	             open-loop Poisson arrivals at -rate (1.5) times the limit
//	             from 20 users, non-streamed.
//	retry-after  the same, but its 429s say only retry-after.
//	no-headers   an upstream that answers 503 above 4 requests in flight,
//	             with no header at all, no rate limit, slow streamed
//	             answers; 12 closed-loop workers from 3 users.
//	halving      retry-after, and at half the duration the upstream's
//	             limit halves (60 RPM, burst 5) while arrivals go on.
//	faults       headers, plus 5 % injected 503s and 2 % hung requests;
//	             (b) bounds each attempt with attempt_timeout 2s.
//
// Run it from the repository root:
//
//	go run ./bench/adaptive -duration 30s            # all five scenarios
//	go run ./bench/adaptive -scenario halving -duration 60s
//	go run ./bench/adaptive -config-only             # print (b)'s Caddyfiles
//
// Everything listens on 127.0.0.1 at free ports. Every loop is bounded in
// time and count: arrival loops and closed-loop workers by -duration and a
// hard cap on iterations, each attempt by -timeout, each client's retries
// by the SDK's count, and the wait for the requests still in flight (or
// queued) after the load stops by the longest a request can take.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/llmratelimit/caddy-llm-ratelimit"
	"github.com/llmratelimit/caddy-llm-ratelimit/bench/internal/rig"
	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
)

// The rate-limited upstream of headers, retry-after, halving and faults.
const (
	upstreamRPM   = 120 // fakellm's hidden limit
	upstreamBurst = 10  // … and its burst: a per-minute limit enforced over seconds
	halvedRPM     = 60  // halving: the limit from the middle of the run on
	halvedBurst   = 5
)

// The concurrency-limited upstream of no-headers.
const (
	gpuSlots     = 4 // fakellm's MaxConcurrent
	streamChunks = 5
	chunkDelay   = 50 * time.Millisecond
	// serviceTime is how long one streamed answer holds an upstream slot:
	// fakellm pauses before every chunk but the first.
	serviceTime = (streamChunks - 1) * chunkDelay
)

// The faults scenario.
const (
	failRate = 0.05 // injected 503s, without any header
	hangRate = 0.02 // requests fakellm never answers
	// attemptTimeout is (b)'s attempt_timeout in faults.
	attemptTimeout = 2 * time.Second
)

// The module's side.
const (
	attemptsHeader = "X-Upstream-Attempts"
	// moduleMaxWait is the module's default max_wait: without a queue
	// block, adaptive mode bounds a request's whole wait, in the queue and
	// between its attempts, by it.
	moduleMaxWait = 30 * time.Second
)

// The load.
const (
	rateUsers   = 20 // open-loop users, u0 … u19, drawn at random per request
	concWorkers = 12 // no-headers: closed-loop workers …
	concUsers   = 3  // … spread over this many users, c0 … c2
	// retryGap is the least time between the starts of two requests of a
	// closed-loop worker after one that failed (after the SDK's own
	// retries). It keeps a worker from spinning.
	retryGap = 10 * time.Millisecond
	// maxInflight bounds the open-loop requests in flight; an arrival
	// above it is dropped (and counted).
	maxInflight = 2000
)

// The OpenAI SDK's retry policy (openai-python's _base_client: max_retries
// 2, INITIAL_RETRY_DELAY 0.5, MAX_RETRY_DELAY 8.0, a retry-after taken as
// is when 0 < it ≤ 60 s).
const (
	sdkMaxRetries    = 2
	sdkInitialDelay  = 500 * time.Millisecond
	sdkMaxDelay      = 8 * time.Second
	sdkMaxRetryAfter = 60 * time.Second
)

// Goals, checked on (b).
const (
	goalMax429Share     = 0.01 // client requests whose final answer is a 429
	goalMaxRefusalShare = 0.02 // upstream refusals ÷ attempts it received
	goalMinShareUsed    = 0.95 // share of the upstream's limit used
)

// options are the command-line flags.
type options struct {
	scenario   string
	duration   time.Duration // length of the load phase, per run
	seed       uint64        // seed of every random schedule, of the SDK's jitter and of fakellm's faults
	timeout    time.Duration // the client's per-attempt timeout
	rate       float64       // arrivals as a multiple of the upstream's 120 RPM
	configOnly bool
	verbose    bool
}

func main() {
	var o options
	flag.StringVar(&o.scenario, "scenario", "all", "headers, retry-after, no-headers, halving, faults or all")
	flag.DurationVar(&o.duration, "duration", 30*time.Second, "how long the load runs, per scenario and configuration")
	flag.Uint64Var(&o.seed, "seed", 1, "seed of the random schedules, the clients' jitter and fakellm's faults (the same for (a) and (b))")
	flag.DurationVar(&o.timeout, "timeout", 60*time.Second, fmt.Sprintf("the client's timeout for one attempt (the SDK's timeout); at least the module's max_wait (%s) + 5s", moduleMaxWait))
	flag.Float64Var(&o.rate, "rate", 1.5, "open-loop arrivals as a multiple of the upstream's 120 RPM")
	flag.BoolVar(&o.configOnly, "config-only", false, "print the (b) Caddyfiles, say whether each adapts, and exit")
	flag.BoolVar(&o.verbose, "v", false, "show Caddy's logs on stderr")
	flag.Parse()
	if err := o.validate(); err != nil {
		fmt.Fprintln(os.Stderr, "adaptive:", err)
		os.Exit(2)
	}

	selected := rig.Select(scenarios(), o.scenario, func(s *scenario) string { return s.name })
	if o.configOnly {
		printConfigs(os.Stdout, o, selected)
		return
	}

	rig.PrintIntro(os.Stdout, "adaptive")
	goroutines := runtime.NumGoroutine()
	failed := false
	for _, s := range selected {
		var rs [2]*result
		for i, limiter := range []bool{false, true} {
			before := runtime.NumGoroutine()
			r := runConfig(s, limiter, o)
			r.goroutinesBefore, r.goroutinesAfter = before, rig.SettleGoroutines(before)
			if r.err != nil {
				// Say it at once, on stderr, and again in the report.
				fmt.Fprintf(os.Stderr, "adaptive: %s %s: %v\n", s.name, r.label, r.err)
				failed = true
			}
			rs[i] = r
		}
		report(os.Stdout, o, s, rs[0], rs[1])
	}
	rig.PrintEnd(os.Stdout, goroutines)
	if failed {
		os.Exit(1)
	}
}

func (o options) validate() error {
	switch {
	case o.scenario != "all" && !slices.ContainsFunc(scenarios(), func(s *scenario) bool { return s.name == o.scenario }):
		return errors.New("-scenario must be headers, retry-after, no-headers, halving, faults or all")
	case o.duration < time.Second || o.duration > time.Hour:
		return errors.New("-duration must be in [1s, 1h]")
	case o.timeout < moduleMaxWait+5*time.Second || o.timeout > 10*time.Minute:
		return fmt.Errorf("-timeout must be in [%s, 10m]: in (b) a request may wait max_wait (%s) in the module, then be served", moduleMaxWait+5*time.Second, moduleMaxWait)
	case !(o.rate > 0) || o.rate > 100:
		return errors.New("-rate must be in (0, 100]")
	}
	return nil
}

// scenario is one measured situation: the upstream, (b)'s adaptive block
// and the load.
type scenario struct {
	name     string
	upstream func(o options) fakellm.Config
	// attemptTimeout adds attempt_timeout to (b)'s adaptive block.
	attemptTimeout bool
	// slots is true for the concurrency-limited upstream (closed loop);
	// false for the rate-limited one (open loop).
	slots bool
	// halving halves the upstream's limit in the middle of the run.
	halving bool
}

func scenarios() []*scenario {
	return []*scenario{
		{name: "headers", upstream: headersUpstream},
		{name: "retry-after", upstream: retryAfterUpstream},
		{name: "no-headers", upstream: slotUpstream, slots: true},
		{name: "halving", upstream: retryAfterUpstream, halving: true},
		{name: "faults", upstream: faultyUpstream, attemptTimeout: true},
	}
}

// headersUpstream is fakellm with a hidden 120 RPM limit and a burst of 10
// (providers enforce a per-minute limit over much shorter periods), which
// says what is left in x-ratelimit-* headers and when to come back in
// retry-after and retry-after-ms on its 429s.
func headersUpstream(options) fakellm.Config {
	return fakellm.Config{RPM: upstreamRPM, Burst: upstreamBurst, RateLimitHeaders: true}
}

// retryAfterUpstream has the same limit, and says only retry-after (and
// retry-after-ms) on its 429s, never what is left.
func retryAfterUpstream(options) fakellm.Config {
	return fakellm.Config{RPM: upstreamRPM, Burst: upstreamBurst, RetryAfterOnly: true}
}

// slotUpstream answers 503 above gpuSlots requests in flight, with no
// header, as vLLM does when its queue is full, and holds each slot for
// serviceTime by streaming slowly: fakellm has no delay for non-streamed
// answers.
func slotUpstream(options) fakellm.Config {
	return fakellm.Config{MaxConcurrent: gpuSlots, StreamChunks: streamChunks, ChunkDelay: chunkDelay}
}

// faultyUpstream is headersUpstream that also fails and hangs some
// requests, drawn from -seed in order of arrival.
func faultyUpstream(o options) fakellm.Config {
	c := headersUpstream(o)
	c.FailRate, c.HangRate, c.Seed = failRate, hangRate, o.seed
	return c
}

// limiterBlock is (b)'s llm_rate_limit block: an identity, adaptive mode,
// and no limit at all.
func limiterBlock(s *scenario) string {
	timeout := ""
	if s.attemptTimeout {
		timeout = fmt.Sprintf("\t\t\tattempt_timeout %s\n", attemptTimeout)
	}
	return "\tllm_rate_limit {\n" +
		"\t\tuser {http.request.header.X-User}\n" +
		"\t\tadaptive {\n" +
		fmt.Sprintf("\t\t\tattempts_header %s\n", attemptsHeader) +
		timeout +
		"\t\t}\n" +
		"\t}\n"
}

// printConfigs prints every selected scenario's (b) Caddyfile and whether
// it adapts, with placeholder ports.
func printConfigs(w io.Writer, o options, selected []*scenario) {
	for _, s := range selected {
		rig.PrintConfig(w, s.name+" (b)", limiterBlock(s), o.verbose, "does NOT adapt")
	}
}

// outcome is one client request: its SDK call, with every retry.
type outcome struct {
	user     string
	at       time.Duration // when the first attempt started, since the start of the load
	attempts int           // HTTP attempts the client made, 1 + its retries
	timeouts int           // … of which ended by the client's -timeout
	// finalTimedOut is true when the last attempt ended by -timeout.
	finalTimedOut bool
	// status is the final answer's status; 0 when the final attempt got
	// no answer (a connection error or a time-out).
	status int
	ok     bool   // a 2xx, and for a stream a complete one
	errMsg string // why the final attempt failed, when it did
	// upstream429 is true when the final 429 is fakellm's own, passed on
	// (its wording, "Rate limit reached for").
	upstream429 bool
	lat         time.Duration // from the first attempt's start to the end of the last
	end         time.Time
	// upAttempts is the final answer's X-Upstream-Attempts; 0 when absent.
	upAttempts int
}

// result is what one configuration of one scenario measured.
type result struct {
	label string
	err   error // the run did not happen (e.g. (b) does not adapt)

	outs     []outcome
	start    time.Time
	window   time.Duration // how long the load ran
	switchAt time.Duration // halving: when the limit halved, since start
	drained  bool          // everything finished within the drain bound
	// The open-loop arrivals the schedule produced, those not sent
	// because maxInflight were in flight, and the arrival loop's worst lag.
	rig.Arrivals

	up         fakellm.Stats      // fakellm's Stats() after the load
	upInflight int                // fakellm's InFlight() after the load
	upRecs     []fakellm.Received // fakellm's record, in order of arrival
	upPeak     int

	goroutinesBefore, goroutinesAfter int
}

func (r *result) ran() bool { return r != nil && r.err == nil }

// loadEnv is what a scenario's load needs; record is safe for concurrent use.
type loadEnv struct {
	o      options
	client *http.Client
	url    string
	res    *result
	stack  *rig.Stack
	mu     sync.Mutex // guards res.outs
	// deadline is when the load stops starting requests.
	deadline time.Time
}

func (e *loadEnv) record(out outcome) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.res.outs = append(e.res.outs, out)
}

// maxRequestTime is the longest one client request can take: every attempt
// timing out, and the longest wait the SDK takes between them.
func maxRequestTime(o options) time.Duration {
	return (sdkMaxRetries+1)*o.timeout + sdkMaxRetries*sdkMaxRetryAfter
}

// runConfig starts a fresh fakellm and a fresh in-process Caddy, runs the
// scenario's load through them and stops both. A configuration that does
// not adapt or load is reported in the result, not fatal.
func runConfig(s *scenario, limiter bool, o options) *result {
	res := &result{label: "(a) reverse_proxy"}
	block := ""
	if limiter {
		res.label = "(b) llm_rate_limit adaptive"
		block = limiterBlock(s)
	}
	fmt.Fprintf(os.Stderr, "running %s %s for %s ...\n", s.name, res.label, o.duration)

	stack, err := rig.Start("adaptive", s.upstream(o), block, o.verbose)
	if err != nil {
		res.err = err
		return res
	}
	defer stack.Close()

	// One keep-alive connection per request in flight: over HTTP/1.1 a
	// request the module holds keeps its connection.
	tr := rig.Transport(maxInflight)
	defer tr.CloseIdleConnections()
	env := &loadEnv{
		o:      o,
		client: &http.Client{Transport: tr}, // each attempt has its own timeout
		url:    stack.URL,
		res:    res,
		stack:  stack,
	}
	// ctx ends after the longest a request can take: it only aborts
	// stragglers if something is badly wrong.
	ctx, cancel := context.WithTimeout(context.Background(), o.duration+maxRequestTime(o)+10*time.Second)
	defer cancel()

	res.start = time.Now()
	env.deadline = res.start.Add(o.duration)
	var wg sync.WaitGroup
	if s.slots {
		closedLoopLoad(ctx, env, &wg)
	} else {
		openLoopLoad(ctx, env, &wg, s.halving)
	}
	// Wait at most the longest a request can take, once the load has
	// started its last request (closed loop: its workers): each attempt
	// has its own timeout and the SDK a bounded number of them.
	res.drained = rig.Drain(ctx, cancel, &wg, maxRequestTime(o)+5*time.Second)
	res.window = o.duration

	res.up = stack.Fake.Stats()
	res.upInflight = stack.Fake.InFlight()
	res.upRecs = stack.Fake.Requests()
	res.upPeak = stack.Fake.PeakInFlight()
	return res
}

// answer is what one HTTP attempt got.
type answer struct {
	status   int         // 0 when there was no response
	header   http.Header // nil when there was no response
	body     []byte
	err      error // transport error, time-out, or a body cut short
	timedOut bool  // ended by the attempt's -timeout
}

// attempt sends one HTTP request, bounded by the client's -timeout, and
// reads its whole answer.
func attempt(ctx context.Context, e *loadEnv, body []byte, user string, retryCount int) answer {
	actx, cancel := context.WithTimeout(ctx, e.o.timeout)
	defer cancel()
	req := rig.NewPost(actx, e.url, body)
	req.Header.Set("X-User", user)
	req.Header.Set("X-Stainless-Retry-Count", strconv.Itoa(retryCount)) // as the SDK does
	var a answer
	resp, raw, err := rig.Do(e.client, req)
	if resp != nil {
		a.status, a.header = resp.StatusCode, resp.Header
	}
	a.body, a.err = raw, err
	a.timedOut = err != nil && errors.Is(actx.Err(), context.DeadlineExceeded) && ctx.Err() == nil
	return a
}

// sdkCall makes one client request as the OpenAI SDK (openai-python)
// does: on 408, 409, 429, any 5xx, a connection error or a time-out it
// tries again, at most sdkMaxRetries times (x-should-retry overrides the
// status either way). Between attempts it waits the answer's
// retry-after-ms, else retry-after (seconds or an HTTP date), when that is
// above 0 and at most 60 s, without jitter; otherwise 0.5 s × 2^k (k = 0
// before the first retry), at most 8 s, times a jitter in (0.75, 1]. A
// stream that breaks after a 2xx began is not retried, as in the SDK;
// a non-streamed body cut short is, as a connection error.
func sdkCall(ctx context.Context, e *loadEnv, body []byte, stream bool, user string, rng *rand.Rand) outcome {
	t0 := time.Now()
	out := outcome{user: user, at: t0.Sub(e.res.start)}
	var a answer
	for retry := 0; ; retry++ {
		a = attempt(ctx, e, body, user, retry)
		out.attempts++
		if a.timedOut {
			out.timeouts++
		}
		if retry >= sdkMaxRetries || ctx.Err() != nil || !shouldRetry(a, stream) {
			break
		}
		if !rig.SleepUntil(ctx, time.Now().Add(retryDelay(a.header, retry, rng))) {
			break
		}
	}
	out.end = time.Now()
	out.lat = out.end.Sub(t0)
	out.finalTimedOut = a.timedOut
	if a.header != nil {
		out.status = a.status
		out.upAttempts, _ = strconv.Atoi(a.header.Get(attemptsHeader))
	}
	switch {
	case a.err != nil:
		out.errMsg = a.err.Error()
	case a.status/100 == 2 && stream && !bytes.Contains(a.body, []byte("data: [DONE]")):
		out.errMsg = "a 2xx stream ended before [DONE]"
	case a.status/100 == 2:
		out.ok = true
	case a.status == http.StatusTooManyRequests:
		out.upstream429 = bytes.Contains(a.body, []byte("Rate limit reached for")) // fakellm's wording
	default:
		out.errMsg = fmt.Sprintf("status %d: %.200s", a.status, a.body)
	}
	return out
}

// shouldRetry is the SDK's _should_retry, plus its retry of connection
// errors and time-outs.
func shouldRetry(a answer, stream bool) bool {
	if a.header == nil {
		return true // no response: a connection error or a time-out
	}
	if a.err != nil {
		// The body broke: the SDK retries it for a non-streamed answer,
		// read within its retry loop, and not for a stream that began.
		return !stream || a.status/100 != 2
	}
	switch strings.ToLower(a.header.Get("X-Should-Retry")) {
	case "true":
		return true
	case "false":
		return false
	}
	s := a.status
	return s == http.StatusRequestTimeout || s == http.StatusConflict || s == http.StatusTooManyRequests || s >= 500
}

// retryDelay is the SDK's _calculate_retry_timeout before retry number
// retry+1.
func retryDelay(h http.Header, retry int, rng *rand.Rand) time.Duration {
	if d, ok := retryAfter(h); ok && d > 0 && d <= sdkMaxRetryAfter {
		return d
	}
	d := min(time.Duration(float64(sdkInitialDelay)*math.Pow(2, float64(retry))), sdkMaxDelay)
	return time.Duration(float64(d) * (1 - 0.25*rng.Float64()))
}

// retryAfter parses retry-after-ms, else retry-after, as the SDK does.
func retryAfter(h http.Header) (time.Duration, bool) {
	if h == nil {
		return 0, false
	}
	if v, err := strconv.ParseFloat(strings.TrimSpace(h.Get("Retry-After-Ms")), 64); err == nil && !math.IsNaN(v) && !math.IsInf(v, 0) {
		return time.Duration(v * float64(time.Millisecond)), true
	}
	ra := strings.TrimSpace(h.Get("Retry-After"))
	if v, err := strconv.ParseFloat(ra, 64); err == nil && !math.IsNaN(v) && !math.IsInf(v, 0) {
		return time.Duration(v * float64(time.Second)), true
	}
	if t, err := http.ParseTime(ra); err == nil {
		return time.Until(t), true
	}
	return 0, false
}

// Streams of random numbers.
const (
	// streamArrivals draws the open-loop schedule and its users: the same
	// stream as bench/queue's overload, so that at the same -seed, -rate
	// and -duration both programs send the same arrivals.
	streamArrivals = 0x6f76_6572_6c6f_6164
	streamJitter   = 0x6a69_7474_6572_0000 // + arrival or worker number: the SDK's jitter
)

// openLoopLoad sends open-loop Poisson arrivals at -rate × 2 req/s from
// rateUsers users until the deadline, each an SDK call of its own, and
// returns without waiting for them; wg tracks them. With halving, it
// halves the upstream's limit at half the duration.
func openLoopLoad(ctx context.Context, e *loadEnv, wg *sync.WaitGroup, halving bool) {
	if halving {
		wg.Go(func() {
			if rig.SleepUntil(ctx, e.res.start.Add(e.o.duration/2)) {
				e.stack.Fake.SetLimits(halvedRPM, halvedBurst, 0)
				e.mu.Lock()
				e.res.switchAt = time.Since(e.res.start)
				e.mu.Unlock()
			}
		})
	}
	rng := rig.RNG(e.o.seed, streamArrivals)
	body := rig.ChatBody(false)
	p := rig.Poisson{RNG: rng, Rate: e.o.rate * upstreamRPM / 60, Start: e.res.start, Deadline: e.deadline, MaxInflight: maxInflight}
	a := p.Run(ctx, wg, func(i int) func() {
		u := fmt.Sprintf("u%d", rng.IntN(rateUsers)) // drawn even if dropped, so the schedule stays the same
		jitter := rig.RNG(e.o.seed, streamJitter+uint64(i))
		return func() { e.record(sdkCall(ctx, e, body, false, u, jitter)) }
	})
	e.mu.Lock()
	e.res.Add(a)
	e.mu.Unlock()
}

// closedLoopLoad starts concWorkers workers from concUsers users on wg,
// each sending streamed SDK calls one after the other until the deadline:
// the next as soon as the previous ends after a 2xx, and no sooner than
// retryGap after the previous one started otherwise.
func closedLoopLoad(ctx context.Context, e *loadEnv, wg *sync.WaitGroup) {
	body := rig.ChatBody(true)
	for i := range concWorkers {
		user := fmt.Sprintf("c%d", i%concUsers)
		jitter := rig.RNG(e.o.seed, streamJitter+uint64(i))
		wg.Go(func() {
			rig.ClosedLoop(ctx, e.res.start, e.deadline, retryGap, func() bool {
				out := sdkCall(ctx, e, body, true, user, jitter)
				e.record(out)
				return out.ok
			})
		})
	}
}

// counts are client outcomes over some subset of the requests.
type counts struct {
	requests, attempts, timeouts int
	ok, r429, r429up             int
	other, errs                  int             // final non-2xx, non-429 statuses; final failures without a (complete) answer
	timedOutFinal                int             // requests whose last attempt timed out
	lat                          []time.Duration // of the 2xx, sorted
	maxLatAll                    time.Duration   // of every call, whatever its end
	lastOKEnd                    time.Time
	upAttempts                   [5]int      // X-Upstream-Attempts none, 1, 2, 3, 4+
	statuses                     map[int]int // final statuses other than 2xx and 429
	firstErrMsg                  string
}

func (r *result) counts(keep func(o *outcome) bool) counts {
	c := counts{statuses: map[int]int{}}
	for i := range r.outs {
		o := &r.outs[i]
		if keep != nil && !keep(o) {
			continue
		}
		c.requests++
		c.attempts += o.attempts
		c.timeouts += o.timeouts
		if o.finalTimedOut {
			c.timedOutFinal++
		}
		switch {
		case o.ok:
			c.ok++
			c.lat = append(c.lat, o.lat)
			if o.end.After(c.lastOKEnd) {
				c.lastOKEnd = o.end
			}
		case o.status == http.StatusTooManyRequests:
			c.r429++
			if o.upstream429 {
				c.r429up++
			}
		case o.status == 0 || o.status/100 == 2: // no answer, or a broken stream
			c.errs++
		default:
			c.other++
			c.statuses[o.status]++
		}
		if !o.ok && o.status != http.StatusTooManyRequests && c.firstErrMsg == "" {
			c.firstErrMsg = o.errMsg
		}
		c.upAttempts[min(o.upAttempts, 4)]++
		c.maxLatAll = max(c.maxLatAll, o.lat)
	}
	slices.Sort(c.lat)
	return c
}

func (r *result) total() counts { return r.counts(nil) }

// statusList is "503×56, 499×2" for the final other statuses, "–" when none.
func (c counts) statusList() string {
	if len(c.statuses) == 0 {
		return "–"
	}
	var parts []string
	for _, st := range slices.Sorted(maps.Keys(c.statuses)) {
		parts = append(parts, fmt.Sprintf("%d×%d", st, c.statuses[st]))
	}
	return strings.Join(parts, ", ")
}

// refusals are the upstream's refusals: fakellm's Limited+Busy+Failed.
func (r *result) refusals() int { return r.up.Limited + r.up.Busy + r.up.Failed }

// lastOKArrival is when the last request the upstream accepted (2xx)
// arrived, since start; 0 when none was.
func (r *result) lastOKArrival() time.Duration {
	for i := len(r.upRecs) - 1; i >= 0; i-- {
		if r.upRecs[i].Status/100 == 2 {
			return r.upRecs[i].Arrived.Sub(r.start)
		}
	}
	return 0
}

// span is the D of the share-used definition: the load window, extended
// to the arrival at the upstream of the last request it accepted when that
// came later (requests held or retried after the load stopped).
func (r *result) span() time.Duration { return max(r.window, r.lastOKArrival()) }

// up2xx counts the requests the upstream accepted that arrived in
// [from, to), since start.
func (r *result) up2xx(from, to time.Duration) int {
	n := 0
	for _, q := range r.upRecs {
		if at := q.Arrived.Sub(r.start); q.Status/100 == 2 && at >= from && at < to {
			n++
		}
	}
	return n
}

// upIn counts the requests that reached the upstream in [from, to), and
// how many of them it refused (429 or 503).
func (r *result) upIn(from, to time.Duration) (total, refused int) {
	for _, q := range r.upRecs {
		if at := q.Arrived.Sub(r.start); at >= from && at < to {
			total++
			if q.Status == http.StatusTooManyRequests || q.Status == http.StatusServiceUnavailable {
				refused++
			}
		}
	}
	return total, refused
}

// capacity is the requests the 120 RPM upstream could accept over span:
// its bucket starts full and refills at RPM/60 per second.
func (r *result) capacity() float64 {
	return upstreamBurst + float64(upstreamRPM)/60*r.span().Seconds()
}

// shareUsed is upstream 2xx ÷ capacity, for the rate scenarios but halving.
func (r *result) shareUsed() float64 {
	return float64(r.up2xx(-time.Hour, time.Hour*24)) / r.capacity()
}

// halves are halving's capacities and uses: the first half from the start
// to the switch at the old limit, the second from the switch to the end of
// span at the new one.
type halves struct {
	cap1, cap2 float64
	ok1, ok2   int
	carried    float64 // tokens fakellm's bucket held at the switch, clamped to the new burst
}

func (r *result) halves() halves {
	sw := r.switchPoint()
	var h halves
	h.ok1 = r.up2xx(-time.Hour, sw)
	h.ok2 = r.up2xx(sw, 24*time.Hour)
	h.cap1 = upstreamBurst + float64(upstreamRPM)/60*sw.Seconds()
	h.carried = r.tokensAt(sw)
	h.cap2 = h.carried + float64(halvedRPM)/60*(r.span()-sw).Seconds()
	return h
}

// switchPoint is when the limit halved, since start; half the window if
// it never did (a note says so).
func (r *result) switchPoint() time.Duration {
	if r.switchAt == 0 {
		return r.window / 2
	}
	return r.switchAt
}

// half returns the bounds, since start, of halving's half i (0 or 1).
func (r *result) half(i int) (from, to time.Duration) {
	if i == 0 {
		return -time.Hour, r.switchPoint()
	}
	return r.switchPoint(), 24 * time.Hour
}

// tokensAt replays fakellm's request bucket over the accepted arrivals
// before sw, as the wrapper timed them, and returns what it held at sw,
// clamped to the halved burst as SetLimits does. A bucket never used
// starts full at the new burst.
func (r *result) tokensAt(sw time.Duration) float64 {
	const rate = float64(upstreamRPM) / 60
	tokens := float64(upstreamBurst)
	var last time.Time
	for _, q := range r.upRecs {
		if q.Status/100 != 2 || q.Arrived.Sub(r.start) >= sw {
			continue
		}
		if !last.IsZero() {
			tokens = math.Min(upstreamBurst, tokens+q.Arrived.Sub(last).Seconds()*rate)
		}
		tokens--
		last = q.Arrived
	}
	if last.IsZero() {
		return halvedBurst
	}
	tokens = math.Min(upstreamBurst, tokens+r.start.Add(sw).Sub(last).Seconds()*rate)
	return math.Max(0, math.Min(halvedBurst, tokens))
}

// throughput is complete 2xx per second, from the start of the load to the
// end of the last 2xx.
func (r *result) throughput() float64 {
	c := r.total()
	if c.ok == 0 {
		return 0
	}
	return float64(c.ok) / c.lastOKEnd.Sub(r.start).Seconds()
}

// newTable starts a table with one column per result; a result that did
// not run has a note in every cell instead of figures.
func newTable(w io.Writer, rs []*result) *rig.Columns[*result] {
	return rig.NewColumns(w, rs, func(r *result) string { return r.label }, func(r *result) string {
		if r.err != nil {
			return "did not run"
		}
		return ""
	})
}

func ratio(n, of int) float64 { return float64(n) / math.Max(1, float64(of)) }

func secs(d time.Duration) string { return fmt.Sprintf("%.1f s", d.Seconds()) }

// params describes a scenario's upstream, (b) and load.
func params(o options, s *scenario) string {
	b := "Configuration (b): llm_rate_limit { user {http.request.header.X-User}; adaptive { attempts_header " + attemptsHeader
	if s.attemptTimeout {
		b += "; attempt_timeout " + attemptTimeout.String()
	}
	b += " } }, no limit; (a): reverse_proxy alone."
	client := fmt.Sprintf("Clients retry like the OpenAI SDK (≤ %d retries; retry-after-ms/retry-after when in (0, 60 s], else 0.5 s·2^k with jitter), %s per attempt.", sdkMaxRetries, o.timeout)
	lambda := o.rate * upstreamRPM / 60
	load := fmt.Sprintf("Open-loop Poisson arrivals at %.2f req/s (%.2g× the %d RPM limit) from %d users for %s, seed %d; non-streamed.",
		lambda, o.rate, upstreamRPM, rateUsers, o.duration, o.seed)
	var up string
	switch s.name {
	case "headers":
		up = fmt.Sprintf("Upstream: %d RPM, burst %d, x-ratelimit-* on its answers, retry-after(-ms) on its 429s.", upstreamRPM, upstreamBurst)
	case "retry-after":
		up = fmt.Sprintf("Upstream: %d RPM, burst %d, only retry-after(-ms) on its 429s, no x-ratelimit-*.", upstreamRPM, upstreamBurst)
	case "no-headers":
		up = fmt.Sprintf("Upstream: 503 above %d in flight with no header, no rate limit, streams of %d chunks %s apart (%s per answer; at most %.1f answers/s).",
			gpuSlots, streamChunks, chunkDelay, serviceTime, float64(gpuSlots)/serviceTime.Seconds())
		load = fmt.Sprintf("%d closed-loop workers from %d users (at most one call per %s after a failed one) for %s, seed %d; streamed.",
			concWorkers, concUsers, retryGap, o.duration, o.seed)
	case "halving":
		up = fmt.Sprintf("Upstream: %d RPM, burst %d, only retry-after(-ms) on its 429s; at %s SetLimits(%d, %d, 0): the limit halves, arrivals go on (%.2g× the new limit).",
			upstreamRPM, upstreamBurst, o.duration/2, halvedRPM, halvedBurst, lambda/(float64(halvedRPM)/60))
	case "faults":
		up = fmt.Sprintf("Upstream: %d RPM, burst %d, x-ratelimit-* and retry-after(-ms) as in headers, plus FailRate %.2g (503 without headers) and HangRate %.2g (never answered), seed %d.",
			upstreamRPM, upstreamBurst, failRate, hangRate, o.seed)
	}
	return up + "\n" + b + "\n" + client + "\n" + load
}

// runNotes prints, for each result, why it did not run, or the sanity
// checks that failed.
func runNotes(w io.Writer, s *scenario, rs ...*result) {
	for _, r := range rs {
		if r.err != nil {
			fmt.Fprintf(w, "%s did not run: %v\n", r.label, r.err)
			continue
		}
		var notes []string
		c := r.total()
		if !r.drained {
			notes = append(notes, "some requests were still in flight after the drain bound")
		}
		u := r.up
		if hung := u.Total - (u.OK + u.Limited + u.Busy + u.Failed + u.Other); hung != u.Hung {
			notes = append(notes, fmt.Sprintf("fakellm's Stats() do not add up: %d requests, %d accounted for but %d hung", u.Total, u.Total-hung, u.Hung))
		}
		if u.OK != c.ok {
			notes = append(notes, fmt.Sprintf("the upstream accepted %d requests but the clients saw %d complete 2xx", u.OK, c.ok))
		}
		if s.halving && r.switchAt == 0 {
			notes = append(notes, "the limit never halved")
		}
		if c.errs > 0 || c.other > 0 {
			notes = append(notes, fmt.Sprintf("%d final errors and %d final other statuses, the first: %s", c.errs, c.other, c.firstErrMsg))
		}
		if len(notes) > 0 {
			fmt.Fprintf(w, "%s: %s.\n", r.label, strings.Join(notes, "; "))
		}
	}
}

func report(w io.Writer, o options, s *scenario, a, b *result) {
	rig.Header(w, s.name, params(o, s))
	rs := []*result{a, b}
	t := newTable(w, rs)
	t.Line("client requests", func(r *result) string { return fmt.Sprint(r.total().requests) })
	if !s.slots {
		t.Line("  dropped by the load generator", func(r *result) string { return fmt.Sprint(r.Dropped) })
	}
	t.Line("client HTTP attempts (with SDK retries)", func(r *result) string { return fmt.Sprint(r.total().attempts) })
	t.Line("final 2xx", func(r *result) string { c := r.total(); return fmt.Sprintf("%d (%s)", c.ok, rig.Pct(c.ok, c.requests)) })
	t.Line("final 429", func(r *result) string {
		c := r.total()
		return fmt.Sprintf("%d (%s)", c.r429, rig.Pct(c.r429, c.requests))
	})
	t.Line("  of which the upstream's own", func(r *result) string { return fmt.Sprint(r.total().r429up) })
	t.Line("other failures: statuses / errors", func(r *result) string { c := r.total(); return fmt.Sprintf("%d / %d", c.other, c.errs) })
	t.Line("  final statuses other than 2xx and 429", func(r *result) string { return r.total().statusList() })
	t.Line(fmt.Sprintf("client attempts timed out (%s)", o.timeout), func(r *result) string {
		c := r.total()
		return fmt.Sprintf("%d (%d final)", c.timeouts, c.timedOutFinal)
	})
	t.Line("upstream: attempts received", func(r *result) string { return fmt.Sprint(r.up.Total) })
	t.Line("upstream: 2xx", func(r *result) string { return fmt.Sprint(r.up.OK) })
	t.Line("upstream: refusals (limited+busy+failed)", func(r *result) string {
		return fmt.Sprintf("%d (%s)", r.refusals(), rig.Pct(r.refusals(), r.up.Total))
	})
	t.Line("  limited / busy / failed / hung", func(r *result) string {
		return fmt.Sprintf("%d / %d / %d / %d", r.up.Limited, r.up.Busy, r.up.Failed, r.up.Hung)
	})
	if s.slots {
		ideal := float64(gpuSlots) / serviceTime.Seconds()
		t.Line("upstream: peak in flight", func(r *result) string { return fmt.Sprint(r.upPeak) })
		t.Line("throughput (2xx/s)", func(r *result) string { return fmt.Sprintf("%.2f", r.throughput()) })
		t.Line(fmt.Sprintf("share of the max (%.0f/s) used", ideal), func(r *result) string { return fmt.Sprintf("%.1f %%", 100*r.throughput()/ideal) })
	} else {
		t.Line("span D (window or last acceptance)", func(r *result) string { return secs(r.span()) })
		if s.halving {
			t.Line("upstream capacity over D (both halves)", func(r *result) string { h := r.halves(); return fmt.Sprintf("%.0f", h.cap1+h.cap2) })
			t.Line("share of the limit used", func(r *result) string {
				h := r.halves()
				return fmt.Sprintf("%.1f %%", 100*float64(h.ok1+h.ok2)/(h.cap1+h.cap2))
			})
		} else {
			t.Line("upstream capacity over D", func(r *result) string { return fmt.Sprintf("%.0f", r.capacity()) })
			t.Line("share of the limit used", func(r *result) string { return fmt.Sprintf("%.1f %%", 100*r.shareUsed()) })
		}
	}
	t.Line("latency p50 (2xx)", func(r *result) string { return rig.LatCell(r.total().lat, 0.50) })
	t.Line("latency p99 (2xx)", func(r *result) string { return rig.LatCell(r.total().lat, 0.99) })
	t.Line("latency max (2xx)", func(r *result) string { return rig.LatCell(r.total().lat, 1) })
	t.Line("latency max (all)", func(r *result) string { return rig.MS(r.total().maxLatAll) })
	t.Line(attemptsHeader+" 1 / 2 / 3 / 4+ / none", func(r *result) string {
		u := r.total().upAttempts
		return fmt.Sprintf("%d / %d / %d / %d / %d", u[1], u[2], u[3], u[4], u[0])
	})
	if !s.slots {
		t.Line("arrival loop max lag", func(r *result) string { return rig.MS(r.MaxLag) })
	}
	t.Line("upstream in flight after the load", func(r *result) string { return fmt.Sprint(r.upInflight) })
	t.Line("goroutines before / after the run", func(r *result) string {
		return fmt.Sprintf("%d / %d", r.goroutinesBefore, r.goroutinesAfter)
	})
	t.Flush()

	if s.halving {
		fmt.Fprintln(w)
		t := newTable(w, rs)
		for i, name := range []string{"half 1", "half 2"} {
			lo := func(r *result) (time.Duration, time.Duration) { return r.half(i) }
			in := func(r *result) func(o *outcome) bool {
				from, to := r.half(i)
				return func(o *outcome) bool { return o.at >= from && o.at < to }
			}
			t.Line(name+": client requests (by first attempt)", func(r *result) string { return fmt.Sprint(r.counts(in(r)).requests) })
			t.Line(name+": final 2xx / final 429", func(r *result) string {
				c := r.counts(in(r))
				return fmt.Sprintf("%d / %d (%s)", c.ok, c.r429, rig.Pct(c.r429, c.requests))
			})
			t.Line(name+": upstream attempts / refusals", func(r *result) string {
				from, to := lo(r)
				n, ref := r.upIn(from, to)
				return fmt.Sprintf("%d / %d (%s)", n, ref, rig.Pct(ref, n))
			})
			t.Line(name+": upstream 2xx / capacity", func(r *result) string {
				h := r.halves()
				if i == 0 {
					return fmt.Sprintf("%d / %.0f", h.ok1, h.cap1)
				}
				return fmt.Sprintf("%d / %.1f", h.ok2, h.cap2)
			})
			t.Line(name+": share of the limit used", func(r *result) string {
				h := r.halves()
				if i == 0 {
					return fmt.Sprintf("%.1f %%", 100*float64(h.ok1)/h.cap1)
				}
				return fmt.Sprintf("%.1f %%", 100*float64(h.ok2)/h.cap2)
			})
		}
		t.Line("switch at / tokens carried over", func(r *result) string {
			return fmt.Sprintf("%s / %.1f", secs(r.switchAt), r.halves().carried)
		})
		t.Flush()
	}

	fmt.Fprintln(w)
	switch {
	case s.slots:
		fmt.Fprintf(w, "throughput = complete 2xx ÷ time from the start to the end of the last 2xx; max = %d slots ÷ %s. Peak in flight counts every request inside fakellm, including those it refuses.\n",
			gpuSlots, serviceTime)
	case s.halving:
		fmt.Fprintf(w, "half 1 = start to the switch, capacity = burst %d + %d/60 per s × its length; half 2 = switch to the end of D, capacity = tokens carried over (fakellm's bucket replayed from the accepted arrivals, clamped to burst %d) + %d/60 per s × its length. "+
			"Upstream counts are by arrival at the upstream, client counts by the first attempt's start.\n",
			upstreamBurst, upstreamRPM, halvedBurst, halvedRPM)
	default:
		fmt.Fprintf(w, "capacity = upstream burst %d + %d/60 per s × D; share used = upstream 2xx ÷ capacity.\n", upstreamBurst, upstreamRPM)
	}
	fmt.Fprintf(w, "Final = the answer after the SDK's retries. %s: the final answer's header, \"none\" when it had none.\n", attemptsHeader)
	runNotes(w, s, a, b)
	if !s.slots {
		feasibilityNotes(w, o, s, rs)
	}

	fmt.Fprintln(w)
	if !b.ran() {
		fmt.Fprintf(w, "Goals: n/a, (b) did not run.\n")
		return
	}
	c := b.total()
	fmt.Fprintf(w, "%s  (b) client requests ending in 429 ≤ 1 %%: %d of %d = %.2f %%\n",
		rig.Verdict(ratio(c.r429, c.requests) <= goalMax429Share), c.r429, c.requests, 100*ratio(c.r429, c.requests))
	switch s.name {
	case "faults":
		noHang := b.drained && b.upInflight == 0 && b.goroutinesAfter <= b.goroutinesBefore+2
		fmt.Fprintf(w, "%s  (b) every request ends with a response, no client time-out: %d time-outs, %d final errors\n",
			rig.Verdict(c.timeouts == 0 && c.errs == 0), c.timeouts, c.errs)
		fmt.Fprintf(w, "%s  (b) nothing hangs at the end: drained %v, upstream in flight %d, goroutines %d before, %d after\n",
			rig.Verdict(noHang), b.drained, b.upInflight, b.goroutinesBefore, b.goroutinesAfter)
		fmt.Fprintf(w, "info  (b) final answers other than 2xx and 429: %d (%s); final 2xx %d of %d\n",
			c.other, c.statusList(), c.ok, c.requests)
		fmt.Fprintf(w, "info  (b) upstream rate-limit refusals (429s; injected 503s excluded): %d of %d = %.2f %%; share of the limit used %.1f %%\n",
			b.up.Limited, b.up.Total, 100*ratio(b.up.Limited, b.up.Total), 100*b.shareUsed())
	case "no-headers":
		ideal := float64(gpuSlots) / serviceTime.Seconds()
		busy := b.up.Busy + b.up.Failed
		fmt.Fprintf(w, "%s  (b) upstream 503s ≤ 2 %% of attempts: %d of %d = %.2f %%\n",
			rig.Verdict(ratio(busy, b.up.Total) <= goalMaxRefusalShare), busy, b.up.Total, 100*ratio(busy, b.up.Total))
		fmt.Fprintf(w, "%s  (b) throughput ≥ 95 %% of %.0f/s: %.2f/s = %.1f %%\n",
			rig.Verdict(b.throughput() >= goalMinShareUsed*ideal), ideal, b.throughput(), 100*b.throughput()/ideal)
	default:
		fmt.Fprintf(w, "%s  (b) upstream refusals ≤ 2 %% of attempts: %d of %d = %.2f %%\n",
			rig.Verdict(ratio(b.refusals(), b.up.Total) <= goalMaxRefusalShare), b.refusals(), b.up.Total, 100*ratio(b.refusals(), b.up.Total))
		if s.halving {
			h := b.halves()
			fmt.Fprintf(w, "%s  (b) half 1 share of its limit (%d RPM) used ≥ 95 %%: %d of %.0f = %.1f %%\n",
				rig.Verdict(float64(h.ok1) >= goalMinShareUsed*h.cap1), upstreamRPM, h.ok1, h.cap1, 100*float64(h.ok1)/h.cap1)
			fmt.Fprintf(w, "%s  (b) half 2 share of its limit (%d RPM) used ≥ 95 %%: %d of %.1f = %.1f %%\n",
				rig.Verdict(float64(h.ok2) >= goalMinShareUsed*h.cap2), halvedRPM, h.ok2, h.cap2, 100*float64(h.ok2)/h.cap2)
		} else {
			fmt.Fprintf(w, "%s  (b) share of the limit used ≥ 95 %%: %d of %.0f = %.1f %%\n",
				rig.Verdict(b.shareUsed() >= goalMinShareUsed), b.up2xx(-time.Hour, 24*time.Hour), b.capacity(), 100*b.shareUsed())
		}
	}
}

// feasibilityNotes says when the load cannot saturate the upstream, so
// that no share-used goal can be met, and when a late acceptance stretched
// D far past the window.
func feasibilityNotes(w io.Writer, o options, s *scenario, rs []*result) {
	lambda := o.rate * upstreamRPM / 60
	if s.halving {
		half := o.duration.Seconds() / 2
		if c := upstreamBurst + float64(upstreamRPM)/60*half; lambda*half <= c {
			fmt.Fprintf(w, "Note: the expected arrivals of half 1 (%.0f) do not exceed its capacity (%.0f): the upstream is not saturated before the switch, so half 1's share-used goal cannot be met; it is from -duration %.0fs at -rate %.2g.\n",
				lambda*half, c, 2*upstreamBurst/(lambda-float64(upstreamRPM)/60), o.rate)
		}
	} else if c := upstreamBurst + float64(upstreamRPM)/60*o.duration.Seconds(); lambda*o.duration.Seconds() <= c {
		fmt.Fprintf(w, "Note: the expected offered load (%.0f requests) does not exceed the capacity over %s (%.0f): the upstream is not saturated, so the share-used goal cannot be met.\n",
			lambda*o.duration.Seconds(), o.duration, c)
	}
	for _, r := range rs {
		if r.ran() && r.span() > r.window+moduleMaxWait {
			fmt.Fprintf(w, "Note: %s: the last acceptance came at %s, long after the load stopped (a request held by the module, or a client retry after a time-out): D, and the capacity over it, include that time.\n",
				r.label, secs(r.span()))
		}
	}
	// Both configurations draw the same schedule: one note is enough.
	for _, r := range rs {
		if !r.ran() || r.Scheduled == 0 {
			continue
		}
		if exp := lambda * o.duration.Seconds(); math.Abs(float64(r.Scheduled)-exp) > 2*math.Sqrt(exp) {
			fmt.Fprintf(w, "Note: the schedule drew %d arrivals, the expectation is %.0f.\n", r.Scheduled, exp)
		}
		break
	}
}
