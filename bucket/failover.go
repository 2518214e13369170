package bucket

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// FailMode says what a Failover does while its primary store fails.
type FailMode uint8

const (
	// FailOpen admits every request without charging anything, reporting
	// every bucket as full: availability over enforcement.
	FailOpen FailMode = iota
	// FailClosed refuses: Reserve and Peek return the primary's error
	// (wrapped in ErrPrimaryDown), which the module turns into a 503.
	FailClosed
	// FailLocal enforces the limits in a local in-memory store, each divided
	// by the number of instances, so that N instances each enforcing 1/N of
	// a limit approximate the shared one.
	FailLocal
)

func (m FailMode) String() string {
	switch m {
	case FailOpen:
		return "open"
	case FailClosed:
		return "closed"
	case FailLocal:
		return "local"
	}
	return fmt.Sprintf("FailMode(%d)", uint8(m))
}

// DefaultFailoverTimeout bounds each primary call when FailoverOptions
// leaves Timeout zero: far above a healthy Redis's round trip (well under a
// millisecond on a LAN), far below what a client notices.
const DefaultFailoverTimeout = 50 * time.Millisecond

// DefaultFailoverBackoff is how long a Failover skips its primary after a
// failure, when FailoverOptions leaves Backoff zero, before it lets one probe
// call through. It keeps an outage from costing every request the timeout,
// and the primary from being hammered while it comes back.
const DefaultFailoverBackoff = time.Second

// ErrPrimaryDown is wrapped by the errors a Failover returns for its primary's
// failures (together with the failure itself, when there is one).
var ErrPrimaryDown = errors.New("bucket: primary store is down")

// FailoverOptions configures a Failover.
type FailoverOptions struct {
	Mode FailMode
	// Timeout bounds each primary call (default 50ms when 0).
	Timeout time.Duration
	// Backoff is how long the primary is skipped after a failure before one
	// probe call is let through (default DefaultFailoverBackoff when 0).
	Backoff time.Duration
	// Local is the in-memory store used in FailLocal mode. When it is nil in
	// that mode, NewFailover makes a MemoryStore; Sweep sweeps it.
	Local Store
	// Instances divides every limit in FailLocal mode (default 1), so N
	// instances each enforcing Count/N approximate the shared limit.
	Instances int64
	// OnOutage is called once when the primary starts failing, OnRecover
	// once when it answers again. Never per request. They are called in
	// order, one at a time, on the goroutine of the call that saw the
	// change; they must be quick, and must not call the Failover's Store
	// methods (Down is fine).
	OnOutage  func(err error)
	OnRecover func()
	// ContextBound says that the primary returns promptly once its context
	// ends, as a go-redis client with ContextTimeoutEnabled does. Calls then
	// run inline, on the caller's goroutine and with the caller's charges:
	// no goroutine and no copies per call. Without it, each call runs on a
	// goroutine of its own with copies, so that a primary that ignores its
	// context cannot hold a request past the timeout.
	ContextBound bool
}

// Failover is a Store that wraps a primary store (Redis) and decides what
// happens when the primary fails or is slow: see FailMode.
//
// Every primary call is bounded by the timeout. It gets a context with that
// deadline, and also runs on a goroutine of its own, so that even a primary
// that ignores its context (a go-redis client without ContextTimeoutEnabled
// blocks for its ReadTimeout, and retries) cannot hold a request longer; an
// abandoned call finishes in the background on its own copy of the charges,
// and its result is dropped. A failure (an error or the timeout) starts an
// outage: OnOutage is called, and for the back-off every call goes straight
// to the fail mode without trying the primary. Then one call at a time is let
// through as a probe; when one succeeds the outage ends and OnRecover is
// called. Reconnecting is the Redis client's job. A call whose own context
// ends first (the client went away) says nothing about the primary and counts
// for neither.
//
// Known imprecisions, all bounded by an outage's length:
//   - Adjust during an outage is dropped unless the mode is FailLocal, so the
//     settlement corrections and concurrency releases of requests admitted
//     before or during the outage are lost: the primary keeps those charges
//     until its buckets drain, or, for concurrency slots, until their keys
//     expire (RedisConcurrencyTTL).
//   - In FailLocal mode, an Adjust during the outage of a charge made on the
//     primary before it goes to Local, and one after recovery of a charge
//     made on Local goes to the primary. A refund there is capped at full
//     and a charge there is a small debt, so neither breaks a bucket; but
//     the correction does not reach the bucket that took the charge.
//   - Local's buckets start empty of charges at each outage's start (or
//     keep what an earlier outage left, drained by time).
type Failover struct {
	primary   Store
	local     Store
	mode      FailMode
	timeout   time.Duration
	backoff   time.Duration
	instances int64
	onOutage  func(error)
	onRecover func()
	inline    bool

	// start is the origin of retryAt, so that the back-off is measured on
	// the monotonic clock.
	start time.Time
	// down is true during an outage; reading it is all a call costs while
	// the primary is healthy.
	down atomic.Bool
	// probing is true while the one probe call of an outage is running.
	probing atomic.Bool
	// retryAt is when, in nanoseconds since start, the next probe may go.
	retryAt atomic.Int64

	// pending holds, by key, the Replay corrections the primary could not
	// take (summed), for flush to apply once it answers again; npending is
	// its size, read without the lock; flushing is set while a flush runs.
	pendMu   sync.Mutex
	pending  map[string]Charge
	npending atomic.Int64
	flushing atomic.Bool

	// mu serializes the changes of state; notify makes the callbacks run in
	// the order of the changes, one at a time.
	mu      sync.Mutex
	notify  sync.Mutex
	lastErr error // guarded by mu
}

