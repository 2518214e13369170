package adaptive

import (
	"fmt"
	"math"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The tests in this file run the Learner against a simulated upstream on a
// fake clock: plain time.Time values that the simulation advances from one
// event to the next. Nothing sleeps and nothing reads the real clock, so
// every run is exact and repeatable (randomness comes from fixed seeds).

// simEpoch is when every simulation starts.
var simEpoch = time.Date(2025, 6, 1, 0, 0, 0, 0, time.UTC)

// bareObs is an Observation of status that reports nothing else: every
// Quota field and RetryAfter are -1 ("absent"), as Parse builds them.
func bareObs(status int) Observation {
	none := Quota{Limit: -1, Remaining: -1, Reset: -1}
	return Observation{Status: status, Requests: none, Tokens: none, InputTokens: none, OutputTokens: none, RetryAfter: -1}
}

// secs converts seconds to a Duration, rounding up so that a client that
// comes back exactly after a wait the upstream computed finds what it was
// promised.
func secs(s float64) time.Duration {
	return time.Duration(math.Ceil(s * float64(time.Second)))
}

// perSecond is a learned Rate in units per second; +Inf when nothing is
// known (Count 0 means unlimited).
func perSecond(r Rate) float64 {
	if r.Count <= 0 || r.Window <= 0 {
		return math.Inf(1)
	}
	return float64(r.Count) / r.Window.Seconds()
}

// ---------------------------------------------------------------------------
// Simulated upstream.

// dialect is how the simulated upstream reports its limits.
type dialect int

const (
	// dialectHeaders is a token bucket that sends quota headers on every
	// answer (Requests{Limit: R·60, Remaining: ⌊tokens⌋, Reset: time to
	// full}) and, on a 429, a Retry-After of the time to its next token:
	// OpenAI, Azure, Anthropic.
	dialectHeaders dialect = iota
	// dialectRetryAfter is a token bucket whose 429s carry only a
	// Retry-After of the time to its next token, and whose other answers
	// say nothing: Gemini and many gateways.
	dialectRetryAfter
	// dialectSilent has no rate limit but a cap of C requests in flight,
	// and answers 503 without any header to a request beyond it: vLLM,
	// Ollama, a plain proxy.
	dialectSilent
)

func (d dialect) String() string {
	return [...]string{"headers", "retry-after", "silent"}[d]
}

// upstream is the simulated upstream.
type upstream struct {
	dialect dialect
	// Token bucket: capacity burst, refilled at rate per second.
	rate, burst, tokens float64
	last                time.Time
	// Concurrency cap, requests holding a slot, and the chance that a
	// request under the cap is refused anyway.
	conc, busy int
	failProb   float64
	rng        *rand.Rand
}

// refill brings the token bucket to time t.
func (u *upstream) refill(t time.Time) {
	if t.After(u.last) {
		u.tokens = min(u.burst, u.tokens+u.rate*t.Sub(u.last).Seconds())
		u.last = t
	}
}

// setRate changes the hidden rate from time t on.
func (u *upstream) setRate(t time.Time, rate float64) {
	u.refill(t)
	u.rate = rate
}

// answer decides on a request that reaches the upstream at t. It returns
// the observation its answer will carry, whether the request holds a
// concurrency slot until it is answered, and whether a refusal was
// injected at random rather than caused by a limit.
func (u *upstream) answer(t time.Time) (o Observation, holds, injected bool) {
	if u.dialect == dialectSilent {
		switch {
		case u.busy >= u.conc:
			return bareObs(503), false, false
		case u.failProb > 0 && u.rng.Float64() < u.failProb:
			return bareObs(503), false, true
		}
		u.busy++
		return bareObs(200), true, false
	}
	u.refill(t)
	// A token short by float rounding only is there.
	const eps = 1e-9
	if u.tokens >= 1-eps {
		u.tokens = max(u.tokens-1, 0)
		o = bareObs(200)
	} else {
		o = bareObs(429)
		o.RetryAfter = secs((1 - u.tokens) / u.rate)
	}
	if u.dialect == dialectHeaders {
		o.Requests = Quota{
			Limit:     int64(math.Round(u.rate * 60)),
			Remaining: int64(math.Floor(u.tokens + eps)),
			Reset:     secs((u.burst - u.tokens) / u.rate),
		}
	}
	return o, false, false
}

// ---------------------------------------------------------------------------
// Simulated client: the module's queue, reduced to what matters here.

// gcra is the test's own GCRA, the form the module's buckets use (see
// package bucket): a request conforms when the theoretical arrival time,
// moved one interval on, is no further ahead of now than the capacity's
// span.
type gcra struct {
	rate Rate
	tat  time.Time
}

func (g *gcra) interval() time.Duration { return g.rate.Window / time.Duration(g.rate.Count) }

func (g *gcra) tolerance() time.Duration {
	b := g.rate.Burst
	if b <= 0 {
		b = g.rate.Count
	}
	return time.Duration(float64(g.rate.Window) * float64(b) / float64(g.rate.Count))
}

// set changes the limit, keeping the backlog in units as the module's
// buckets do when a limit changes.
func (g *gcra) set(r Rate, now time.Time) {
	if r == g.rate {
		return
	}
	if g.rate.Count > 0 && g.tat.After(now) {
		units := float64(g.tat.Sub(now)) / float64(g.interval())
		g.rate = r
		g.tat = now.Add(time.Duration(units * float64(g.interval())))
		return
	}
	g.rate = r
}

// conformAt is the earliest time from now on at which one request conforms.
func (g *gcra) conformAt(now time.Time) time.Time {
	at := g.tat.Add(g.interval() - g.tolerance())
	if at.Before(now) {
		return now
	}
	return at
}

func (g *gcra) charge(now time.Time) {
	if g.tat.Before(now) {
		g.tat = now
	}
	g.tat = g.tat.Add(g.interval())
}

// block makes the bucket admit nothing before until, and exactly one
// request at until, as the module's blockLearned does with BlockUnits.
func (g *gcra) block(until time.Time) {
	if t := until.Add(g.tolerance() - g.interval()); t.After(g.tat) {
		g.tat = t
	}
}

// simConfig describes one simulation.
type simConfig struct {
	dialect dialect
	// rate and burst are the hidden token bucket (requests per second,
	// requests); conc the hidden concurrency cap.
	rate, burst float64
	conc        int
	// service is the mean time a success holds its slot in the silent
	// dialect (uniform within ±50 %).
	service time.Duration
	// failProb is the share of requests under the cap refused anyway.
	failProb float64
	// okLatency is the time from sending to the end of a successful answer
	// (rate dialects); refuseLatency the time to a refusal.
	okLatency, refuseLatency time.Duration
	// load is the offered load as a multiple of the hidden rate (for the
	// silent dialect, conc/service).
	load     float64
	duration time.Duration
	// At changeAt (if > 0) the hidden rate is multiplied by changeBy, and
	// the offered load follows it.
	changeAt time.Duration
	changeBy float64
	seed     uint64
	// plain makes the client call Begin and Observe; by default it calls
	// Send and Answer, as the module does.
	plain bool
	// onAnswer, if set, is called after each Observe.
	onAnswer func(n int, o Observation, v Verdict, lim Limits)
}

// simSample is the state of a simulation at one moment; the counts are
// cumulative from the start.
type simSample struct {
	at                                 time.Duration
	lim                                Limits
	hidden                             float64
	sends, ok, refused, injected, held int
}

// simResult is what a simulation recorded, every sampleEvery.
type simResult struct {
	cfg     simConfig
	samples []simSample
}

const sampleEvery = 100 * time.Millisecond

// runSim runs one simulation: requests arrive at load × the hidden rate and
// wait in a queue; one is sent whenever the learner's limits admit it (the
// learned request rate in a GCRA, never before BlockedUntil, at most
// Concurrent in flight), with Begin before the send and Observe after the
// answer. A refused request goes back to the head of the queue.
func runSim(cfg simConfig) *simResult {
	if cfg.okLatency == 0 {
		cfg.okLatency = 100 * time.Millisecond
	}
	if cfg.refuseLatency == 0 {
		cfg.refuseLatency = 50 * time.Millisecond
	}
	if cfg.load == 0 {
		cfg.load = 1.5
	}
	rng := rand.New(rand.NewPCG(cfg.seed, 0x6c6561726e6572))
	up := &upstream{dialect: cfg.dialect, rate: cfg.rate, burst: cfg.burst, tokens: cfg.burst, last: simEpoch, conc: cfg.conc, failProb: cfg.failProb, rng: rng}
	hidden := func() float64 {
		if cfg.dialect == dialectSilent {
			return float64(cfg.conc) / cfg.service.Seconds()
		}
		return up.rate
	}
	learner := NewLearner()
	res := &simResult{cfg: cfg}

	type answer struct {
		at             time.Time
		obs            Observation
		holds, injects bool
		attempt        Attempt
		seq            int
	}
	var pending []answer // sorted by at, then seq
	var (
		queue, inflight                    int
		sends, ok, refused, injected, seen int
		bucket                             gcra
		seq                                int
	)
	end := simEpoch.Add(cfg.duration)
	gap := time.Duration(float64(time.Second) / (cfg.load * hidden()))
	nextArrival, nextSample := simEpoch, simEpoch
	changeAt := time.Time{}
	if cfg.changeAt > 0 {
		changeAt = simEpoch.Add(cfg.changeAt)
	}

	// canSend reports whether a request may be sent now, and if not, when
	// to look again (zero: when an answer comes).
	canSend := func(now time.Time) (bool, time.Time) {
		lim := learner.Limits()
		if now.Before(lim.BlockedUntil) {
			return false, lim.BlockedUntil
		}
		if lim.Concurrent > 0 && int64(inflight) >= lim.Concurrent {
			return false, time.Time{}
		}
		if lim.Requests.Count > 0 {
			bucket.set(lim.Requests, now)
			if at := bucket.conformAt(now); at.After(now) {
				return false, at
			}
		}
		return true, time.Time{}
	}

	for now := simEpoch; now.Before(end); {
		// The hidden rate changes.
		if !changeAt.IsZero() && !now.Before(changeAt) {
			up.setRate(now, up.rate*cfg.changeBy)
			cfg.conc = int(math.Round(float64(cfg.conc) * cfg.changeBy))
			up.conc = cfg.conc
			gap = time.Duration(float64(time.Second) / (cfg.load * hidden()))
			changeAt = time.Time{}
		}
		// Answers due.
		for len(pending) > 0 && !pending[0].at.After(now) {
			a := pending[0]
			pending = pending[1:]
			inflight--
			if a.holds {
				up.busy--
			}
			var v Verdict
			if cfg.plain {
				v = learner.Observe(a.obs, a.at)
			} else {
				v = learner.Answer(a.attempt, a.obs, a.at)
			}
			lim := learner.Limits()
			switch s := a.obs.Status; {
			case s >= 200 && s < 300:
				ok++
			default:
				refused++
				if a.injects {
					injected++
				}
			}
			if v.Retry {
				queue++ // the retry goes back to the queue, ahead of newcomers
			}
			if v.Retry && a.obs.Status == 429 || v.Explicit {
				// What the module's blockLearned does.
				if lim.Requests.Count > 0 {
					bucket.set(lim.Requests, now)
					bucket.block(lim.BlockedUntil)
				}
			}
			if cfg.onAnswer != nil {
				cfg.onAnswer(seen, a.obs, v, lim)
			}
			seen++
		}
		// Arrivals due.
		for !nextArrival.After(now) {
			queue++
			nextArrival = nextArrival.Add(gap)
		}
		// Sends.
		wake := time.Time{}
		for queue > 0 {
			can, at := canSend(now)
			if !can {
				wake = at
				break
			}
			if lim := learner.Limits(); lim.Requests.Count > 0 {
				bucket.charge(now)
			}
			queue--
			inflight++
			sends++
			var attempt Attempt
			if cfg.plain {
				learner.Begin()
			} else {
				attempt = learner.Send(now)
			}
			o, holds, inj := up.answer(now)
			// Answers take their latency ±20 % (a success in the silent
			// dialect holds its slot for the service time ±50 %).
			lat := time.Duration(float64(cfg.refuseLatency) * (0.8 + 0.4*rng.Float64()))
			if o.Status == 200 {
				lat = time.Duration(float64(cfg.okLatency) * (0.8 + 0.4*rng.Float64()))
				if cfg.dialect == dialectSilent {
					lat = time.Duration(float64(cfg.service) * (0.5 + rng.Float64()))
				}
			}
			a := answer{at: now.Add(lat), obs: o, holds: holds, injects: inj, attempt: attempt, seq: seq}
			seq++
			i := sort.Search(len(pending), func(i int) bool { return pending[i].at.After(a.at) })
			pending = append(pending, answer{})
			copy(pending[i+1:], pending[i:])
			pending[i] = a
		}
		// Samples.
		if !nextSample.After(now) {
			res.samples = append(res.samples, simSample{
				at: now.Sub(simEpoch), lim: learner.Limits(), hidden: hidden(),
				sends: sends, ok: ok, refused: refused, injected: injected, held: queue,
			})
			nextSample = nextSample.Add(sampleEvery)
		}
		// The next event.
		next := nextArrival
		if nextSample.Before(next) {
			next = nextSample
		}
		if len(pending) > 0 && pending[0].at.Before(next) {
			next = pending[0].at
		}
		if !wake.IsZero() && wake.Before(next) {
			next = wake
		}
		if !changeAt.IsZero() && changeAt.Before(next) {
			next = changeAt
		}
		if !next.After(now) {
			next = now.Add(time.Nanosecond)
		}
		now = next
	}
	return res
}

// at returns the last sample taken at or before d.
func (r *simResult) at(d time.Duration) simSample {
	i := sort.Search(len(r.samples), func(i int) bool { return r.samples[i].at > d })
	return r.samples[max(i-1, 0)]
}

// between returns the counts of the interval (from, to].
func (r *simResult) between(from, to time.Duration) (sends, ok, refused, injected int) {
	a, b := r.at(from), r.at(to)
	if from <= 0 {
		a = simSample{}
	}
	return b.sends - a.sends, b.ok - a.ok, b.refused - a.refused, b.injected - a.injected
}

// learned returns the learned request rate, per second, at d.
func (r *simResult) learned(d time.Duration) float64 { return perSecond(r.at(d).lim.Requests) }

// firstFrom returns the first time at or after from when cond holds, or -1.
func (r *simResult) firstFrom(from time.Duration, cond func(simSample) bool) time.Duration {
	for _, s := range r.samples {
		if s.at >= from && cond(s) {
			return s.at
		}
	}
	return -1
}

// settledCap is the learned cap held longest within [from, to]: what the
// learner settled on, leaving out the brief steps of a probe.
func (r *simResult) settledCap(from, to time.Duration) int64 {
	n := map[int64]int{}
	best := int64(-1)
	for _, s := range r.samples {
		if s.at >= from && s.at <= to {
			n[s.lim.Concurrent]++
			if best < 0 || n[s.lim.Concurrent] > n[best] {
				best = s.lim.Concurrent
			}
		}
	}
	return best
}

// trace formats the learned rate (or cap) every step, for the log.
func (r *simResult) trace(from, to, step time.Duration) string {
	var b strings.Builder
	for d := from; d <= to; d += step {
		s := r.at(d)
		if r.cfg.dialect == dialectSilent {
			fmt.Fprintf(&b, " %v:%d", d, s.lim.Concurrent)
		} else {
			fmt.Fprintf(&b, " %v:%.2f", d, perSecond(s.lim.Requests))
		}
	}
	return b.String()
}

// ---------------------------------------------------------------------------
// Scenarios.

// TestLearnerSimHeaders: an upstream that advertises its limit on every
// answer.
func TestLearnerSimHeaders(t *testing.T) {
	const R, B = 10.0, 30.0
	var first Limits
	var firstObs Observation
	res := runSim(simConfig{
		dialect: dialectHeaders, rate: R, burst: B, duration: 5 * time.Minute, seed: 1,
		onAnswer: func(n int, o Observation, v Verdict, lim Limits) {
			if n == 0 {
				first, firstObs = lim, o
			}
		},
	})
	if first.Requests.Count != firstObs.Requests.Limit || !first.FromHeaders {
		t.Errorf("after the first answer Requests = %+v (FromHeaders %v), want Count %d as advertised", first.Requests, first.FromHeaders, firstObs.Requests.Limit)
	}
	final := res.at(5 * time.Minute).lim
	t.Logf("after the first answer: Requests %+v (advertised Limit %d); at 5m: %+v; upstream capacity %v", first.Requests, firstObs.Requests.Limit, final.Requests, B)
	if b := final.Requests.Burst; b >= B || b < 1 {
		t.Errorf("learned Burst %d, want 1 ≤ Burst < upstream capacity %v", b, B)
	}
	sends, ok, refused, _ := res.between(0, 5*time.Minute)
	capacity := B + R*300
	refusedShare, used := float64(refused)/float64(sends), float64(ok)/capacity
	t.Logf("5 min: %d sends, %d accepted, %d refused (%.2f %% of sends), used %.2f %% of the upstream's %v", sends, ok, refused, 100*refusedShare, 100*used, capacity)
	if refusedShare > 0.01 {
		t.Errorf("refusals %.2f %% of sends, want ≤ 1 %%", 100*refusedShare)
	}
	if used < 0.95 {
		t.Errorf("used %.2f %% of the upstream's limit, want ≥ 95 %%", 100*used)
	}
}

// TestLearnerSimRetryAfter: an upstream whose only hint is the Retry-After
// of its 429s. The first case is the reference; the others vary the rate
// and how long successful answers take (a streamed
// completion is observed when it ends, seconds after the upstream accepted
// it, while a 429 comes back at once).
func TestLearnerSimRetryAfter(t *testing.T) {
	for _, c := range []struct {
		name      string
		rate, b   float64
		okLatency time.Duration
		// maxRefused is the share of sends the upstream may refuse. At 1
		// request per second, each probe that finds the limit is a larger
		// share of a small total: 6 refusals in 5 minutes are 2 %.
		// Answers that take 5 s keep the first measurement waiting for
		// them (see Learner.measure), at the first guess, for 5 s.
		maxRefused float64
	}{
		{"R=10/s", 10, 30, 100 * time.Millisecond, 0.005},
		{"R=10/s,answers-take-5s", 10, 30, 5 * time.Second, 0.02},
		{"R=1/s", 1, 3, 100 * time.Millisecond, 0.025},
	} {
		t.Run(c.name, func(t *testing.T) {
			R := c.rate
			res := runSim(simConfig{dialect: dialectRetryAfter, rate: R, burst: c.b, okLatency: c.okLatency, duration: 5 * time.Minute, seed: 2})
			t.Logf("learned rate (per s) over time:%s", res.trace(0, 60*time.Second, 2*time.Second))
			t.Logf("learned rate (per s) over time:%s", res.trace(time.Minute, 5*time.Minute, 30*time.Second))
			at30 := res.learned(30*time.Second) / R
			inBand := func(s simSample) bool {
				x := perSecond(s.lim.Requests) / R
				return x >= 0.9 && x <= 1.0
			}
			t.Logf("learned/hidden at 30 s: %.3f; first within [0.9, 1.0]: %v", at30, res.firstFrom(0, inBand))
			if at30 < 0.9 || at30 > 1.0 {
				t.Errorf("learned rate at 30 s is %.3f × the hidden rate, want within [0.9, 1.0]", at30)
			}
			sends, ok, refused, _ := res.between(0, 5*time.Minute)
			capacity := c.b + R*300
			refusedShare, used := float64(refused)/float64(sends), float64(ok)/capacity
			t.Logf("5 min: %d sends, %d accepted, %d refused (%.2f %% of sends), used %.2f %% of the upstream's %v", sends, ok, refused, 100*refusedShare, 100*used, capacity)
			if refusedShare > c.maxRefused {
				t.Errorf("refusals %.2f %% of sends, want ≤ %.0f %%", 100*refusedShare, 100*c.maxRefused)
			}
			if used < 0.95 {
				t.Errorf("used %.2f %% of the upstream's limit, want ≥ 95 %%", 100*used)
			}
		})
	}
}

// TestLearnerSimChange: the hidden rate halves, or doubles, at minute 2.
func TestLearnerSimChange(t *testing.T) {
	const R, B = 10.0, 30.0
	const change = 2 * time.Minute
	for _, d := range []dialect{dialectHeaders, dialectRetryAfter} {
		t.Run(d.String()+"/halved", func(t *testing.T) {
			res := runSim(simConfig{dialect: d, rate: R, burst: B, duration: 5 * time.Minute, changeAt: change, changeBy: 0.5, seed: 3})
			newRate := R / 2
			t.Logf("learned rate (per s):%s", res.trace(change-10*time.Second, change+40*time.Second, 2*time.Second))
			x := res.learned(change+30*time.Second) / newRate
			follow := res.firstFrom(change, func(s simSample) bool { return perSecond(s.lim.Requests) <= newRate })
			sends, _, refused, _ := res.between(change, change+30*time.Second)
			sends5, ok5, refused5, _ := res.between(change, 5*time.Minute)
			t.Logf("30 s after halving: learned %.3f × the new rate; first at or below it %v after the change; %d of %d sends refused in those 30 s; minutes 2-5: %d refused of %d sends (%.2f %%), used %.2f %%",
				x, follow-change, refused, sends, refused5, sends5, 100*float64(refused5)/float64(sends5), 100*float64(ok5)/(newRate*180))
			if x < 0.85 || x > 1.0 {
				t.Errorf("30 s after the halving the learned rate is %.3f × the new rate, want within [0.85, 1.0]", x)
			}
			// The drop shows in the first short span measured after it.
			if follow-change > 5*time.Second || refused > 5 {
				t.Errorf("followed the halving after %v with %d refusals, want within 5 s and at most 5", follow-change, refused)
			}
		})
		t.Run(d.String()+"/doubled", func(t *testing.T) {
			// Run well past the 3 minutes asked about, to log how long the
			// learner takes to find the new rate and whether it stays.
			const horizon = 40 * time.Minute
			res := runSim(simConfig{dialect: d, rate: R, burst: B, duration: horizon, changeAt: change, changeBy: 2, seed: 4})
			newRate := 2 * R
			before := res.learned(change - sampleEvery)
			after := res.learned(change + 3*time.Minute)
			rise := after/before - 1
			reach := func(f float64) time.Duration {
				at := res.firstFrom(change, func(s simSample) bool { return perSecond(s.lim.Requests) >= f })
				if at < 0 {
					return -1
				}
				return at - change
			}
			t.Logf("learned rate (per s):%s", res.trace(change-10*time.Second, change+3*time.Minute, 15*time.Second))
			t.Logf("learned before the doubling %.2f/s, 3 min after %.2f/s: +%.1f %%; reached +10 %% after %v, +20 %% after %v, 0.9 × the new rate (%.0f/s) after %v (-1: not within %v)",
				before, after, 100*rise, reach(1.1*before), reach(1.2*before), newRate, reach(0.9*newRate), horizon-change)
			if d == dialectRetryAfter {
				t.Logf("learned rate (per s), long run:%s", res.trace(change, horizon, 2*time.Minute))
				sends, ok, refused, _ := res.between(change, horizon)
				t.Logf("minutes 2-%v: used %.1f %% of the new rate, %d refused of %d sends", horizon.Minutes(), 100*float64(ok)/(newRate*(horizon-change).Seconds()), refused, sends)
			}
			if rise < 0.2 {
				t.Errorf("3 min after the doubling the learned rate rose %.1f %%, want ≥ 20 %%", 100*rise)
			}
			for _, s := range res.samples {
				if s.at > change+3*time.Minute {
					break
				}
				if s.at > change && perSecond(s.lim.Requests) < before*0.999 {
					t.Errorf("after the doubling the learned rate fell to %.2f/s at %v (was %.2f/s)", perSecond(s.lim.Requests), s.at, before)
					break
				}
			}
		})
	}
}

// TestLearnerSimDoubledThenRefused shows what the retry-after learner does
// once probing has found a doubled rate and meets its first refusal there.
func TestLearnerSimDoubledThenRefused(t *testing.T) {
	const R, B = 10.0, 30.0
	const change = 2 * time.Minute
	const horizon = 40 * time.Minute
	res := runSim(simConfig{dialect: dialectRetryAfter, rate: R, burst: B, duration: horizon, changeAt: change, changeBy: 2, seed: 4})
	newRate := 2 * R
	reached := res.firstFrom(change, func(s simSample) bool { return perSecond(s.lim.Requests) >= 0.9*newRate })
	if reached < 0 {
		t.Skipf("the learned rate never reached 0.9 × the doubled rate within %v; see TestLearnerSimChange", horizon)
	}
	low := math.Inf(1)
	var lowAt time.Duration
	for _, s := range res.samples {
		if s.at >= reached {
			if x := perSecond(s.lim.Requests); x < low {
				low, lowAt = x, s.at
			}
		}
	}
	t.Logf("reached 0.9 × the doubled rate at %v; lowest learned rate after that: %.2f/s (%.2f × the new rate) at %v", reached, low, low/newRate, lowAt)
	if low < 0.85*newRate {
		t.Errorf("after finding the doubled rate the learner fell back to %.2f/s = %.2f × it at %v, want ≥ 0.85 ×", low, low/newRate, lowAt)
	}
}

// concStats summarises the learned cap of a silent-dialect run after a
// warm-up: the share of time at each value and the longest spell below
// C−1.
func concStats(res *simResult, warmup time.Duration) (share map[int64]float64, below float64, longest time.Duration) {
	share = map[int64]float64{}
	c := int64(res.cfg.conc)
	var n int
	var run time.Duration
	for _, s := range res.samples {
		if s.at < warmup {
			continue
		}
		n++
		share[s.lim.Concurrent]++
		if s.lim.Concurrent < c-1 {
			below++
			run += sampleEvery
			longest = max(longest, run)
		} else {
			run = 0
		}
	}
	for k := range share {
		share[k] /= float64(n)
	}
	return share, below / float64(n), longest
}

func formatShare(share map[int64]float64) string {
	keys := make([]int64, 0, len(share))
	for k := range share {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i] < keys[j] })
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, " %d:%.1f%%", k, 100*share[k])
	}
	return b.String()
}

