// Command queue measures llm_rate_limit's queue against upstreams with
// hidden limits.
//
// It runs three scenarios. Each one runs twice, each time with a fresh
// caddytest/fakellm upstream and a fresh in-process Caddy in front of it:
//
//	(a) reverse_proxy alone;
//	(b) llm_rate_limit with a queue, then reverse_proxy.
//
// The scenarios:
//
//	overload     a hidden 120 RPM upstream; open-loop Poisson arrivals at
//	             -rate (1.5) times the limit from 20 users, non-streamed.
//	fairness     the same upstream; user "heavy" floods it from 16
//	             closed-loop workers while user "light" sends Poisson
//	             arrivals at 0.5 req/s.
//	concurrency  an upstream that answers 503 above 4 requests in flight,
//	             no rate limit, slow streamed answers; 12 closed-loop
//	             workers from 3 users.
//
// Run it from the repository root:
//
//	go run ./bench/queue -duration 30s            # all three scenarios
//	go run ./bench/queue -scenario overload -duration 150s
//	go run ./bench/queue -rule-only               # (b) without the queue
//	go run ./bench/queue -config-only             # print (b)'s Caddyfiles
//
// Everything listens on 127.0.0.1 at free ports. Every loop is bounded in
// time and count: arrival loops and closed-loop workers by -duration and a
// hard cap on iterations, each request by -timeout, and the wait for the
// requests still in flight (or queued) after the load stops by -timeout too.
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
	"strings"
	"sync"
	"time"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/llmratelimit/caddy-llm-ratelimit"
	"github.com/llmratelimit/caddy-llm-ratelimit/bench/internal/rig"
	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
)

// The rate-limited upstream of overload and fairness, and rule (b)'s view
// of it.
const (
	upstreamRPM = 120 // fakellm's hidden limit, and rule (b)'s
	ruleBurst   = 9   // rule (b)'s burst; see -upstream-burst for fakellm's
	// maxWait is queue (b)'s max_wait in every scenario. The goals bound
	// latency by it, and -timeout must leave room above it.
	maxWait = 30 * time.Second
)

// The load.
const (
	overloadUsers = 20  // overload's users, u0 … u19, drawn at random per request
	heavyWorkers  = 16  // fairness: closed-loop workers of user "heavy"
	lightRate     = 0.5 // fairness: user "light"'s Poisson arrivals, req/s
	concWorkers   = 12  // concurrency: closed-loop workers …
	concUsers     = 3   // … spread over this many users, c0 … c2
	// retryGap is the least time between the starts of two requests of a
	// closed-loop worker after a refusal or an error. Without it a worker
	// refused in microseconds would spin, and the load generator would eat
	// the CPU that Caddy and fakellm share with it in this process.
	retryGap = 10 * time.Millisecond
	// maxInflight bounds the open-loop requests in flight; an arrival
	// above it is dropped (and counted). Far above what the queue holds
	// at these rates.
	maxInflight = 2000
)

// The concurrency-limited upstream.
const (
	gpuSlots     = 4 // fakellm's MaxConcurrent, and rule (b)'s limit
	streamChunks = 5
	chunkDelay   = 50 * time.Millisecond
	// serviceTime is how long one streamed answer holds an upstream slot:
	// fakellm pauses before every chunk but the first.
	serviceTime = (streamChunks - 1) * chunkDelay
)

// Goals. The first group is the issue's; the concurrency goals are this
// program's own (the issue names none), chosen so that a queue that keeps
// every slot busy meets them and one that lets 503s through does not.
const (
	goalMax429Share   = 0.01 // overload: client-seen 429s ÷ requests sent
	goalMinShareUsed  = 0.98 // overload, fairness: share of the upstream's limit used
	goalLightP99      = 1500 * time.Millisecond
	goalMinThroughput = 0.95 // concurrency: 2xx/s ÷ (gpuSlots ÷ serviceTime)
)

// options are the command-line flags.
type options struct {
	scenario      string
	duration      time.Duration // length of the load phase, per run
	seed          uint64        // seed of every random schedule
	timeout       time.Duration // per-request timeout, and the bound on the final drain
	rate          float64       // overload's arrivals as a multiple of the upstream's limit
	upstreamBurst int           // fakellm's request burst in overload and fairness
	lightPoisson  bool          // fairness: light user's arrivals are Poisson, not steady
	configOnly    bool
	ruleOnly      bool
	verbose       bool
}

