package llmratelimit

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"io"
	"maps"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"golang.org/x/net/http/httpguts"

	"github.com/llmratelimit/caddy-llm-ratelimit/adaptive"
	"github.com/llmratelimit/caddy-llm-ratelimit/bucket"
)

// AdaptiveConfig turns on adaptive mode: the module learns each upstream
// model's real limits from its answers and holds requests in the queue
// before they would be refused, and it sends a request again when the
// upstream refused it (429, 503, 529) or failed before answering (502, 504,
// no connection), instead of handing the refusal to the client.
type AdaptiveConfig struct {
	// Retries bounds how many times one request is sent again. Default: 3.
	Retries *int `json:"retries,omitempty"`

	// AttemptTimeout bounds how long one attempt waits for the upstream's
	// response to begin. An attempt that times out is tried again like a
	// 504. It does not bound a response that has begun, such as a long
	// stream. Default: 0, no bound of the module's own (the client's, and
	// reverse_proxy's transport time-outs, still apply).
	AttemptTimeout caddy.Duration `json:"attempt_timeout,omitempty"`

	// AttemptsHeader names a response header that tells how many upstream
	// attempts the request took, for example "X-Upstream-Attempts".
	// Default: none.
	AttemptsHeader string `json:"attempts_header,omitempty"`
}

// DefaultRetries is the default bound on upstream attempts after the first.
const DefaultRetries = 3

// maxRetries bounds retries.
const maxRetries = 20

// retryPriority is the class of a request waiting to be sent again: above
// every configured class, so that it keeps its place ahead of newcomers.
const retryPriority = maxPriority + 1

// maxHeldBody bounds how much of a refusal's body the module holds back
// while it decides to retry. Refusals are small; a larger body is passed
// on as it is.
const maxHeldBody = 64 << 10

// adaptiveSettings is an AdaptiveConfig ready for the hot path.
type adaptiveSettings struct {
	enabled        bool
	retries        int
	attemptTimeout time.Duration
	header         string
	// policy bounds the whole wait of a request: in the queue and between
	// its attempts.
	policy bucket.Policy
	// rule stands for the learned limits in headers and bucket keys: id
	// "adaptive", one bucket per model.
	rule compiledRule
}

func (c *AdaptiveConfig) compile(zone string, q queueSettings) (adaptiveSettings, error) {
	if c == nil {
		return adaptiveSettings{}, nil
	}
	as := adaptiveSettings{enabled: true, retries: DefaultRetries, attemptTimeout: time.Duration(c.AttemptTimeout), header: c.AttemptsHeader}
	if c.Retries != nil {
		as.retries = *c.Retries
	}
	if as.retries < 0 || as.retries > maxRetries {
		return as, errors.New("adaptive: retries must be between 0 and " + strconv.Itoa(maxRetries))
	}
	if as.attemptTimeout < 0 {
		return as, errors.New("adaptive: attempt_timeout must not be negative")
	}
	if as.header != "" && !httpguts.ValidHeaderFieldName(as.header) {
		return as, errors.New("adaptive: attempts_header " + strconv.Quote(as.header) + " is not a valid header name")
	}
	// Adaptive mode queues even without a queue block: waiting for the
	// upstream is its point.
	as.policy = q.waitPolicy()
	as.rule = compiledRule{
		id:      adaptiveRuleID,
		per:     []dimension{{kind: dimModel}},
		perText: "model",
		prefix:  adaptivePrefix(zone),
		policy:  as.policy,
		learned: true,
	}
	return as, nil
}

// adaptivePrefix starts the keys of a zone's learned buckets: one bucket
// per learned limit and model, like a rule with applies_per model.
func adaptivePrefix(zone string) string {
	return zone + string(keySep) + adaptiveRuleID + string(keySep) + "model" + string(keySep)
}

// adaptiveRuleID is the id adaptive mode's learned limits go by, in
// headers, metrics and the admin API. No configured rule may have it: its
// buckets would be adaptive mode's.
const adaptiveRuleID = "adaptive"