// apis are the two ways a client can report its requests: Send and
// Answer, as the module does, and plain Begin and Observe.
var apis = []struct {
	name  string
	plain bool
}{{"module-api", false}, {"plain-api", true}}

// TestLearnerSimConcurrency: an upstream that says nothing and answers 503
// beyond C requests in flight.
func TestLearnerSimConcurrency(t *testing.T) {
	const warmup = 30 * time.Second
	for _, api := range apis {
		for _, C := range []int{8, 2, 4, 16} {
			t.Run(fmt.Sprintf("%s/C=%d", api.name, C), func(t *testing.T) {
				res := runSim(simConfig{dialect: dialectSilent, conc: C, service: time.Second, duration: 5 * time.Minute, seed: uint64(10 + C), plain: api.plain})
				share, _, _ := concStats(res, warmup)
				final := res.settledCap(4*time.Minute, 5*time.Minute)
				sends, ok, refused, _ := res.between(0, 5*time.Minute)
				near := share[int64(C-1)] + share[int64(C)] + share[int64(C+1)]
				t.Logf("learned cap over time:%s", res.trace(0, 5*time.Minute, 15*time.Second))
				t.Logf("cap after %v, share of time:%s; settled in the last minute %d; 5 min: %d sends, %d 503 (%.2f %%), %d accepted (%.1f %% of C/service)",
					warmup, formatShare(share), final, sends, refused, 100*float64(refused)/float64(sends), ok, 100*float64(ok)/(float64(C)*300))
				if final != int64(C) && final != int64(C-1) {
					t.Errorf("learned Concurrent settled at %d in the last minute, want %d or %d", final, C, C-1)
				}
				if near < 0.95 {
					t.Errorf("learned Concurrent within [C−1, C+1] %.1f %% of the time after %v, want ≥ 95 %%", 100*near, warmup)
				}
				if s := float64(refused) / float64(sends); s > 0.02 {
					t.Errorf("503s %.2f %% of sends, want ≤ 2 %%", 100*s)
				}
			})
		}
	}
}