func main() {
	var o options
	flag.StringVar(&o.scenario, "scenario", "all", "overload, fairness, concurrency or all")
	flag.DurationVar(&o.duration, "duration", 30*time.Second, "how long the load runs, per scenario and configuration")
	flag.Uint64Var(&o.seed, "seed", 1, "seed of the random schedules (the same for (a) and (b))")
	flag.DurationVar(&o.timeout, "timeout", 45*time.Second, fmt.Sprintf("per-request timeout, and the bound on the wait for queued requests after the load stops; at least max_wait (%s) + 5s", maxWait))
	flag.Float64Var(&o.rate, "rate", 1.5, "overload: arrivals as a multiple of the upstream's 120 RPM")
	flag.IntVar(&o.upstreamBurst, "upstream-burst", 10, fmt.Sprintf("fakellm's hidden request burst in overload and fairness (rule (b)'s is %d)", ruleBurst))
	flag.BoolVar(&o.configOnly, "config-only", false, "print the (b) Caddyfiles, say whether each adapts, and exit")
	flag.BoolVar(&o.ruleOnly, "rule-only", false, "run (b) without the queue block (concurrency: skip (b))")
	flag.BoolVar(&o.verbose, "v", false, "show Caddy's logs on stderr")
	flag.BoolVar(&o.lightPoisson, "light-poisson", false, "fairness: the light user's 0.5 req/s arrive as a Poisson process instead of one every 2 s")
	flag.Parse()
	if err := o.validate(); err != nil {
		fmt.Fprintln(os.Stderr, "queue:", err)
		os.Exit(2)
	}

	selected := rig.Select(scenarios(), o.scenario, func(s *scenario) string { return s.name })
	if o.configOnly {
		printConfigs(os.Stdout, o, selected)
		return
	}

	rig.PrintIntro(os.Stdout, "queue")
	goroutines := runtime.NumGoroutine()
	failed := false
	for _, s := range selected {
		var rs [2]*result
		for i, limiter := range []bool{false, true} {
			r := runConfig(s, limiter, o)
			if r.err != nil {
				// Say it at once, on stderr, and again in the report.
				fmt.Fprintf(os.Stderr, "queue: %s %s: %v\n", s.name, r.label, r.err)
				failed = true
			}
			rs[i] = r
		}
		s.report(os.Stdout, o, rs[0], rs[1])
	}
	rig.PrintEnd(os.Stdout, goroutines)
	if failed {
		os.Exit(1)
	}
}

func (o options) validate() error {
	switch {
	case o.scenario != "all" && o.scenario != "overload" && o.scenario != "fairness" && o.scenario != "concurrency":
		return errors.New("-scenario must be overload, fairness, concurrency or all")
	case o.duration <= 0 || o.duration > time.Hour:
		return errors.New("-duration must be in (0, 1h]")
	case o.timeout < maxWait+5*time.Second || o.timeout > 10*time.Minute:
		return fmt.Errorf("-timeout must be in [%s, 10m]: a request may wait max_wait (%s) in the queue, then be served", maxWait+5*time.Second, maxWait)
	case !(o.rate > 0) || o.rate > 100:
		return errors.New("-rate must be in (0, 100]")
	case o.upstreamBurst < 1 || o.upstreamBurst > 100000:
		return errors.New("-upstream-burst must be in [1, 100000]")
	}
	return nil
}

// scenario is one measured situation: the upstream, rule (b) and the load.
type scenario struct {
	name     string
	upstream func(o options) fakellm.Config
	// limiter is (b)'s llm_rate_limit block, or "" when (b) is skipped.
	limiter func(o options) string
	// load starts the load against env.url for o.duration, on wg, recording
	// into env.
	load   func(ctx context.Context, env *loadEnv, wg *sync.WaitGroup)
	report func(w io.Writer, o options, a, b *result)
}

func scenarios() []*scenario {
	return []*scenario{
		{name: "overload", upstream: rateLimitedUpstream, limiter: rateLimiter, load: overloadLoad, report: overloadReport},
		{name: "fairness", upstream: rateLimitedUpstream, limiter: rateLimiter, load: fairnessLoad, report: fairnessReport},
		{name: "concurrency", upstream: slotUpstream, limiter: slotLimiter, load: concurrencyLoad, report: concurrencyReport},
	}
}

// rateLimitedUpstream is fakellm with a hidden 120 RPM limit and a burst
// of 10: providers enforce a per-minute limit over much shorter periods
// (OpenAI says so of its RPM limits), so a client cannot spend a whole
// minute's requests in one second. Rule (b)'s burst is one below it: the
// module's bucket starts when Caddy sees the first request, fakellm's when
// that request reaches it, and every later admission reaches fakellm after
// a loopback delay that jitters. A request the module admits with its last
// token could therefore find fakellm's bucket a fraction of a token short.
// One token of slack (half a second of refill at 2/s) covers that jitter
// many times over, and costs (b) one request out of the 10 + 2·D the
// upstream can accept over a span of D seconds.
func rateLimitedUpstream(o options) fakellm.Config {
	return fakellm.Config{RPM: upstreamRPM, Burst: o.upstreamBurst, RateLimitHeaders: true}
}

// slotUpstream answers 503 above gpuSlots requests in flight, as vLLM does
// when its queue is full, and holds each slot for serviceTime by streaming
// slowly: fakellm has no delay for non-streamed answers.
func slotUpstream(options) fakellm.Config {
	return fakellm.Config{MaxConcurrent: gpuSlots, StreamChunks: streamChunks, ChunkDelay: chunkDelay}
}

