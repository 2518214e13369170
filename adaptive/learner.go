// Package adaptive learns an upstream's real limits from its answers: the
// rate-limit headers providers send, the Retry-After of their refusals, and,
// when an upstream says nothing (vLLM, Ollama, a proxy), the refusals
// themselves. What it learns becomes buckets like any other, which hold
// requests in the module's fair queue before they are sent, so that the
// upstream is not hit.
package adaptive

import (
	"math"
	"slices"
	"sync"
	"time"
)

// Tuning of the learning rules. They are constants rather than options: an
// operator who wants other values knows the limit and can write a rule.
const (
	// burstShare is the part of the upstream's learned burst the module
	// uses. The module's bucket and the upstream's start at different
	// moments, and requests reach the upstream with jitter: a little slack
	// keeps the two from disagreeing about the last token.
	burstShare = 0.9
	// rateShare is the part of a measured (not advertised) rate the module
	// paces at: a measurement over a few seconds is off by a request or so.
	rateShare = 0.97
	// probeAfter is how long the module paces at a measured rate without a
	// refusal before it tries a little faster, in case the limit rose.
	probeAfter = 30 * time.Second
	// probeStep is how much faster it then tries.
	probeStep = 1.02
	// measureWindow bounds how far back refusals are used to measure a
	// rate, so that a limit that changes is followed within it.
	measureWindow = 20 * time.Second
	// minMeasureSpan is the shortest span between two refusals that gives
	// a rate when the refusals' Retry-After was precise (milliseconds, or a
	// reset): the count between them is exact, so only the timing jitter
	// of a few milliseconds is noise. coarseMeasureSpan is the shortest
	// when a Retry-After was in whole seconds, which puts the upstream's
	// next unit anywhere within a second.
	minMeasureSpan    = 400 * time.Millisecond
	coarseMeasureSpan = 10 * time.Second
	// dropShare is how far below the measured rate the latest short span
	// must measure for the limit to be taken to have dropped.
	dropShare = 0.85
	// backoffBase and backoffMax bound the wait after a refusal that says
	// nothing about when to come back.
	backoffBase = 250 * time.Millisecond
	backoffMax  = 30 * time.Second
	// maxRefusals is how many recent refusals are kept for measuring.
	maxRefusals = 32
)

// Rate describes a learned limit: Count units per Window with a capacity
// of Burst. Zero Count means nothing is known and nothing is limited.
type Rate struct {
	Count  int64
	Window time.Duration
	Burst  int64
}

// Limits are what a Learner knows about its upstream.
type Limits struct {
	// Requests is the learned request rate.
	Requests Rate
	// Tokens is the learned token rate (from headers only).
	Tokens Rate
	// Concurrent is the learned cap on requests in flight; 0 means none.
	Concurrent int64
	// BlockedUntil is when the upstream said (or the learner guessed) it
	// will take requests again; zero when it is not blocked.
	BlockedUntil time.Time
	// FromHeaders tells whether Requests was advertised by the upstream
	// rather than measured.
	FromHeaders bool
}

// Verdict is what a Learner concludes from one answer.
type Verdict struct {
	// Retry is true when the answer is a refusal or failure worth trying
	// again: 429, 503, 529, 502, 504, or no answer at all.
	Retry bool
	// Wait is how long to wait before trying again (before any jitter).
	Wait time.Duration
	// Explicit is true when Wait came from the upstream (Retry-After or a
	// reset), which a retry must not undercut.
	Explicit bool
	// Changed is true when the learned limits changed.
	Changed bool
}

// refusal is one 429 kept for measuring the upstream's rate.
type refusal struct {
	// sent is when the refused request was sent: the upstream was empty
	// then.
	sent time.Time
	// next is when the upstream's next unit was due: the refusal's time
	// plus its Retry-After, or the time itself when it gave none.
	next time.Time
	// before counts the successes sent before sent. It starts as the
	// successes seen by the time of the refusal, and grows with those
	// that were sent earlier but answered later (a slow or streamed
	// answer), so that it is exact once every earlier request has been
	// answered: the refusal is then settled (see settled).
	before int64
	// coarse tells whether next is only known to within a second.
	coarse bool
}

// Attempt identifies one request sent to the upstream, from Send to
// Answer.
type Attempt struct {
	// epoch is the concurrency cap's epoch at the send.
	epoch uint64
	// sent is when the request was sent; zero when unknown (then the
	// answer's time stands in for it).
	sent time.Time
}