// TestLearnerSimConcurrencyRandom503: as above, but 1 % of the requests
// under the cap are refused anyway. That must not pull the learned cap
// below C−1 for long.
func TestLearnerSimConcurrencyRandom503(t *testing.T) {
	const warmup = 30 * time.Second
	for _, api := range apis {
		for _, C := range []int{8, 4, 16} {
			t.Run(fmt.Sprintf("%s/C=%d", api.name, C), func(t *testing.T) {
				res := runSim(simConfig{dialect: dialectSilent, conc: C, service: time.Second, failProb: 0.01, duration: 5 * time.Minute, seed: uint64(20 + C), plain: api.plain})
				share, below, longest := concStats(res, warmup)
				minCap := int64(math.MaxInt64)
				for _, s := range res.samples {
					if s.at >= warmup {
						minCap = min(minCap, s.lim.Concurrent)
					}
				}
				sends, ok, refused, injected := res.between(0, 5*time.Minute)
				t.Logf("learned cap over time:%s", res.trace(0, 5*time.Minute, 15*time.Second))
				t.Logf("cap after %v, share of time:%s; lowest %d; below C−1 %.1f %% of the time, longest spell %v; 5 min: %d sends, %d 503 (%d injected, %d from the cap: %.2f %% of sends), %d accepted (%.1f %% of C/service)",
					warmup, formatShare(share), minCap, 100*below, longest, sends, refused, injected, refused-injected, 100*float64(refused-injected)/float64(sends), ok, 100*float64(ok)/(float64(C)*300))
				if below > 0.05 || longest > 20*time.Second {
					t.Errorf("learned Concurrent below C−1 = %d for %.1f %% of the time (longest %v), want ≤ 5 %% and no spell over 20 s", C-1, 100*below, longest)
				}
			})
		}
	}
}