func rateLimiter(o options) string {
	queue := "" +
		"\t\tqueue {\n" +
		"\t\t\tmax_wait 30s\n" +
		"\t\t\tmax_depth 10000\n" +
		"\t\t}\n"
	if o.ruleOnly {
		queue = ""
	}
	return "\tllm_rate_limit {\n" +
		"\t\tuser {http.request.header.X-User}\n" +
		queue +
		"\t\trule upstream {\n" +
		fmt.Sprintf("\t\t\tlimit %d requests_per_minute burst %d\n", upstreamRPM, ruleBurst) +
		"\t\t}\n" +
		"\t}\n"
}

func slotLimiter(o options) string {
	if o.ruleOnly {
		return "" // the foundation has no concurrency unit: nothing to measure
	}
	return "\tllm_rate_limit {\n" +
		"\t\tuser {http.request.header.X-User}\n" +
		"\t\tqueue {\n" +
		"\t\t\tmax_wait 30s\n" +
		"\t\t}\n" +
		"\t\trule gpu {\n" +
		fmt.Sprintf("\t\t\tlimit %d concurrent_requests\n", gpuSlots) +
		"\t\t}\n" +
		"\t}\n"
}

// printConfigs prints every selected scenario's (b) Caddyfile and whether
// it adapts yet, with placeholder ports.
func printConfigs(w io.Writer, o options, selected []*scenario) {
	for _, s := range selected {
		lim := s.limiter(o)
		if lim == "" {
			fmt.Fprintf(w, "# %s (b)\n", s.name)
			fmt.Fprintln(w, "# skipped with -rule-only: the rule needs the concurrent_requests unit and the queue")
			fmt.Fprintln(w)
			continue
		}
		rig.PrintConfig(w, s.name+" (b)", lim, o.verbose, "does NOT adapt yet")
	}
}

// stats are one user's (or everyone's) client-side outcomes.
type stats struct {
	sent        int
	ok          int // 2xx, and for streams a complete one
	r429        int // every 429 the client saw
	r429up      int // … of which written by fakellm and passed on
	r503        int
	other       int // any other status
	errs        int // transport errors, timeouts, truncated streams
	lat         []time.Duration
	maxLatOK    time.Duration
	maxLatAll   time.Duration
	lastOKEnd   time.Time // when the last 2xx finished
	firstErrMsg string
}

func (s *stats) add(t stats) {
	s.sent += t.sent
	s.ok += t.ok
	s.r429 += t.r429
	s.r429up += t.r429up
	s.r503 += t.r503
	s.other += t.other
	s.errs += t.errs
	s.lat = append(s.lat, t.lat...)
	s.maxLatOK = max(s.maxLatOK, t.maxLatOK)
	s.maxLatAll = max(s.maxLatAll, t.maxLatAll)
	if t.lastOKEnd.After(s.lastOKEnd) {
		s.lastOKEnd = t.lastOKEnd
	}
	if s.firstErrMsg == "" {
		s.firstErrMsg = t.firstErrMsg
	}
}

// result is what one configuration of one scenario measured.
type result struct {
	label string
	err   error // the run did not happen (e.g. (b) does not adapt yet)
	skip  string

	users   map[string]*stats
	start   time.Time
	window  time.Duration // how long the load ran
	drained bool          // everything finished within the drain bound
	// The open-loop arrivals the schedules produced, those not sent
	// because maxInflight were in flight, and the arrival loops' worst lag.
	rig.Arrivals

	// From fakellm: Counts(), and the statuses of Requests().
	upTotal, upLimited                int
	up2xx, up429, up503, upOther, up0 int
	// From the wrapper.
	upPeak   int
	upLastOK time.Duration // since start; 0 when nothing was accepted
}

func (r *result) total() stats {
	var t stats
	for _, u := range slices.Sorted(maps.Keys(r.users)) {
		t.add(*r.users[u])
	}
	slices.Sort(t.lat)
	return t
}

func (r *result) user(name string) stats {
	s := stats{}
	if u := r.users[name]; u != nil {
		s = *u
		s.lat = slices.Clone(s.lat)
	}
	slices.Sort(s.lat)
	return s
}

func (r *result) ran() bool { return r != nil && r.err == nil && r.skip == "" }

// loadEnv is what a scenario's load needs; record is safe for concurrent use.
type loadEnv struct {
	o      options
	client *http.Client
	url    string
	res    *result
	mu     sync.Mutex // guards res.users
	// deadline is when the load stops starting requests.
	deadline time.Time
}

func (e *loadEnv) record(user string, s stats) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.res.users[user] == nil {
		e.res.users[user] = &stats{}
	}
	e.res.users[user].add(s)
}