// Learner learns one upstream's limits. It is safe for concurrent use.
type Learner struct {
	mu     sync.Mutex
	limits Limits
	// burstSeen is the largest burst the headers implied.
	burstSeen, tokenBurstSeen int64
	// accepted counts the upstream's successes; refusals keeps recent ones
	// with that count, for measuring the rate the upstream really allows.
	accepted int64
	refusals []refusal
	// measured is the rate, per second, last measured from refusals, and
	// lastMeasured the next due unit of the refusal it was measured to.
	measured     float64
	lastMeasured time.Time
	// lastRefusal is when the upstream last refused for a rate, and
	// firstSeen when the learner saw its first answer.
	lastRefusal, firstSeen time.Time
	// streak counts consecutive refusals that said nothing, for backoff.
	streak int
	// inflight counts requests sent and not yet answered; atCap counts
	// successes since the concurrency cap last changed.
	inflight int64
	// outstanding holds the send times of the requests in flight that
	// Send announced, oldest first, so that a refusal is known to be
	// settled when nothing sent before it is still out.
	outstanding []time.Time
	atCap       int64
	// epoch counts the changes of the concurrency cap. A refusal of a
	// request sent under an earlier cap says nothing about the current
	// one: without this, a burst of refusals sent under a cap too high
	// would each lower it again.
	epoch uint64
	// measuredAt is when measured was last measured.
	measuredAt time.Time
	// probeStreak counts probes in a row without a refusal.
	probeStreak int
	// raised tells whether the current cap epoch began with a probe;
	// doubt counts refusals at the cap that a success at as many in
	// flight contradicts; probeFails counts failed cap probes in a row.
	raised     bool
	doubt      int
	probeFails int
	// ceiling is the last cap a probe failed at (0: none); below it the
	// cap climbs back a step per round at the cap.
	ceiling int64
}

// NewLearner returns a Learner that knows nothing yet.
func NewLearner() *Learner { return &Learner{} }

// Limits returns what the learner knows now.
func (l *Learner) Limits() Limits {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.limits
}

// Where a learned request rate came from, in Snapshot.RequestsSource.
const (
	// SourceHeaders: the upstream advertised it in rate-limit headers.
	SourceHeaders = "headers"
	// SourceMeasured: measured from the spacing of the upstream's
	// refusals (and probed a little higher after a quiet spell).
	SourceMeasured = "measured"
	// SourceRetryAfter: a first guess from the first refusal, its
	// Retry-After (or the rate accepted until then when it had none),
	// until two refusals measure the rate.
	SourceRetryAfter = "retry-after"
)

// Snapshot is a read-only view of a Learner: what it knows and how it came
// to know it.
type Snapshot struct {
	Limits
	// RequestsSource says where Limits.Requests came from: SourceHeaders,
	// SourceMeasured or SourceRetryAfter; empty when nothing is known.
	RequestsSource string
	// MeasuredPerSecond is the rate last measured from refusals (0: none),
	// and MeasuredAt when it was measured.
	MeasuredPerSecond float64
	MeasuredAt        time.Time
	// InFlight counts the requests sent and not yet answered; Accepted
	// counts the upstream's successes.
	InFlight, Accepted int64
	// LastRefusal is when the upstream last refused for a rate (or when a
	// probe last raised the rate); zero when it never has.
	LastRefusal time.Time
}

// Snapshot returns a view of the learner. It changes nothing.
func (l *Learner) Snapshot() Snapshot {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := Snapshot{
		Limits:            l.limits,
		MeasuredPerSecond: l.measured,
		MeasuredAt:        l.measuredAt,
		InFlight:          l.inflight,
		Accepted:          l.accepted,
		LastRefusal:       l.lastRefusal,
	}
	switch {
	case l.limits.FromHeaders:
		s.RequestsSource = SourceHeaders
	case l.measured > 0:
		s.RequestsSource = SourceMeasured
	case l.limits.Requests.Count > 0:
		s.RequestsSource = SourceRetryAfter
	}
	return s
}

// Begin records that a request is being sent to the upstream, without
// saying when; Observe takes its answer. Send and Answer are the precise
// pair.
func (l *Learner) Begin() { l.Send(time.Time{}) }