// learned is one upstream model's learner and the limits it last
// published, compiled for the hot path. A published learnedLimits never
// changes, so requests may keep pointers into it.
type learned struct {
	learner *adaptive.Learner
	// zone is the learner's zone, and prefix starts the keys of its
	// buckets: the zone's adaptivePrefix.
	zone, prefix string
	limits       atomic.Pointer[learnedLimits]
	// publishing serialises publish, so that the limits published last
	// are the learner's latest.
	publishing sync.Mutex
}

type learnedLimits struct {
	requests, tokens, concurrent *compiledLimit
}

// unboundedSlots is the count of a concurrency limit that only counts: the
// largest a limit may be.
const unboundedSlots = 1e12

// learners holds the learners of every zone and model, shared across
// reloads like the buckets.
type learners struct {
	mu sync.RWMutex
	m  map[learnerKey]*learned
}

// learnerKey names a learner. A struct rather than a joined string, so that
// finding a learner on every request builds nothing.
type learnerKey struct{ zone, model string }

// overflowModel names the learner that models past maxLearners share. No
// model a request names contains a NUL byte.
const overflowModel = "\x00overflow"

// learnerEntry is one learner with its key.
type learnerEntry struct {
	key learnerKey
	l   *learned
}

// entries copies the learners, sorted by zone and model, for readers (the
// admin API, the metrics) that must not hold the lock while they work.
func (ls *learners) entries() []learnerEntry {
	ls.mu.RLock()
	out := make([]learnerEntry, 0, len(ls.m))
	for k, l := range ls.m {
		out = append(out, learnerEntry{k, l})
	}
	ls.mu.RUnlock()
	slices.SortFunc(out, func(a, b learnerEntry) int {
		return cmp.Or(cmp.Compare(a.key.zone, b.key.zone), cmp.Compare(a.key.model, b.key.model))
	})
	return out
}

// maxLearners bounds the learners: one per model name a request named.
// Model names come from clients; past the bound, new names share one
// learner.
const maxLearners = 4096

// get returns the learner of a model in a zone, creating it.
func (ls *learners) get(zone, model string) *learned {
	key := learnerKey{zone, model}
	ls.mu.RLock()
	l := ls.m[key]
	ls.mu.RUnlock()
	if l != nil {
		return l
	}
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if l = ls.m[key]; l != nil {
		return l
	}
	if len(ls.m) >= maxLearners {
		key = learnerKey{zone, overflowModel}
		if l = ls.m[key]; l != nil {
			return l
		}
	}
	l = &learned{learner: adaptive.NewLearner(), zone: zone, prefix: adaptivePrefix(zone)}
	l.publish(adaptive.Limits{})
	ls.m[key] = l
	return l
}

// publish compiles a learner's limits after they changed.
func (l *learned) publish(lim adaptive.Limits) {
	p := &learnedLimits{}
	mk := func(unit string, q quantity, bl bucket.Limit, window int64) *compiledLimit {
		if bl.Validate() != nil {
			return nil
		}
		return &compiledLimit{unit: unit, quantity: q, limit: bl, policy: `"adaptive/` + unit + `"`, windowSeconds: window,
			keyPrefix: []byte(l.prefix + unit + string(keySep)), counters: metrics.limitCounters(l.zone, adaptiveRuleID, unit)}
	}
	if r := lim.Requests; r.Count > 0 {
		p.requests = mk("requests_per_minute", quantityRequests, bucket.Limit{Count: r.Count, Window: r.Window, Burst: r.Burst}, int64(r.Window/time.Second))
	}
	if r := lim.Tokens; r.Count > 0 {
		p.tokens = mk("tokens_per_minute", quantityTokens, bucket.Limit{Count: r.Count, Window: r.Window, Burst: r.Burst}, int64(r.Window/time.Second))
	}
	if lim.Concurrent > 0 {
		p.concurrent = mk("concurrent_requests", quantityRequests, bucket.Limit{Count: lim.Concurrent}, 0)
	} else {
		// Before a cap is learned, every request still takes a slot of an
		// unbounded one, so that the requests in flight are counted from
		// the start: when a cap is learned, the ones already in flight
		// hold their slots under it, and no newcomer slips past them.
		p.concurrent = mk("concurrent_requests", quantityRequests, bucket.Limit{Count: unboundedSlots}, 0)
		p.concurrent.hidden = true
	}
	l.limits.Store(p)
}