// TestLearnerSimConcurrencyHalved: the hidden cap halves at minute 2; the
// learned cap must follow. Whatever keeps random 503s from lowering the
// cap must not keep a real decrease from lowering it.
func TestLearnerSimConcurrencyHalved(t *testing.T) {
	const C, change = 8, 2 * time.Minute
	res := runSim(simConfig{dialect: dialectSilent, conc: C, service: time.Second, duration: 5 * time.Minute, changeAt: change, changeBy: 0.5, seed: 30})
	t.Logf("learned cap over time:%s", res.trace(change-10*time.Second, change+40*time.Second, 2*time.Second))
	follow := res.firstFrom(change, func(s simSample) bool { return s.lim.Concurrent <= C/2 })
	sends, _, refused, _ := res.between(change, change+30*time.Second)
	at := res.settledCap(change+25*time.Second, change+35*time.Second)
	t.Logf("cap %d → %d at %v: learned cap %d 30 s later, first ≤ %d after %v; %d of %d sends refused in those 30 s", C, C/2, change, at, C/2, follow-change, refused, sends)
	if at < C/2-1 || at > C/2 {
		t.Errorf("30 s after the cap halved the learned cap is %d, want %d or %d", at, C/2-1, C/2)
	}
}

// ---------------------------------------------------------------------------
// Verdicts.