// runConfig starts a fresh fakellm and a fresh in-process Caddy, runs the
// scenario's load through them and stops both. A configuration that does
// not adapt or load is reported in the result, not fatal.
func runConfig(s *scenario, limiter bool, o options) *result {
	res := &result{label: "(a) reverse_proxy", users: map[string]*stats{}}
	block := ""
	if limiter {
		res.label = "(b) llm_rate_limit + queue"
		if o.ruleOnly {
			res.label = "(b) llm_rate_limit, rule only"
		}
		if block = s.limiter(o); block == "" {
			res.skip = "skipped with -rule-only"
			return res
		}
	}
	fmt.Fprintf(os.Stderr, "running %s %s for %s ...\n", s.name, res.label, o.duration)

	stack, err := rig.Start("queue", s.upstream(o), block, o.verbose)
	if err != nil {
		res.err = err
		return res
	}
	defer stack.Close()

	// One keep-alive connection per request in flight: over HTTP/1.1 a
	// request waiting in the queue holds its connection, so the pool must
	// be as large as the most requests that can wait at once.
	tr := rig.Transport(maxInflight)
	env := &loadEnv{
		o:      o,
		client: &http.Client{Timeout: o.timeout, Transport: tr},
		url:    stack.URL,
		res:    res,
	}
	defer tr.CloseIdleConnections()
	// ctx ends well after every request's own timeout: it only aborts
	// stragglers if something is badly wrong.
	ctx, cancel := context.WithTimeout(context.Background(), o.duration+o.timeout+10*time.Second)
	defer cancel()

	res.start = time.Now()
	env.deadline = res.start.Add(o.duration)
	var wg sync.WaitGroup
	s.load(ctx, env, &wg)
	// Wait at most o.timeout+5s once the load has started its last
	// request (for closed loops, once it has started its workers).
	res.drained = rig.Drain(ctx, cancel, &wg, o.timeout+5*time.Second)
	res.window = o.duration

	total, limited := stack.Fake.Counts()
	res.upTotal, res.upLimited = total, limited
	var lastOK time.Time
	for _, q := range stack.Fake.Requests() {
		switch {
		case q.Status == 0:
			res.up0++
		case q.Status/100 == 2:
			res.up2xx++
			if q.Arrived.After(lastOK) {
				lastOK = q.Arrived // fakellm admits at arrival
			}
		case q.Status == http.StatusTooManyRequests:
			res.up429++
		case q.Status == http.StatusServiceUnavailable:
			res.up503++
		default:
			res.upOther++
		}
	}
	res.upPeak = stack.Fake.PeakInFlight()
	if !lastOK.IsZero() {
		res.upLastOK = lastOK.Sub(res.start)
	}
	return res
}

// send sends one request as user, never retrying, and returns its outcome
// as a one-request stats.
func send(ctx context.Context, e *loadEnv, body []byte, stream bool, user string) stats {
	req := rig.NewPost(ctx, e.url, body)
	req.Header.Set("X-User", user)
	t0 := time.Now()
	resp, raw, err := rig.Do(e.client, req)
	end := time.Now()
	lat := end.Sub(t0)
	if os.Getenv("QDEBUG") != "" && user == "light" && resp != nil {
		fmt.Fprintf(os.Stderr, "light %s lat=%s wait=%s depth=%s\n", t0.Format("05.000"), lat, resp.Header.Get("X-Queue-Wait-Ms"), resp.Header.Get("X-Queue-Depth"))
	}

	s := stats{sent: 1, maxLatAll: lat}
	switch {
	case err != nil:
		s.errs++
		s.firstErrMsg = err.Error()
	case resp.StatusCode/100 == 2 && stream && !bytes.Contains(raw, []byte("data: [DONE]")):
		s.errs++
		s.firstErrMsg = "a 2xx stream ended before [DONE]"
	case resp.StatusCode/100 == 2:
		s.ok++
		s.lat = []time.Duration{lat}
		s.maxLatOK = lat
		s.lastOKEnd = end
	case resp.StatusCode == http.StatusTooManyRequests:
		s.r429++
		if bytes.Contains(raw, []byte("Rate limit reached for")) { // fakellm's wording, not the module's
			s.r429up++
		}
	case resp.StatusCode == http.StatusServiceUnavailable:
		s.r503++
	default:
		s.other++
		if s.firstErrMsg == "" {
			s.firstErrMsg = fmt.Sprintf("status %d: %.200s", resp.StatusCode, raw)
		}
	}
	return s
}

// poisson sends open-loop Poisson arrivals at lambda req/s until the
// deadline, user(rng) naming each request's user, and returns without
// waiting for them; wg tracks them.
func poisson(ctx context.Context, e *loadEnv, wg *sync.WaitGroup, rng *rand.Rand, lambda float64, body []byte, user func(*rand.Rand) string) {
	p := rig.Poisson{RNG: rng, Rate: lambda, Start: e.res.start, Deadline: e.deadline, MaxInflight: maxInflight}
	a := p.Run(ctx, wg, func(int) func() {
		u := user(rng) // drawn even if dropped, so the schedule stays the same
		return func() { e.record(u, send(ctx, e, body, false, u)) }
	})
	e.mu.Lock()
	e.res.Add(a)
	e.mu.Unlock()
}