// Send records that a request is being sent to the upstream at now, and
// returns the Attempt to hand to Answer with its answer.
func (l *Learner) Send(now time.Time) Attempt {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.inflight++
	if !now.IsZero() {
		// Sends come nearly in time order: place this one from the end.
		i := len(l.outstanding)
		for i > 0 && l.outstanding[i-1].After(now) {
			i--
		}
		l.outstanding = slices.Insert(l.outstanding, i, now)
	}
	return Attempt{epoch: l.epoch, sent: now}
}

// Abandon records that a request announced with Send (or Begin, with a
// zero Attempt) ended without an answer to learn from (the client left and
// the handler was aborted).
func (l *Learner) Abandon(a Attempt) {
	l.mu.Lock()
	l.inflight = max(l.inflight-1, 0)
	l.forget(a)
	l.mu.Unlock()
}

// forget removes a's send time from outstanding.
func (l *Learner) forget(a Attempt) {
	if a.sent.IsZero() {
		return
	}
	// Answers come nearly in send order: look from the start.
	for i, t := range l.outstanding {
		if t.Equal(a.sent) {
			l.outstanding = slices.Delete(l.outstanding, i, i+1)
			return
		}
	}
}

// settled reports whether every request sent before r has been answered,
// so that r.before is final.
func (l *Learner) settled(r refusal) bool {
	return len(l.outstanding) == 0 || !l.outstanding[0].Before(r.sent)
}

// Observe learns from one answer to a request announced with Begin, and
// says whether to try again and when. Status 0 in o means no answer: a
// connection error or a time-out.
func (l *Learner) Observe(o Observation, now time.Time) Verdict {
	l.mu.Lock()
	epoch := l.epoch
	l.mu.Unlock()
	return l.Answer(Attempt{epoch: epoch}, o, now)
}

// Answer is Observe for a request announced with Send.
func (l *Learner) Answer(a Attempt, o Observation, now time.Time) Verdict {
	l.mu.Lock()
	defer l.mu.Unlock()
	epoch := a.epoch
	sent := a.sent
	if sent.IsZero() || sent.After(now) {
		sent = now
	}
	inflight := l.inflight
	l.inflight = max(l.inflight-1, 0)
	l.forget(a)
	if l.firstSeen.IsZero() {
		l.firstSeen = now
	}
	before := l.limits
	var v Verdict

	// Advertised limits, on any answer that carries them.
	if q := o.Requests; q.Limit > 0 {
		l.limits.FromHeaders = true
		advertised(q, &l.limits.Requests, &l.burstSeen)
	}
	if q := o.Tokens; q.Limit > 0 {
		advertised(q, &l.limits.Tokens, &l.tokenBurstSeen)
	}

	switch {
	case o.Status >= 200 && o.Status < 400:
		l.accepted++
		l.streak = 0
		l.lateSuccess(sent)
		l.measure(now)
		if l.limits.Concurrent > 0 && inflight >= l.limits.Concurrent {
			// Full use of the cap without a refusal: after a while, try
			// one more.
			l.atCap++
			if l.atCap%l.limits.Concurrent == 0 {
				// A whole round at the cap: a raised cap held, and an
				// earlier doubt is forgotten.
				if l.raised {
					l.raised, l.probeFails = false, 0
					if l.limits.Concurrent >= l.ceiling {
						l.ceiling = 0 // the upstream grew
					}
				}
				l.doubt = 0
			}
			need := l.limits.Concurrent
			if l.ceiling > 0 && l.limits.Concurrent+1 >= l.ceiling {
				need = (10 * l.limits.Concurrent) << min(l.probeFails, 5)
			}
			if l.atCap >= need {
				l.limits.Concurrent++
				l.atCap = 0
				l.epoch++
				l.raised, l.doubt = true, 0
			}
		}
		l.probe(now)
	case o.Status == 429:
		v.Retry = true
		v.Wait, v.Explicit = l.rateRefusal(o, sent, now)
	case o.Status == 503 || o.Status == 529:
		v.Retry = true
		if o.RetryAfter >= 0 {
			v.Wait, v.Explicit = o.RetryAfter, true
		} else {
			v.Wait = l.backoff()
		}
		// An upstream that says nothing and refuses when busy is taken to
		// have a concurrency cap below what was in flight, but only when
		// the request met the cap learned so far: an occasional 503 below
		// it is a failure, not a limit.
		if !o.HasQuota() && epoch == l.epoch && (l.limits.Concurrent == 0 || inflight >= l.limits.Concurrent) &&
			(l.limits.Concurrent == 0 || l.raised || l.doubt >= 1) {
			if l.raised {
				l.probeFails++
				l.ceiling = l.limits.Concurrent
			}
			l.raised, l.doubt = false, 0
			c := max(1, inflight-1)
			if l.limits.Concurrent > 0 {
				// Requests sent before the cap was learned may still be
				// in flight: a refusal never raises the cap.
				c = min(c, l.limits.Concurrent-1)
			}
			l.limits.Concurrent = max(1, c)
			l.atCap = 0
			l.epoch++
		} else if !o.HasQuota() && l.ceiling == 0 && !l.raised && l.limits.Concurrent > 0 && inflight-1 < l.limits.Concurrent {
			// Still learning (the cap has not been probed yet): refusals of
			// requests sent before the cap was learned arrive together,
			// each with fewer in flight. When one arrived, the upstream
			// held at most the others, so its cap is below that count.
			l.limits.Concurrent = max(1, inflight-1)
			l.atCap = 0
			l.epoch++
		} else if !o.HasQuota() && epoch == l.epoch && inflight >= l.limits.Concurrent {
			// At a cap the upstream has held without refusals: one 503
			// may be a failure. A second within a round is a limit.
			l.doubt++
		}
		if v.Explicit {
			l.block(now.Add(v.Wait))
		}
	case o.Status == 502 || o.Status == 504 || o.Status == 0:
		// A failure, not a limit: nothing to learn, and the wait is the
		// request's own (its attempts back off), so that failures of
		// unrelated requests do not make every request wait longer.
		v.Retry = true
	}
	// BlockedUntil moves with every refusal that names a wait; it is read
	// from the learner when needed, and is not a change of the limits.
	after := l.limits
	after.BlockedUntil = before.BlockedUntil
	v.Changed = after != before
	return v
}