func TestLearnerVerdictRetry(t *testing.T) {
	for _, c := range []struct {
		status int
		retry  bool
	}{
		{429, true}, {503, true}, {529, true}, {502, true}, {504, true}, {0, true},
		{200, false}, {201, false}, {400, false}, {401, false}, {403, false}, {404, false},
	} {
		for _, ra := range []time.Duration{-1, 3 * time.Second} {
			l := NewLearner()
			l.Begin()
			o := bareObs(c.status)
			o.RetryAfter = ra
			v := l.Observe(o, simEpoch)
			if v.Retry != c.retry {
				t.Errorf("status %d (RetryAfter %v): Retry = %v, want %v", c.status, ra, v.Retry, c.retry)
			}
			if !c.retry && (v.Wait != 0 || v.Explicit) {
				t.Errorf("status %d (RetryAfter %v): Wait %v, Explicit %v for an answer not to retry", c.status, ra, v.Wait, v.Explicit)
			}
			if v.Retry && v.Wait < 0 {
				t.Errorf("status %d: negative Wait %v", c.status, v.Wait)
			}
		}
	}
}

// TestLearnerVerdictExplicit: Explicit exactly when the Wait is the
// upstream's (Retry-After, or the reset of an empty quota), and then Wait
// is that value; otherwise Wait is the first backoff step.
func TestLearnerVerdictExplicit(t *testing.T) {
	quota := func(status int, q Quota, ra time.Duration) Observation {
		o := bareObs(status)
		o.Requests, o.RetryAfter = q, ra
		return o
	}
	for _, c := range []struct {
		name     string
		o        Observation
		explicit bool
		wait     time.Duration
	}{
		{"429 retry-after", quota(429, Quota{-1, -1, -1}, 2*time.Second), true, 2 * time.Second},
		{"429 retry-after 0", quota(429, Quota{-1, -1, -1}, 0), true, 0},
		{"429 retry-after beats reset", quota(429, Quota{600, 0, 6 * time.Second}, 3*time.Second), true, 3 * time.Second},
		{"429 empty quota, reset later than one interval", quota(429, Quota{600, 0, 6 * time.Second}, -1), true, 100 * time.Millisecond},
		{"429 empty quota, reset sooner", quota(429, Quota{600, 0, 20 * time.Millisecond}, -1), true, 20 * time.Millisecond},
		{"429 quota not empty", quota(429, Quota{600, 5, 6 * time.Second}, -1), false, backoffBase},
		{"429 empty quota without limit", quota(429, Quota{-1, 0, 6 * time.Second}, -1), false, backoffBase},
		{"429 empty quota without reset", quota(429, Quota{600, 0, -1}, -1), false, backoffBase},
		{"429 nothing", bareObs(429), false, backoffBase},
		{"503 retry-after", quota(503, Quota{-1, -1, -1}, 5*time.Second), true, 5 * time.Second},
		{"529 retry-after", quota(529, Quota{-1, -1, -1}, 5*time.Second), true, 5 * time.Second},
		{"503 nothing", bareObs(503), false, backoffBase},
		{"529 nothing", bareObs(529), false, backoffBase},
		// A failure that is not a limit leaves the wait to the request
		// (its own attempts back off): Wait is 0. Retry-After means
		// something on 429 and 503 (RFC 9110, 6585), not on a gateway's
		// failure.
		{"502 nothing", bareObs(502), false, 0},
		{"504 nothing", bareObs(504), false, 0},
		{"no answer", bareObs(0), false, 0},
		{"502 retry-after ignored", quota(502, Quota{-1, -1, -1}, 5*time.Second), false, 0},
		{"504 retry-after ignored", quota(504, Quota{-1, -1, -1}, 5*time.Second), false, 0},
	} {
		l := NewLearner()
		l.Begin()
		v := l.Observe(c.o, simEpoch)
		if !v.Retry || v.Explicit != c.explicit || v.Wait != c.wait {
			t.Errorf("%s: Retry %v, Explicit %v, Wait %v; want true, %v, %v", c.name, v.Retry, v.Explicit, v.Wait, c.explicit, c.wait)
		}
		if lim := l.Limits(); v.Explicit && !lim.BlockedUntil.Equal(simEpoch.Add(v.Wait)) {
			t.Errorf("%s: BlockedUntil %v, want now + Wait %v", c.name, lim.BlockedUntil.Sub(simEpoch), v.Wait)
		}
	}
}