// steady sends user's requests at a fixed rate, starting half an interval
// into the run, until the deadline.
func steady(ctx context.Context, e *loadEnv, wg *sync.WaitGroup, rate float64, body []byte, user string) {
	interval := time.Duration(float64(time.Second) / rate)
	n := 0
	for next := e.res.start.Add(interval / 2); next.Before(e.deadline) && n < 100000; next = next.Add(interval) {
		if !rig.SleepUntil(ctx, next) {
			break
		}
		n++
		wg.Go(func() { e.record(user, send(ctx, e, body, false, user)) })
	}
	e.mu.Lock()
	e.res.Scheduled += n
	e.mu.Unlock()
}

// closedLoop sends user's requests one after the other until the
// deadline: the next as soon as the previous ends after a 2xx, and no
// sooner than retryGap after the previous one started otherwise.
func closedLoop(ctx context.Context, e *loadEnv, body []byte, stream bool, user string) {
	rig.ClosedLoop(ctx, e.res.start, e.deadline, retryGap, func() bool {
		s := send(ctx, e, body, stream, user)
		e.record(user, s)
		return s.ok == 1
	})
}

func overloadLoad(ctx context.Context, e *loadEnv, wg *sync.WaitGroup) {
	lambda := e.o.rate * upstreamRPM / 60
	poisson(ctx, e, wg, rig.RNG(e.o.seed, 0x6f76_6572_6c6f_6164), lambda, rig.ChatBody(false),
		func(r *rand.Rand) string { return fmt.Sprintf("u%d", r.IntN(overloadUsers)) })
}

func fairnessLoad(ctx context.Context, e *loadEnv, wg *sync.WaitGroup) {
	body := rig.ChatBody(false)
	for range heavyWorkers {
		wg.Go(func() { closedLoop(ctx, e, body, false, "heavy") })
	}
	if e.o.lightPoisson {
		poisson(ctx, e, wg, rig.RNG(e.o.seed, 0x6c69_6768_74), lightRate, body,
			func(*rand.Rand) string { return "light" })
	} else {
		steady(ctx, e, wg, lightRate, body, "light")
	}
}

func concurrencyLoad(ctx context.Context, e *loadEnv, wg *sync.WaitGroup) {
	body := rig.ChatBody(true)
	for i := range concWorkers {
		user := fmt.Sprintf("c%d", i%concUsers)
		wg.Go(func() { closedLoop(ctx, e, body, true, user) })
	}
}

// span is the D of the share-used definition: the load window, extended
// to the arrival at the upstream of the last request it accepted when that
// came later (requests the queue still held when the load stopped).
func (r *result) span() time.Duration { return max(r.window, r.upLastOK) }

// capacity is the requests the rate-limited upstream could accept over
// span: its bucket starts full and refills at RPM/60 per second.
func (r *result) capacity(o options) float64 {
	return float64(o.upstreamBurst) + float64(upstreamRPM)/60*r.span().Seconds()
}

func (r *result) shareUsed(o options) float64 { return float64(r.up2xx) / r.capacity(o) }

// ceiling is the best share (b) can reach when the upstream is saturated
// over the whole span: the rule's burst plus its refill, over the capacity.
func (r *result) ceiling(o options) float64 {
	return math.Min(1, (ruleBurst+float64(upstreamRPM)/60*r.span().Seconds())/r.capacity(o))
}

// newTable starts a table with one column per result; a result that did
// not run has a note in every cell instead of figures.
func newTable(w io.Writer, rs []*result) *rig.Columns[*result] {
	return rig.NewColumns(w, rs, func(r *result) string { return r.label }, func(r *result) string {
		switch {
		case r.err != nil:
			return "did not run"
		case r.skip != "":
			return "skipped"
		}
		return ""
	})
}

// queueDesc describes (b)'s queue for the parameter lines.
func queueDesc(o options) string {
	if o.ruleOnly {
		return "no queue (-rule-only)"
	}
	return fmt.Sprintf("queue max_wait %s", maxWait)
}