// advertised sets r from a quota the upstream advertised (per minute), and
// its burst from the largest one seen: an upstream's bucket refills at
// Limit per minute and is whole after Reset, so what it holds when whole
// is its burst. A burst seen under another limit says nothing.
func advertised(q Quota, r *Rate, seen *int64) {
	if q.Limit != r.Count {
		*seen = 0
	}
	r.Count, r.Window = q.Limit, time.Minute
	if q.Remaining >= 0 && q.Reset >= 0 {
		whole := q.Remaining + int64(q.Reset.Seconds()*float64(q.Limit)/60)
		*seen = max(*seen, min(whole, q.Limit))
	}
	b := *seen
	if b == 0 {
		b = q.Limit
	}
	r.Burst = max(1, int64(float64(b)*burstShare))
}

// rateRefusal learns from a 429 to a request sent at sent, and returns the
// wait before a retry.
func (l *Learner) rateRefusal(o Observation, sent, now time.Time) (time.Duration, bool) {
	l.lastRefusal = now
	wait, explicit := o.RetryAfter, o.RetryAfter >= 0
	coarse := explicit && wait >= time.Second && wait%time.Second == 0
	if !explicit && o.Requests.Remaining == 0 && o.Requests.Reset >= 0 && o.Requests.Limit > 0 {
		// Empty, and whole again after Reset: the next request is due
		// one interval from now, or at the reset if that is sooner.
		wait, explicit = min(o.Requests.Reset, time.Minute/time.Duration(o.Requests.Limit)), true
	}
	if !explicit {
		wait = l.backoff()
		coarse = true
	} else {
		l.streak = 0
	}
	next := now.Add(wait)
	l.block(next)
	if l.limits.FromHeaders {
		return wait, explicit
	}
	// No advertised limit: measure it. The upstream was empty when each
	// refused request arrived, so every unit it made between the first
	// refusal's next due unit and the last one's was taken by a request
	// sent between the two refusals, and the count of those over the time
	// between the two next units is its rate.
	l.refusals = append(l.refusals, refusal{sent: sent, next: next, before: l.accepted, coarse: coarse})
	for len(l.refusals) > maxRefusals || len(l.refusals) > 1 && next.Sub(l.refusals[0].next) > measureWindow {
		l.refusals = l.refusals[1:]
	}
	l.probeStreak = 0
	if l.measure(now) {
		return wait, explicit
	}
	switch {
	case l.measured > 0 && now.Sub(l.measuredAt) <= measureWindow:
		l.setRate(l.measured * rateShare)
	case l.limits.Requests.Count > 0:
		// Refused before a (fresh) rate could be measured: keep the rate,
		// which is above the upstream's, so that the next refusals
		// measure it; Retry-After spaces them.
	default:
		// The first refusal. Until two refusals measure the rate, guess
		// it: no more than was accepted so far on average (which counts
		// the upstream's burst, so it is high), and no more than one
		// request per Retry-After (the time to the upstream's next unit
		// is at most its interval, so this is high too, but closer).
		guess := math.Inf(1)
		if el := now.Sub(l.firstSeen).Seconds(); el > 0 && l.accepted > 0 {
			guess = float64(l.accepted) / el
		}
		if explicit && wait > 0 {
			guess = min(guess, 1/wait.Seconds())
		}
		if math.IsInf(guess, 1) {
			guess = 1
		}
		l.setRate(guess)
	}
	return wait, explicit
}