// matchLearned adds the charges of the request's learned limits.
func (h *Handler) matchLearned(x *exchange) {
	x.learned = h.state.learners.get(h.Zone, x.id.model)
	p := x.learned.limits.Load()
	for _, l := range []*compiledLimit{p.requests, p.tokens, p.concurrent} {
		if l != nil {
			x.add(&h.adaptive.rule, l)
		}
	}
}

// learnedCharge returns the request's charge for a learned limit of the
// given unit, or -1.
func (x *exchange) learnedCharge(unit string) int {
	for i, a := range x.applied[:x.nEnforce] {
		if a.rule.learned && a.limit.unit == unit && x.charged[i] {
			return i
		}
	}
	return -1
}

// forward sends the request on. In adaptive mode it holds back a refusal or
// failure from the upstream, learns from every answer, and sends the
// request again while its deadline and retry budget allow.
func (h *Handler) forward(w *headerGuard, r *http.Request, next caddyhttp.Handler, x *exchange) error {
	if x.learned == nil || r.Header.Get("Upgrade") != "" || r.Method == http.MethodConnect {
		// A tunnel (WebSocket, CONNECT) is not a request to retry.
		if x.vars != nil {
			x.vars.attempts = 1
		}
		return next.ServeHTTP(w, r)
	}
	// Only a body the module holds can be sent again: other requests (an
	// upload to a path it does not parse) get one attempt.
	replayable := x.body != nil || r.Body == nil || r.Body == http.NoBody
	deadline := x.arrived.Add(h.adaptive.policy.MaxWait)
	for attempt := 1; ; attempt++ {
		if x.vars != nil {
			x.vars.attempts = attempt
		}
		if h.adaptive.header != "" {
			w.Header().Set(h.adaptive.header, strconv.Itoa(attempt))
		}
		last := attempt > h.adaptive.retries || !h.now().Before(deadline) || !replayable
		aw := &attemptWriter{dst: w, hold: !last, header: make(http.Header)}
		if attempt > 1 && x.body != nil {
			r.Body = io.NopCloser(bytes.NewReader(x.body))
		}
		// An attempt gets a context of its own only when a time-out may
		// cancel it.
		ar, stop := r, func() {}
		if h.adaptive.attemptTimeout > 0 {
			ctx, cancel := context.WithCancel(r.Context())
			timer := time.AfterFunc(h.adaptive.attemptTimeout, func() {
				if aw.phase.CompareAndSwap(phaseWaiting, phaseTimedOut) {
					cancel()
				}
			})
			ar, stop = r.WithContext(ctx), func() { timer.Stop(); cancel() }
		}
		sent := x.learned.learner.Send(h.now())
		err := h.attempt(next, aw, ar, x, sent)
		stop()
		status := aw.status
		if status == 0 && err != nil {
			status = failureStatus(err, aw.phase.Load() == phaseTimedOut)
		}
		now := h.now()
		obs := adaptive.Parse(status, aw.header, aw.held.Bytes(), now)
		if aw.status == 0 {
			// No answer from the upstream: an error Caddy made itself
			// (no upstream available, a refused connection) teaches
			// nothing about the upstream's limits.
			obs.Status = 0
		}
		v := x.learned.learner.Answer(sent, obs, now)
		if v.Changed {
			x.learned.publishing.Lock()
			x.learned.publish(x.learned.learner.Limits())
			x.learned.publishing.Unlock()
			h.updateLearnedLanes(x)
		}
		if v.Retry && obs.Status == http.StatusTooManyRequests || v.Explicit {
			h.blockLearned(x, now)
		}
		if aw.committed {
			// The response went (or is going) to the client as it is.
			metrics.observeAttempt(x.id.model, aw.status, false)
			return err
		}
		if !v.Retry || last || r.Context().Err() != nil {
			metrics.observeAttempt(x.id.model, aw.status, false)
			return aw.giveUp(err, v.Wait)
		}
		if v.Wait <= 0 {
			v.Wait = failureBackoff(attempt)
		}
		wait := jitter(v.Wait, v.Explicit)
		if !now.Add(wait).Before(deadline) && (v.Explicit || obs.Status != http.StatusServiceUnavailable) {
			metrics.observeAttempt(x.id.model, aw.status, false)
			return aw.giveUp(err, v.Wait)
		}
		ok := h.waitToRetry(r.Context(), x, obs.Status, wait, v.Explicit, deadline)
		// Absorbed only if the request is really sent again.
		metrics.observeAttempt(x.id.model, aw.status, ok)
		if !ok {
			return aw.giveUp(err, v.Wait)
		}
	}
}