// TestLearnerBackoff: without any hint, the wait doubles from backoffBase up
// to backoffMax, stays there, and starts over after a success (but not
// after an answer that says nothing about the upstream, like a 400).
func TestLearnerBackoff(t *testing.T) {
	if backoffBase <= 0 || backoffMax < backoffBase {
		t.Fatalf("backoffBase %v, backoffMax %v", backoffBase, backoffMax)
	}
	// 502, 504 and no answer are failures, not limits: their wait is the
	// request's own (see TestLearnerVerdictExplicit).
	for _, status := range []int{503, 529, 429} {
		l := NewLearner()
		now := simEpoch
		var waits []time.Duration
		want := backoffBase
		for i := range 14 {
			l.Begin()
			v := l.Observe(bareObs(status), now)
			waits = append(waits, v.Wait)
			if v.Explicit || v.Wait != want {
				t.Errorf("status %d, refusal %d: Wait %v (Explicit %v), want %v", status, i+1, v.Wait, v.Explicit, want)
			}
			want = min(2*want, backoffMax)
			now = now.Add(v.Wait)
			if i == 3 {
				// A 400 in between changes nothing.
				l.Begin()
				l.Observe(bareObs(400), now)
			}
		}
		if last := waits[len(waits)-1]; last != backoffMax {
			t.Errorf("status %d: backoff ends at %v, want the cap %v", status, last, backoffMax)
		}
		if status == 503 {
			t.Logf("backoff without hints: %v", waits)
		}
		l.Begin()
		l.Observe(bareObs(200), now)
		l.Begin()
		if v := l.Observe(bareObs(status), now); v.Wait != backoffBase {
			t.Errorf("status %d: after a success Wait %v, want %v", status, v.Wait, backoffBase)
		}
	}
}