// lateSuccess counts a success sent at sent, answered at now, into the
// refusals that came before its answer but after its send.
func (l *Learner) lateSuccess(sent time.Time) {
	for i := range l.refusals {
		if l.refusals[i].sent.After(sent) {
			l.refusals[i].before++
		}
	}
}

// measure measures the upstream's rate from the oldest and the latest
// settled refusal kept, and reports whether it did. A refusal that is not
// settled yet may still miss successes sent before it, and would measure
// too low a rate.
func (l *Learner) measure(now time.Time) bool {
	if l.limits.FromHeaders {
		return false // the upstream says its limits: nothing to measure
	}
	last := len(l.refusals) - 1
	for last > 0 && !l.settled(l.refusals[last]) {
		last--
	}
	if last < 1 || !l.settled(l.refusals[0]) {
		return false
	}
	latest := l.refusals[last]
	if latest.next.Equal(l.lastMeasured) {
		return false // measured from this one already
	}
	// A limit that dropped shows first in the latest span: when the
	// shortest recent span that can measure says the rate is well below
	// what was measured, the older refusals belong to the old limit and
	// would only slow the descent.
	if l.measured > 0 && !latest.coarse {
		for j := last - 1; j > 0; j-- {
			r := l.refusals[j]
			span := latest.next.Sub(r.next)
			if span < minMeasureSpan || r.coarse {
				continue
			}
			if n := latest.before - r.before; n >= 1 && float64(n)/span.Seconds() < dropShare*l.measured {
				l.refusals = l.refusals[j:]
				last -= j
			}
			break
		}
	}
	first := l.refusals[0]
	need := minMeasureSpan
	if first.coarse || latest.coarse {
		need = coarseMeasureSpan
	}
	span := latest.next.Sub(first.next)
	n := latest.before - first.before
	if span < need || n < 1 {
		return false
	}
	l.lastMeasured = latest.next
	l.measured = float64(n) / span.Seconds()
	l.measuredAt = now
	l.setRate(l.measured * rateShare)
	return true
}

// setRate sets the learned request rate, in requests per second, as a
// per-minute quota with a burst of one second's worth (at least 1): a
// measured upstream shows no burst the module could rely on.
func (l *Learner) setRate(perSecond float64) {
	perMinute := max(int64(math.Round(perSecond*60)), 1)
	l.limits.Requests = Rate{Count: perMinute, Window: time.Minute, Burst: max(1, int64(perSecond))}
}

// probe tries a little faster after a long spell at a measured rate with
// no refusal.
func (l *Learner) probe(now time.Time) {
	if l.limits.FromHeaders || l.limits.Requests.Count == 0 || l.lastRefusal.IsZero() || now.Sub(l.lastRefusal) < probeAfter {
		return
	}
	l.probeStreak++
	step := min(1+(probeStep-1)*float64(int(1)<<min(l.probeStreak-1, 6)), 1.25)
	l.setRate(float64(l.limits.Requests.Count) / 60 * step)
	l.lastRefusal = now
}

// backoff returns the next wait of an exponential backoff for refusals
// that say nothing about when to come back.
func (l *Learner) backoff() time.Duration {
	d := backoffBase << min(l.streak, 10)
	l.streak++
	return min(d, backoffMax)
}

// block records that the upstream takes nothing before t.
func (l *Learner) block(t time.Time) {
	if t.After(l.limits.BlockedUntil) {
		l.limits.BlockedUntil = t
	}
}