// attempt sends the request once. reverse_proxy panics with
// http.ErrAbortHandler when the client leaves mid-stream: the learner is
// then told the attempt ended, the attempt is counted, and the panic goes
// on.
func (h *Handler) attempt(next caddyhttp.Handler, aw *attemptWriter, r *http.Request, x *exchange, sent adaptive.Attempt) error {
	done := false
	defer func() {
		if !done {
			x.learned.learner.Abandon(sent)
			// The attempt reached the upstream: count it, as forward
			// counts those that return.
			metrics.observeAttempt(x.id.model, aw.status, false)
		}
	}()
	err := next.ServeHTTP(aw, r)
	done = true
	return err
}

// updateLearnedLanes hands newly learned limits to the queues of their
// buckets.
func (h *Handler) updateLearnedLanes(x *exchange) {
	p := x.learned.limits.Load()
	for _, l := range []*compiledLimit{p.requests, p.tokens, p.concurrent} {
		if l != nil {
			h.state.queue.UpdateLimit(h.adaptive.rule.appendKey(nil, l, &x.id), l.limit)
		}
	}
}

// failureBackoff is the wait after a request's attempt failed without a
// limit being involved (502, 504, no answer): 100 ms, doubling with each
// attempt, at most 2 s.
func failureBackoff(attempt int) time.Duration {
	return min(100*time.Millisecond<<min(attempt-1, 5), 2*time.Second)
}

// failureStatus is the status that stands for an attempt that got no
// answer: 504 for a time-out, 502 otherwise.
func failureStatus(err error, timedOut bool) int {
	var he caddyhttp.HandlerError
	if errors.As(err, &he) && he.StatusCode >= 500 {
		return he.StatusCode
	}
	if timedOut || errors.Is(err, context.DeadlineExceeded) {
		return http.StatusGatewayTimeout
	}
	return http.StatusBadGateway
}

// jitter spreads a wait: ±20 % for a guess, +0 to +20 % for a wait the
// upstream named, which a retry must not undercut.
func jitter(d time.Duration, explicit bool) time.Duration {
	f := 0.8 + 0.4*rand.Float64()
	if explicit {
		f = 1 + 0.2*rand.Float64()
	}
	return time.Duration(float64(d) * f)
}

// blockLearned charges the request's learned request bucket so that it
// admits nothing before the learner's BlockedUntil: the queue then holds
// every request for the upstream until it said it would take them.
func (h *Handler) blockLearned(x *exchange, now time.Time) {
	p := x.learned.limits.Load()
	until := x.learned.learner.Limits().BlockedUntil
	if p.requests == nil || !until.After(now) {
		return
	}
	ch := []bucket.Charge{{Key: h.adaptive.rule.appendKey(nil, p.requests, &x.id), Limit: p.requests.limit}}
	var st [1]bucket.State
	if err := h.state.store.Peek(context.Background(), now, ch, st[:]); err != nil {
		return
	}
	// Up to 20 % later than asked, never earlier: refusals that came
	// together do not all end at the same instant.
	wait := jitter(until.Sub(now), true)
	if n := p.requests.limit.BlockUnits(st[0], wait); n > 0 {
		ch[0].Cost = n
		if err := h.state.store.Adjust(context.Background(), now, ch); err != nil {
			h.logger.Debug("blocking a learned bucket", zap.Error(err))
		}
	}
}