var _ Store = (*Failover)(nil)

// NewFailover returns a Store that uses primary while it answers, and opts'
// fail mode while it does not.
func NewFailover(primary Store, opts FailoverOptions) *Failover {
	f := &Failover{
		primary:   primary,
		local:     opts.Local,
		mode:      opts.Mode,
		timeout:   opts.Timeout,
		backoff:   opts.Backoff,
		instances: max(opts.Instances, 1),
		onOutage:  opts.OnOutage,
		onRecover: opts.OnRecover,
		inline:    opts.ContextBound,
		start:     time.Now(),
	}
	if f.timeout <= 0 {
		f.timeout = DefaultFailoverTimeout
	}
	if f.backoff <= 0 {
		f.backoff = DefaultFailoverBackoff
	}
	if f.mode == FailLocal && f.local == nil {
		f.local = NewMemoryStore()
	}
	return f
}

// Down reports whether the primary is considered down: from the failure that
// started an outage to the probe that ends it.
func (f *Failover) Down() bool { return f.down.Load() }

// Sweep sweeps the local store, when it has a Sweep method (a MemoryStore
// does), and returns what it dropped.
func (f *Failover) Sweep(now time.Time) int {
	if s, ok := f.local.(interface{ Sweep(time.Time) int }); ok {
		return s.Sweep(now)
	}
	return 0
}

func (f *Failover) since() int64 { return int64(time.Since(f.start)) }

// route says whether a call goes to the primary, and whether it is the
// outage's probe.
func (f *Failover) route() (primary, probe bool) {
	if !f.down.Load() {
		return true, false
	}
	if f.since() < f.retryAt.Load() {
		return false, false
	}
	if f.probing.CompareAndSwap(false, true) {
		return true, true
	}
	return false, false
}