// runNotes prints, for each result, why it did not run, or the sanity
// checks that failed.
func runNotes(w io.Writer, rs ...*result) {
	for _, r := range rs {
		switch {
		case r.err != nil:
			fmt.Fprintf(w, "%s did not run: %v\n", r.label, r.err)
			continue
		case r.skip != "":
			fmt.Fprintf(w, "%s: %s.\n", r.label, r.skip)
			continue
		}
		var notes []string
		t := r.total()
		if !r.drained {
			notes = append(notes, "some requests were still in flight after the drain bound")
		}
		if r.up0 > 0 {
			notes = append(notes, fmt.Sprintf("%d upstream requests had no status at the end", r.up0))
		}
		if r.upTotal != r.up2xx+r.up429+r.up503+r.upOther+r.up0 || r.upLimited != r.up429+r.up503 {
			notes = append(notes, fmt.Sprintf("fakellm's Counts() (%d, %d limited) disagree with its Requests()", r.upTotal, r.upLimited))
		}
		if r.up2xx != t.ok {
			notes = append(notes, fmt.Sprintf("the upstream accepted %d requests but the clients saw %d complete 2xx", r.up2xx, t.ok))
		}
		if t.errs > 0 || t.other > 0 {
			notes = append(notes, fmt.Sprintf("%d errors and %d other statuses, the first: %s", t.errs, t.other, t.firstErrMsg))
		}
		if len(notes) > 0 {
			fmt.Fprintf(w, "%s: %s.\n", r.label, strings.Join(notes, "; "))
		}
	}
}

func overloadReport(w io.Writer, o options, a, b *result) {
	lambda := o.rate * upstreamRPM / 60
	refill := float64(upstreamRPM) / 60
	rig.Header(w, "overload",
		fmt.Sprintf("Upstream: %d RPM, burst %d. Rule (b): %d requests_per_minute burst %d, %s. "+
			"Open-loop Poisson arrivals at %.2f req/s (%.2g× the limit) from %d users for %s, seed %d; non-streamed.",
			upstreamRPM, o.upstreamBurst, upstreamRPM, ruleBurst, queueDesc(o), lambda, o.rate, overloadUsers, o.duration, o.seed))
	rs := []*result{a, b}
	t := newTable(w, rs)
	t.Line("requests sent", func(r *result) string { return fmt.Sprint(r.total().sent) })
	t.Line("dropped by the load generator", func(r *result) string { return fmt.Sprint(r.Dropped) })
	t.Line("2xx", func(r *result) string { return fmt.Sprint(r.total().ok) })
	t.Line("429 seen by clients", func(r *result) string { s := r.total(); return fmt.Sprintf("%d (%s)", s.r429, rig.Pct(s.r429, s.sent)) })
	t.Line("  of which the upstream's", func(r *result) string { return fmt.Sprint(r.total().r429up) })
	t.Line("other statuses / errors", func(r *result) string { s := r.total(); return fmt.Sprintf("%d / %d", s.other, s.errs) })
	t.Line("upstream: requests received", func(r *result) string { return fmt.Sprint(r.upTotal) })
	t.Line("upstream: accepted (2xx)", func(r *result) string { return fmt.Sprint(r.up2xx) })
	t.Line("upstream: its own 429s", func(r *result) string { return fmt.Sprint(r.up429) })
	t.Line("span D (window or last acceptance)", func(r *result) string { return fmt.Sprintf("%.1f s", r.span().Seconds()) })
	t.Line("upstream capacity over D", func(r *result) string { return fmt.Sprintf("%.0f", r.capacity(o)) })
	t.Line("share of the limit used", func(r *result) string { return fmt.Sprintf("%.1f %%", 100*r.shareUsed(o)) })
	t.Line("latency p50 (2xx)", func(r *result) string { return rig.LatCell(r.total().lat, 0.50) })
	t.Line("latency p99 (2xx)", func(r *result) string { return rig.LatCell(r.total().lat, 0.99) })
	t.Line("latency max (2xx)", func(r *result) string { return rig.MS(r.total().maxLatOK) })
	t.Line("latency max (all)", func(r *result) string { return rig.MS(r.total().maxLatAll) })
	t.Line("arrival loop max lag", func(r *result) string { return rig.MS(r.MaxLag) })
	t.Flush()
	fmt.Fprintf(w, "\ncapacity = upstream burst %d + %d/60 per s × D; share used = upstream 2xx ÷ capacity.\n", o.upstreamBurst, upstreamRPM)
	runNotes(w, a, b)

	// When the goals are reachable at all, from the expected load: the
	// upstream saturates once λ·T exceeds burst + r·T, and a queue that
	// holds at most r·max_wait requests absorbs the excess λ·T − r·T −
	// rule burst only while that is below r·max_wait.
	if lambda <= refill {
		fmt.Fprintf(w, "Note: arrivals (%.2f req/s) do not exceed the limit (%.0f req/s): the upstream is never saturated, so the share-used goal cannot be met.\n",
			lambda, refill)
	} else {
		sat := float64(o.upstreamBurst) / (lambda - refill)
		fit := (refill*maxWait.Seconds() + ruleBurst) / (lambda - refill)
		if o.duration.Seconds() < sat {
			fmt.Fprintf(w, "Note: the expected offered load (%.0f requests) is below the capacity over %s (%.0f): the upstream is not saturated, so the share-used goal cannot be met, in (a) or (b). "+
				"The load saturates the upstream from -duration %.0fs at -rate %.2g.\n",
				lambda*o.duration.Seconds(), o.duration, float64(o.upstreamBurst)+refill*o.duration.Seconds(), sat, o.rate)
		}
		fmt.Fprintf(w, "Expected: a queue of max_wait %s can absorb the excess, hence ≤ 1 %% 429s, up to about -duration %.0fs at -rate %.2g; "+
			"the share-used goal needs saturation, from about %.0fs. Both hold in between.\n", maxWait, fit, o.rate, sat)
	}

	fmt.Fprintln(w)
	if !b.ran() {
		fmt.Fprintf(w, "Goals: n/a, (b) did not run.\n")
		return
	}
	s := b.total()
	share429 := float64(s.r429) / math.Max(1, float64(s.sent))
	p99 := rig.Percentile(s.lat, 0.99)
	fmt.Fprintf(w, "%s  (b) 429s seen by clients ≤ 1 %%: %d of %d = %.2f %%\n", rig.Verdict(share429 <= goalMax429Share), s.r429, s.sent, 100*share429)
	fmt.Fprintf(w, "%s  (b) upstream 429s = 0: %d\n", rig.Verdict(b.up429 == 0), b.up429)
	fmt.Fprintf(w, "%s  (b) share of the limit used ≥ 98 %%: %.1f %% (%d of %.0f; best reachable with rule burst %d vs upstream %d: %.1f %%)\n",
		rig.Verdict(b.shareUsed(o) >= goalMinShareUsed), 100*b.shareUsed(o), b.up2xx, b.capacity(o), ruleBurst, o.upstreamBurst, 100*b.ceiling(o))
	fmt.Fprintf(w, "%s  (b) p99 latency of 2xx ≤ max_wait %s: %s\n", rig.Verdict(s.ok > 0 && p99 <= maxWait), maxWait, rig.LatCell(s.lat, 0.99))
}