// waitToRetry waits for the request's next turn: in the queue of its
// learned bucket when it has one, which the upstream's Retry-After has
// blocked, or for the wait itself otherwise. It returns false when the turn
// would come after the deadline or the client left.
func (h *Handler) waitToRetry(ctx context.Context, x *exchange, status int, wait time.Duration, explicit bool, deadline time.Time) bool {
	now := h.now()
	p := x.learned.limits.Load()
	switch {
	case status == http.StatusTooManyRequests:
		if i := x.learnedCharge("requests_per_minute"); i >= 0 {
			// The upstream's Retry-After has blocked the learned bucket:
			// its queue holds the request until then.
			return h.admitLearned(ctx, x, x.applied[i].limit, deadline, now)
		}
	case (status == http.StatusServiceUnavailable || status == 529) && p.concurrent != nil:
		// Give back whatever slot the request holds: holding one while
		// waiting for another could leave every slot held by a waiter.
		// Then pause before taking one under the cap as it is now: the
		// time the upstream named, or else a little, since an upstream
		// that just refused is still busy (with requests sent before its
		// cap was learned, too).
		h.releaseLearnedSlots(x)
		if !explicit {
			wait = min(wait, concurrencyPause)
		}
		if !sleepUntil(ctx, now.Add(wait), deadline) {
			return false
		}
		return h.admitLearned(ctx, x, p.concurrent, deadline, h.now())
	}
	// A failure (502, 504, no answer), or nothing learned to queue on:
	// the request's own wait.
	return sleepUntil(ctx, now.Add(wait), deadline)
}

// concurrencyPause bounds the pause before a request refused by a busy
// upstream asks for a slot again.
const concurrencyPause = 300 * time.Millisecond