// learnerState is everything a Learner knows except its in-flight count
// and the time of its first answer.
type learnerState struct {
	limits                    Limits
	burstSeen, tokenBurstSeen int64
	accepted                  int64
	refusals                  string
	measured                  float64
	lastRefusal               time.Time
	streak                    int
	atCap                     int64
}

func stateOf(l *Learner) learnerState {
	l.mu.Lock()
	defer l.mu.Unlock()
	return learnerState{l.limits, l.burstSeen, l.tokenBurstSeen, l.accepted, fmt.Sprint(l.refusals), l.measured, l.lastRefusal, l.streak, l.atCap}
}

// TestLearnerObserveClientErrorChangesNothing: a 400 (or 401, 403, 404)
// says nothing about the upstream's limits, even with a Retry-After.
func TestLearnerObserveClientErrorChangesNothing(t *testing.T) {
	// A learner that has measured a rate, learned a cap and is backing off.
	measuring := func() *Learner {
		l := NewLearner()
		now := simEpoch
		for i := range 40 {
			l.Begin()
			l.Observe(bareObs(200), now)
			now = now.Add(100 * time.Millisecond)
			if i%10 == 9 {
				l.Begin()
				o := bareObs(429)
				o.RetryAfter = 50 * time.Millisecond
				l.Observe(o, now)
			}
		}
		for range 6 {
			l.Begin()
		}
		l.Observe(bareObs(503), now)
		l.Observe(bareObs(502), now)
		for range 4 {
			l.Observe(bareObs(200), now)
		}
		return l
	}
	// A learner that read headers.
	headers := func() *Learner {
		l := NewLearner()
		o := bareObs(200)
		o.Requests = Quota{Limit: 600, Remaining: 20, Reset: 3 * time.Second}
		o.Tokens = Quota{Limit: 100000, Remaining: 5000, Reset: 30 * time.Second}
		l.Begin()
		l.Observe(o, simEpoch)
		return l
	}
	for _, mk := range []func() *Learner{measuring, headers} {
		for _, status := range []int{400, 401, 403, 404} {
			for _, ra := range []time.Duration{-1, 10 * time.Second} {
				l := mk()
				before := stateOf(l)
				if before.limits == (Limits{}) {
					t.Fatal("setup learned nothing")
				}
				l.Begin()
				o := bareObs(status)
				o.RetryAfter = ra
				v := l.Observe(o, simEpoch.Add(time.Minute))
				if after := stateOf(l); after != before {
					t.Errorf("status %d (RetryAfter %v) changed the learner:\n %+v\nto\n %+v", status, ra, before, after)
				}
				if v != (Verdict{}) {
					t.Errorf("status %d: Verdict %+v, want nothing", status, v)
				}
			}
		}
	}
}

// ---------------------------------------------------------------------------
// Concurrency safety.