func fairnessReport(w io.Writer, o options, a, b *result) {
	rig.Header(w, "fairness",
		fmt.Sprintf("Upstream: %d RPM, burst %d. Rule (b): %d requests_per_minute burst %d, %s. "+
			"User heavy: %d closed-loop workers (at most one request per %s after a refusal); user light: %s %.1f req/s; for %s, seed %d; non-streamed.",
			upstreamRPM, o.upstreamBurst, upstreamRPM, ruleBurst, queueDesc(o), heavyWorkers, retryGap, map[bool]string{true: "Poisson", false: "steady"}[o.lightPoisson], lightRate, o.duration, o.seed))
	rs := []*result{a, b}
	t := newTable(w, rs)
	for _, u := range []string{"heavy", "light"} {
		t.Line(u+": requests", func(r *result) string { return fmt.Sprint(r.user(u).sent) })
		t.Line(u+": 2xx", func(r *result) string { return fmt.Sprint(r.user(u).ok) })
		t.Line(u+": 429", func(r *result) string { s := r.user(u); return fmt.Sprintf("%d (%s)", s.r429, rig.Pct(s.r429, s.sent)) })
		t.Line(u+": other / errors", func(r *result) string { s := r.user(u); return fmt.Sprintf("%d / %d", s.other, s.errs) })
		t.Line(u+": p50 (2xx)", func(r *result) string { return rig.LatCell(r.user(u).lat, 0.50) })
		t.Line(u+": p99 (2xx)", func(r *result) string { return rig.LatCell(r.user(u).lat, 0.99) })
	}
	t.Line("upstream: requests received", func(r *result) string { return fmt.Sprint(r.upTotal) })
	t.Line("upstream: accepted (2xx)", func(r *result) string { return fmt.Sprint(r.up2xx) })
	t.Line("upstream: its own 429s", func(r *result) string { return fmt.Sprint(r.up429) })
	t.Line("span D (window or last acceptance)", func(r *result) string { return fmt.Sprintf("%.1f s", r.span().Seconds()) })
	t.Line("upstream capacity over D", func(r *result) string { return fmt.Sprintf("%.0f", r.capacity(o)) })
	t.Line("share of the limit used", func(r *result) string { return fmt.Sprintf("%.1f %%", 100*r.shareUsed(o)) })
	t.Flush()
	fmt.Fprintf(w, "\ncapacity = upstream burst %d + %d/60 per s × D; share used = upstream 2xx ÷ capacity.\n", o.upstreamBurst, upstreamRPM)
	runNotes(w, a, b)

	fmt.Fprintln(w)
	if !b.ran() {
		fmt.Fprintf(w, "Goals: n/a, (b) did not run.\n")
		return
	}
	light, heavy := b.user("light"), b.user("heavy")
	p99 := rig.Percentile(light.lat, 0.99)
	fmt.Fprintf(w, "%s  (b) light gets no 429: %d of %d\n", rig.Verdict(light.r429 == 0 && light.sent > 0), light.r429, light.sent)
	fmt.Fprintf(w, "%s  (b) light p99 ≤ %s: %s (%d 2xx)\n", rig.Verdict(light.ok > 0 && p99 <= goalLightP99), goalLightP99, rig.LatCell(light.lat, 0.99), light.ok)
	fmt.Fprintf(w, "%s  (b) upstream 429s = 0: %d\n", rig.Verdict(b.up429 == 0), b.up429)
	fmt.Fprintf(w, "%s  (b) heavy gets the rest, share of the limit used ≥ 98 %%: %.1f %% (%d of %.0f, heavy %d + light %d 2xx; best reachable with rule burst %d vs upstream %d: %.1f %%)\n",
		rig.Verdict(b.shareUsed(o) >= goalMinShareUsed), 100*b.shareUsed(o), b.up2xx, b.capacity(o), heavy.ok, light.ok, ruleBurst, o.upstreamBurst, 100*b.ceiling(o))
}