// callPrimary runs fn with a context bounded by the timeout, and waits for
// it at most that long. fn runs on a goroutine of its own and may outlive
// the call: it must only touch what the caller will not use again once
// callPrimary has returned an error. Inline Failovers call the primary
// directly instead (see bounded).
func (f *Failover) callPrimary(ctx context.Context, fn func(context.Context) error) error {
	cctx, cancel := context.WithTimeout(ctx, f.timeout)
	defer cancel()
	done := make(chan error, 1) // buffered: an abandoned call can still finish
	go func() { done <- fn(cctx) }()
	select {
	case err := <-done:
		return err
	case <-cctx.Done():
		// An answer that came in at the same instant still counts.
		select {
		case err := <-done:
			return err
		default:
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		return f.timedOut()
	}
}

// bounded is what an inline primary call, made with cctx (ctx bounded by
// the timeout), returned: err, or the time-out when cctx ended it.
func (f *Failover) bounded(ctx, cctx context.Context, err error) error {
	if err != nil && ctx.Err() == nil && cctx.Err() != nil {
		return f.timedOut()
	}
	return err
}

func (f *Failover) timedOut() error {
	return fmt.Errorf("bucket: primary store did not answer within %s: %w", f.timeout, context.DeadlineExceeded)
}

// succeeded records a primary call's success; a probe's ends the outage.
func (f *Failover) succeeded(probe bool) {
	defer f.maybeFlush()
	if !probe {
		// Only the probe decides: a call that started before the outage and
		// answered late says little about the primary now.
		return
	}
	f.mu.Lock()
	f.probing.Store(false)
	if !f.down.Load() {
		f.mu.Unlock()
		return
	}
	f.down.Store(false)
	f.lastErr = nil
	// Take notify before letting go of mu, so that the next change's
	// callback cannot overtake this one's.
	f.notify.Lock()
	f.mu.Unlock()
	defer f.notify.Unlock()
	if f.onRecover != nil {
		f.onRecover()
	}
}

// failed records a primary call's failure, and reports whether it was one:
// an error after the caller's own context ended is the caller's doing, and
// is returned to it as is.
func (f *Failover) failed(ctx context.Context, err error, probe bool) bool {
	if ctx.Err() != nil {
		if probe {
			// No verdict: let the next call probe.
			f.probing.Store(false)
		}
		return false
	}
	f.mu.Lock()
	// retryAt before down, so that a call that sees the outage also sees
	// its back-off.
	f.retryAt.Store(f.since() + int64(f.backoff))
	f.lastErr = err
	if probe {
		f.probing.Store(false)
	}
	if f.down.Load() {
		f.mu.Unlock()
		return true
	}
	f.down.Store(true)
	f.notify.Lock()
	f.mu.Unlock()
	defer f.notify.Unlock()
	if f.onOutage != nil {
		f.onOutage(err)
	}
	return true
}

// downErr is the error of a call made during the back-off.
func (f *Failover) downErr() error {
	f.mu.Lock()
	err := f.lastErr
	f.mu.Unlock()
	if err == nil {
		return ErrPrimaryDown
	}
	return fmt.Errorf("%w: %w", ErrPrimaryDown, err)
}

// CloneCharges copies charges and their keys, in one allocation for the
// keys, for work that may outlive the caller's use of them (callers build
// keys in reused buffers): a primary call that runs on after a time-out, a
// settlement in the background.
func CloneCharges(charges []Charge) []Charge {
	n := 0
	for i := range charges {
		n += len(charges[i].Key)
	}
	buf := make([]byte, 0, n)
	out := make([]Charge, len(charges))
	for i, ch := range charges {
		k := len(buf)
		buf = append(buf, ch.Key...)
		ch.Key = buf[k:len(buf):len(buf)]
		out[i] = ch
	}
	return out
}

// localCharges divides each charge's limit by the number of instances, for
// the local store.
func (f *Failover) localCharges(charges []Charge) []Charge {
	if f.instances == 1 {
		return charges
	}
	out := make([]Charge, len(charges))
	for i, ch := range charges {
		ch.Limit.Count = max(ch.Limit.Count/f.instances, 1)
		if ch.Limit.Burst > 0 {
			ch.Limit.Burst = max(ch.Limit.Burst/f.instances, 1)
		}
		out[i] = ch
	}
	return out
}

// fullStates reports every bucket as full: what fail-open admits against.
func fullStates(charges []Charge, states []State) {
	for i := range charges {
		// A concurrency limit has no burst: its capacity is its count.
		states[i] = State{Remaining: charges[i].Limit.Capacity()}
	}
}

// Reserve implements Store.
func (f *Failover) Reserve(ctx context.Context, now time.Time, charges []Charge, maxWait time.Duration, states []State) (Decision, error) {
	usePrimary, probe := f.route()
	if !usePrimary {
		return f.reserveFallback(ctx, now, charges, maxWait, states, f.downErr())
	}
	var d Decision
	var err error
	if f.inline {
		cctx, cancel := context.WithTimeout(ctx, f.timeout)
		d, err = f.primary.Reserve(cctx, now, charges, maxWait, states)
		err = f.bounded(ctx, cctx, err)
		cancel()
	} else {
		// The primary works on copies (see callPrimary).
		cs := CloneCharges(charges)
		var st []State
		if states != nil {
			st = make([]State, len(states))
		}
		var dd Decision // its own variable, so that d stays on the stack
		err = f.callPrimary(ctx, func(ctx context.Context) error {
			var err error
			dd, err = f.primary.Reserve(ctx, now, cs, maxWait, st)
			return err
		})
		if err == nil {
			d = dd
			copy(states, st)
		}
	}
	if err == nil {
		f.succeeded(probe)
		return d, nil
	}
	if !f.failed(ctx, err, probe) {
		return Decision{Limiting: -1}, err
	}
	return f.reserveFallback(ctx, now, charges, maxWait, states, fmt.Errorf("%w: %w", ErrPrimaryDown, err))
}

func (f *Failover) reserveFallback(ctx context.Context, now time.Time, charges []Charge, maxWait time.Duration, states []State, err error) (Decision, error) {
	switch f.mode {
	case FailOpen:
		if states != nil {
			fullStates(charges, states)
		}
		return Decision{Allowed: true, Limiting: -1, Fallback: true}, nil
	case FailLocal:
		d, err := f.local.Reserve(ctx, now, f.localCharges(charges), maxWait, states)
		d.Fallback = true
		return d, err
	}
	return Decision{Limiting: -1, Fallback: true}, err
}

// Adjust implements Store. While the primary cannot take them, it keeps
// the corrections marked Replay for the primary (see flush), applies the
// others to the local store in FailLocal mode, and drops them otherwise
// (returning nil: the outage has been reported once already).
func (f *Failover) Adjust(ctx context.Context, now time.Time, charges []Charge) error {
	if usePrimary, probe := f.route(); usePrimary {
		var err error
		if f.inline {
			cctx, cancel := context.WithTimeout(ctx, f.timeout)
			err = f.bounded(ctx, cctx, f.primary.Adjust(cctx, now, charges))
			cancel()
		} else {
			cs := CloneCharges(charges)
			err = f.callPrimary(ctx, func(ctx context.Context) error { return f.primary.Adjust(ctx, now, cs) })
		}
		if err == nil {
			f.succeeded(probe)
			return nil
		}
		if !f.failed(ctx, err, probe) {
			return err
		}
	}
	rest := f.keep(charges)
	if f.mode == FailLocal && len(rest) > 0 {
		return f.local.Adjust(ctx, now, f.localCharges(rest))
	}
	return nil
}

// MaxFailoverPending bounds the buckets whose Replay corrections a
// Failover keeps during an outage; corrections of more buckets than that
// are dropped.
const MaxFailoverPending = 100000

// keep stores the Replay refunds among charges for the primary, and
// returns the other charges (charges itself when there is no Replay one).
func (f *Failover) keep(charges []Charge) []Charge {
	n := 0
	for i := range charges {
		if charges[i].Replay && charges[i].Cost < 0 {
			n++
		}
	}
	if n == 0 {
		return charges
	}
	rest := make([]Charge, 0, len(charges)-n)
	f.pendMu.Lock()
	defer f.pendMu.Unlock()
	if f.pending == nil {
		f.pending = make(map[string]Charge)
	}
	for _, c := range charges {
		if !c.Replay || c.Cost >= 0 {
			rest = append(rest, c)
			continue
		}
		if p, ok := f.pending[string(c.Key)]; ok {
			p.Cost += c.Cost
			p.Limit = c.Limit
			f.pending[string(c.Key)] = p
			continue
		}
		if len(f.pending) >= MaxFailoverPending {
			continue
		}
		c.Key = append([]byte(nil), c.Key...) // the caller reuses its buffer
		f.pending[string(c.Key)] = c
	}
	f.npending.Store(int64(len(f.pending)))
	return rest
}

// flushBatch is how many kept corrections one flush call sends.
const flushBatch = 128

// maybeFlush starts a flush of the kept corrections, if there are any, the
// primary is up and no flush runs.
func (f *Failover) maybeFlush() {
	if f.npending.Load() == 0 || f.down.Load() || !f.flushing.CompareAndSwap(false, true) {
		return
	}
	go f.flush()
}

// flush applies the kept corrections to the primary, in batches, each
// bounded by ten timeouts (at least a second). What the primary does not
// take goes back to be kept; the next successful call tries again. A
// correction whose first try timed out after the primary had applied it
// is applied twice: a refund then gives back more than it took, which a
// bucket absorbs by being full (or empty) the sooner.
func (f *Failover) flush() {
	defer f.flushing.Store(false)
	f.pendMu.Lock()
	all := make([]Charge, 0, len(f.pending))
	for _, c := range f.pending {
		all = append(all, c)
	}
	f.pending = nil
	f.npending.Store(0)
	f.pendMu.Unlock()
	bound := max(10*f.timeout, time.Second)
	for len(all) > 0 {
		batch := all[:min(flushBatch, len(all))]
		ctx, cancel := context.WithTimeout(context.Background(), bound)
		err := f.primary.Adjust(ctx, time.Now(), batch)
		cancel()
		if err != nil {
			f.keep(all)
			return
		}
		all = all[len(batch):]
	}
}

// Peek implements Store, with the fail mode's view during an outage: every
// bucket full when failing open, the local store's buckets when local, an
// error when closed.
func (f *Failover) Peek(ctx context.Context, now time.Time, charges []Charge, states []State) error {
	usePrimary, probe := f.route()
	var err error
	if usePrimary {
		if f.inline {
			cctx, cancel := context.WithTimeout(ctx, f.timeout)
			err = f.bounded(ctx, cctx, f.primary.Peek(cctx, now, charges, states))
			cancel()
		} else {
			cs := CloneCharges(charges)
			st := make([]State, len(states))
			err = f.callPrimary(ctx, func(ctx context.Context) error { return f.primary.Peek(ctx, now, cs, st) })
			if err == nil {
				copy(states, st)
			}
		}
		if err == nil {
			f.succeeded(probe)
			return nil
		}
		if !f.failed(ctx, err, probe) {
			return err
		}
		err = fmt.Errorf("%w: %w", ErrPrimaryDown, err)
	} else {
		err = f.downErr()
	}
	switch f.mode {
	case FailOpen:
		fullStates(charges, states)
		return nil
	case FailLocal:
		return f.local.Peek(ctx, now, f.localCharges(charges), states)
	}
	return err
}

// DeletePrefix implements Store. It forgets the prefix's buckets in the
// local store too, and returns the primary's count. It is maintenance, not
// a request: it runs with the caller's context rather than the timeout (a
// scan of a large keyspace takes a while), and its failure neither starts
// nor ends an outage. While the primary is down it is not tried, and the
// error says so: the primary's buckets then go by their expiry.
func (f *Failover) DeletePrefix(ctx context.Context, prefix []byte) (int, error) {
	var nLocal int
	var errLocal error
	if f.local != nil {
		nLocal, errLocal = f.local.DeletePrefix(ctx, prefix)
	}
	if f.down.Load() {
		return nLocal, errors.Join(f.downErr(), errLocal)
	}
	n, err := f.primary.DeletePrefix(ctx, prefix)
	return n, errors.Join(err, errLocal)
}

// Scan implements Store: the primary's buckets while it is up, and the fail
// mode's view during an outage: the local store's buckets when local (their
// levels are under the divided limits; see LocalLimit), none when failing
// open (every bucket is as good as full), the error when closed. Like
// DeletePrefix it is maintenance: it runs with the caller's context rather
// than the timeout, and its failure neither starts nor ends an outage (nor
// falls back, since fn may have seen part of the primary's buckets).
func (f *Failover) Scan(ctx context.Context, now time.Time, prefix []byte, fn func(key []byte, lv Level) bool) error {
	s, _, err := f.ScanSource()
	if s == nil {
		return err
	}
	return s.Scan(ctx, now, prefix, fn)
}

// ScanSource returns the store Scan reads now: the primary, or during an
// outage the local store in FailLocal mode (local is then true), none in
// FailOpen mode (nil and no error), or none and ErrPrimaryDown in
// FailClosed mode. A caller that labels what it reads (the admin API marks
// local buckets, read under LocalLimit) scans the store this returns, so
// that an outage that begins or ends during the scan cannot mislabel it.
func (f *Failover) ScanSource() (s Store, local bool, err error) {
	if !f.down.Load() {
		return f.primary, false, nil
	}
	switch f.mode {
	case FailLocal:
		return f.local, true, nil
	case FailOpen:
		return nil, false, nil
	}
	return nil, false, f.downErr()
}

// LocalLimit returns the limit the local store enforces in FailLocal mode
// for a configured limit l: l divided by the number of instances.
func (f *Failover) LocalLimit(l Limit) Limit {
	return f.localCharges([]Charge{{Limit: l}})[0].Limit
}

// Delete implements Store, as DeletePrefix does: in the local store too, and
// in the primary unless it is down (the error then says so). It returns the
// primary's count, or the local store's during an outage.
func (f *Failover) Delete(ctx context.Context, keys [][]byte) (int, error) {
	var nLocal int
	var errLocal error
	if f.local != nil {
		nLocal, errLocal = f.local.Delete(ctx, keys)
	}
	if f.down.Load() {
		return nLocal, errors.Join(f.downErr(), errLocal)
	}
	n, err := f.primary.Delete(ctx, keys)
	return n, errors.Join(err, errLocal)
}