// TestLearnerConcurrentUse runs Begin, Observe and Limits from many
// goroutines at once; run it with -race.
func TestLearnerConcurrentUse(t *testing.T) {
	const workers, rounds = 32, 2000
	l := NewLearner()
	var clock atomic.Int64 // nanoseconds since simEpoch
	var oks atomic.Int64
	statuses := []int{200, 200, 200, 429, 503, 529, 502, 504, 0, 400}
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for range rounds {
				l.Begin()
				now := simEpoch.Add(time.Duration(clock.Add(int64(rng.IntN(int(time.Millisecond))))))
				o := bareObs(statuses[rng.IntN(len(statuses))])
				switch rng.IntN(3) {
				case 0:
					o.Requests = Quota{Limit: 600, Remaining: int64(rng.IntN(30)), Reset: time.Duration(rng.IntN(int(3 * time.Second)))}
				case 1:
					o.RetryAfter = time.Duration(rng.IntN(int(time.Second)))
				}
				v := l.Observe(o, now)
				if o.Status >= 200 && o.Status < 300 {
					oks.Add(1)
				}
				if v.Wait < 0 || v.Wait > max(backoffMax, time.Second) {
					t.Errorf("Wait %v out of bounds", v.Wait)
					return
				}
				lim := l.Limits()
				if lim.Concurrent < 0 || lim.Requests.Count < 0 || lim.Requests.Burst < 0 {
					t.Errorf("Limits %+v", lim)
					return
				}
			}
		}()
	}
	// Readers that only look.
	stop := make(chan struct{})
	var rg sync.WaitGroup
	for range 4 {
		rg.Add(1)
		go func() {
			defer rg.Done()
			for {
				select {
				case <-stop:
					return
				default:
					_ = l.Limits()
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	rg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.inflight != 0 {
		t.Errorf("in flight after every answer: %d, want 0", l.inflight)
	}
	if l.accepted != oks.Load() {
		t.Errorf("accepted %d, want %d", l.accepted, oks.Load())
	}
}

// ---------------------------------------------------------------------------
// Found while reviewing learner.go.

// TestLearnerBurstFollowsLoweredLimit: when the advertised limit goes down,
// the learned burst must go down with it. burstSeen only ever grows, so a
// burst seen under the old limit outlives it.
func TestLearnerBurstFollowsLoweredLimit(t *testing.T) {
	l := NewLearner()
	obs := func(limit, remaining int64, reset time.Duration) Observation {
		o := bareObs(200)
		o.Requests = Quota{Limit: limit, Remaining: remaining, Reset: reset}
		return o
	}
	// 600 per minute, a full-minute bucket: 599 left, whole in 100 ms.
	l.Begin()
	l.Observe(obs(600, 599, 100*time.Millisecond), simEpoch)
	// The limit drops to 60 per minute, a full-minute bucket again.
	l.Begin()
	l.Observe(obs(60, 59, time.Second), simEpoch.Add(time.Minute))
	r := l.Limits().Requests
	t.Logf("after the limit dropped from 600 to 60 per minute: %+v", r)
	if r.Count != 60 || r.Burst > 60 {
		t.Errorf("Requests %+v, want Count 60 and Burst ≤ 60 (about %d)", r, int64(60*burstShare))
	}
}

// TestLearnerRefusalNeverRaisesCap: a 503 is evidence that the cap is
// lower, never higher, than what the learner knows.
func TestLearnerRefusalNeverRaisesCap(t *testing.T) {
	l := NewLearner()
	for range 5 {
		l.Begin()
	}
	l.Observe(bareObs(503), simEpoch) // 5 in flight: the cap is 4
	if c := l.Limits().Concurrent; c != 4 {
		t.Fatalf("Concurrent %d after a 503 with 5 in flight, want 4", c)
	}
	for range 6 {
		l.Begin() // 10 in flight, as when requests admitted before the cap was known are still out
	}
	l.Observe(bareObs(503), simEpoch.Add(time.Second))
	if c := l.Limits().Concurrent; c > 4 {
		t.Errorf("a 503 raised the learned cap from 4 to %d", c)
	}
}

// TestLearnerMeasureWaitsForSlowAnswers: a success sent before a refusal
// but answered after it still counts between the two refusals, and no rate
// is measured from a refusal while requests sent before it are out (which
// would measure too low).
func TestLearnerMeasureWaitsForSlowAnswers(t *testing.T) {
	l := NewLearner()
	at := func(ms int) time.Time { return simEpoch.Add(time.Duration(ms) * time.Millisecond) }
	refuse := func(ms int, ra time.Duration) {
		o := bareObs(429)
		o.RetryAfter = ra
		l.Answer(l.Send(at(ms)), o, at(ms+1))
	}
	// Fast successes, then the first refusal at 1 s (next unit at 1.1 s).
	for i := range 10 {
		l.Answer(l.Send(at(i*100)), bareObs(200), at(i*100+5))
	}
	refuse(1000, 100*time.Millisecond)
	guess := l.Limits().Requests
	// Four requests sent between the refusals, each answered only after
	// the second refusal: the upstream took one unit every 250 ms.
	var slow []Attempt
	for i := range 4 {
		slow = append(slow, l.Send(at(1100+i*250)))
	}
	refuse(2090, 10*time.Millisecond) // next unit at 2.1 s
	if got := l.Limits().Requests; got != guess {
		t.Fatalf("measured %+v with four answers outstanding, want the first guess %+v kept", got, guess)
	}
	for i, a := range slow {
		l.Answer(a, bareObs(200), at(5000+i))
	}
	// 4 units over [1.1 s, 2.1 s): 4 per second, paced at rateShare.
	want := int64(math.Round(4 * rateShare * 60))
	if got := l.Limits().Requests.Count; got != want {
		t.Fatalf("learned %d per minute once the answers came, want %d", got, want)
	}
}