// throughput is complete 2xx per second, from the start of the load to the
// end of the last 2xx.
func (r *result) throughput() float64 {
	s := r.total()
	if s.ok == 0 {
		return 0
	}
	return float64(s.ok) / s.lastOKEnd.Sub(r.start).Seconds()
}

func concurrencyReport(w io.Writer, o options, a, b *result) {
	ideal := float64(gpuSlots) / serviceTime.Seconds()
	rig.Header(w, "concurrency",
		fmt.Sprintf("Upstream: 503 above %d in flight, no rate limit, streams of %d chunks %s apart (%s per answer; at most %.1f answers/s). "+
			"Rule (b): limit %d concurrent_requests, queue max_wait %s. %d closed-loop workers from %d users (at most one request per %s after a refusal), for %s.",
			gpuSlots, streamChunks, chunkDelay, serviceTime, ideal, gpuSlots, maxWait, concWorkers, concUsers, retryGap, o.duration))
	if o.ruleOnly {
		fmt.Fprintln(w, "With -rule-only (b) is skipped: without the queue and the concurrent_requests unit there is no rule to measure.")
		fmt.Fprintln(w)
	}
	rs := []*result{a, b}
	t := newTable(w, rs)
	t.Line("requests sent", func(r *result) string { return fmt.Sprint(r.total().sent) })
	t.Line("2xx (complete streams)", func(r *result) string { return fmt.Sprint(r.total().ok) })
	for i := range concUsers {
		u := fmt.Sprintf("c%d", i)
		t.Line("  of which "+u, func(r *result) string { return fmt.Sprint(r.user(u).ok) })
	}
	t.Line("503 seen by clients", func(r *result) string { s := r.total(); return fmt.Sprintf("%d (%s)", s.r503, rig.Pct(s.r503, s.sent)) })
	t.Line("429 seen by clients", func(r *result) string { return fmt.Sprint(r.total().r429) })
	t.Line("other statuses / errors", func(r *result) string { s := r.total(); return fmt.Sprintf("%d / %d", s.other, s.errs) })
	t.Line("upstream: requests received", func(r *result) string { return fmt.Sprint(r.upTotal) })
	t.Line("upstream: its own 503s", func(r *result) string { return fmt.Sprint(r.up503) })
	t.Line("upstream: peak in flight", func(r *result) string { return fmt.Sprint(r.upPeak) })
	t.Line("throughput (2xx/s)", func(r *result) string { return fmt.Sprintf("%.2f", r.throughput()) })
	t.Line("latency p50 (2xx)", func(r *result) string { return rig.LatCell(r.total().lat, 0.50) })
	t.Line("latency p99 (2xx)", func(r *result) string { return rig.LatCell(r.total().lat, 0.99) })
	t.Flush()
	fmt.Fprintf(w, "\npeak in flight counts every request inside fakellm's handler at once, including those it refuses with 503; "+
		"throughput = 2xx ÷ time from the start to the end of the last 2xx.\n")
	runNotes(w, a, b)

	fmt.Fprintln(w)
	if !b.ran() {
		fmt.Fprintf(w, "Goals: n/a, (b) did not run.\n")
		return
	}
	s := b.total()
	fmt.Fprintf(w, "%s  (b) no upstream 503 reaches a client: %d (upstream refused %d)\n", rig.Verdict(s.r503 == 0 && b.up503 == 0), s.r503, b.up503)
	fmt.Fprintf(w, "%s  (b) no 429 (the queue absorbs the workers): %d\n", rig.Verdict(s.r429 == 0), s.r429)
	fmt.Fprintf(w, "%s  (b) upstream peak in flight ≤ %d: %d\n", rig.Verdict(b.upPeak <= gpuSlots), gpuSlots, b.upPeak)
	fmt.Fprintf(w, "%s  (b) throughput ≥ 95 %% of %.1f/s (this program's goal): %.2f/s = %.1f %%\n",
		rig.Verdict(b.throughput() >= goalMinThroughput*ideal), ideal, b.throughput(), 100*b.throughput()/ideal)
}