// sleepUntil waits until t, unless t is past the deadline or ctx ends
// first; it reports whether it waited the whole time.
func sleepUntil(ctx context.Context, t, deadline time.Time) bool {
	if !t.Before(deadline) {
		return false
	}
	d := time.Until(t)
	if d <= 0 {
		return true
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// releaseLearnedSlots gives back the slots of learned concurrency limits
// the request holds.
func (h *Handler) releaseLearnedSlots(x *exchange) {
	// The refunds are built in the request's scratch buffer, as
	// releaseSlots does.
	refunds := x.adjust[:0]
	if i := x.learnedCharge("concurrent_requests"); i >= 0 {
		c := x.charges[i]
		c.Cost = -c.Cost
		refunds = append(refunds, c)
		x.charged[i] = false
	}
	for _, c := range x.extraSlots {
		c.Cost = -c.Cost
		refunds = append(refunds, c)
	}
	x.extraSlots = x.extraSlots[:0]
	x.adjust = refunds
	if len(refunds) > 0 {
		if err := h.state.queue.Give(refunds); err != nil {
			h.logger.Debug("releasing learned slots", zap.Error(err))
		}
	}
}

// admitLearned waits in the queue of one learned bucket, ahead of newcomers.
func (h *Handler) admitLearned(ctx context.Context, x *exchange, l *compiledLimit, deadline, now time.Time) bool {
	ch := []bucket.Charge{{Key: h.adaptive.rule.appendKey(nil, l, &x.id), Limit: l.limit, Cost: 1}}
	wait := deadline.Sub(now)
	if wait <= 0 {
		return false
	}
	req := bucket.Request{
		Charges:  ch,
		States:   make([]bucket.State, 1),
		Policies: []bucket.Policy{{MaxWait: wait, MaxDepth: h.adaptive.policy.MaxDepth}},
		Flow:     x.flow,
		Weight:   x.weight,
		Priority: retryPriority,
	}
	res, err := h.state.queue.Admit(ctx, now, &req)
	if err != nil || res.Outcome != bucket.Admitted {
		return false
	}
	if l.limit.Concurrent() {
		ch[0].Replay = !res.Fallback
		x.extraSlots = append(x.extraSlots, ch[0])
	}
	return true
}

// attemptWriter stands between reverse_proxy and the client for one
// attempt. A response that may be retried (a refusal or failure status,
// while retries remain) is held back: its headers in a map of its own and
// up to maxHeldBody of its body. Anything else goes through at once.
type attemptWriter struct {
	dst    *headerGuard
	header http.Header
	// hold is true when this attempt may be retried.
	hold bool
	// status is the status reverse_proxy wrote, 0 until then.
	status int
	// phase says whether the response began before the attempt's
	// time-out (phaseStarted) or the time-out canceled it first
	// (phaseTimedOut): one atomic, so that the two cannot both win.
	phase     atomic.Int32
	held      bytes.Buffer
	committed bool
}

func (a *attemptWriter) Header() http.Header {
	if a.committed {
		// Trailers are set after the body: they go to the client.
		return a.dst.Header()
	}
	return a.header
}

// Unwrap gives http.ResponseController the client's writer, for deadlines.
func (a *attemptWriter) Unwrap() http.ResponseWriter { return a.dst }

// Phases of an attempt, for its time-out.
const (
	phaseWaiting int32 = iota
	phaseStarted
	phaseTimedOut
)

// retryable statuses are held back.
func retryable(status int) bool {
	switch status {
	case http.StatusTooManyRequests, http.StatusServiceUnavailable, http.StatusBadGateway, http.StatusGatewayTimeout, 529:
		return true
	}
	return false
}

func (a *attemptWriter) WriteHeader(status int) {
	if a.status != 0 || a.committed {
		return
	}
	if status >= 100 && status < 200 && status != http.StatusSwitchingProtocols {
		if !a.hold {
			// An informational response (103 Early Hints) carries its own
			// headers; they must not stay on the final response.
			dst := a.dst.Header()
			saved := dst.Clone()
			a.commitHeader()
			a.dst.WriteHeader(status)
			clear(dst)
			maps.Copy(dst, saved)
		}
		return
	}
	if !a.phase.CompareAndSwap(phaseWaiting, phaseStarted) && a.phase.Load() == phaseTimedOut {
		// The time-out canceled the attempt first (reverse_proxy then
		// writes 499, taking it for a client that left): the upstream did
		// not answer in time.
		status = http.StatusGatewayTimeout
	}
	a.status = status
	if a.hold && retryable(status) {
		return
	}
	a.commit()
}

// holding reports whether the attempt's response is held back.
func (a *attemptWriter) holding() bool { return a.status != 0 && !a.committed }

func (a *attemptWriter) Write(b []byte) (int, error) {
	if a.status == 0 {
		a.WriteHeader(http.StatusOK)
	}
	if a.committed {
		return a.dst.Write(b)
	}
	if a.held.Len()+len(b) > maxHeldBody {
		// Too large to be a refusal worth holding: pass it on.
		a.commit()
		return a.dst.Write(b)
	}
	return a.held.Write(b)
}

// Flush passes a flush on once the response is going to the client.
func (a *attemptWriter) Flush() {
	if a.committed {
		http.NewResponseController(a.dst).Flush()
	}
}

// commitHeader copies the attempt's headers onto the client's response.
// Values are added, so that the header guard sees an upstream field that
// duplicates one of the module's.
func (a *attemptWriter) commitHeader() {
	dst := a.dst.Header()
	for k, vs := range a.header {
		dst[k] = append(dst[k], vs...)
	}
}

// commit sends the held status, headers and body on.
func (a *attemptWriter) commit() {
	a.committed = true
	a.commitHeader()
	a.dst.WriteHeader(a.status)
	if a.held.Len() > 0 {
		a.dst.Write(a.held.Bytes())
		a.held.Reset()
	}
}

// giveUp ends the attempts with the last one's outcome: the upstream's
// answer it held, or, when no answer came, the error for Caddy to answer.
func (a *attemptWriter) giveUp(err error, wait time.Duration) error {
	if a.status == 0 {
		return a.failure(err)
	}
	return a.release(wait)
}

// failure is the error for an attempt that got no answer and will not be
// tried again: a 504 when the module's time-out cut it.
func (a *attemptWriter) failure(err error) error {
	if a.phase.Load() == phaseTimedOut {
		return caddyhttp.Error(http.StatusGatewayTimeout, err)
	}
	return err
}

// release gives up retrying: the upstream's own answer goes to the client,
// with a Retry-After if it had none.
func (a *attemptWriter) release(wait time.Duration) error {
	if a.header.Get("Retry-After") == "" && wait > 0 {
		a.header.Set("Retry-After", retryAfterSeconds(wait))
		a.header.Set("Retry-After-Ms", retryAfterMillis(wait))
	}
	a.commit()
	return nil
}
