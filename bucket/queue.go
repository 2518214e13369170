package bucket

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// Clock is the time source of a Queue. Tests use a fake one.
type Clock interface {
	Now() time.Time
	// AfterFunc calls f in its own goroutine once d has passed.
	AfterFunc(d time.Duration, f func()) Timer
}

// Timer is a pending AfterFunc call.
type Timer interface {
	// Stop keeps the call from happening, if it has not yet; it reports
	// whether it did.
	Stop() bool
}

// SystemClock is the real clock.
type SystemClock struct{}

// Now implements Clock.
func (SystemClock) Now() time.Time { return time.Now() }

// AfterFunc implements Clock.
func (SystemClock) AfterFunc(d time.Duration, f func()) Timer { return time.AfterFunc(d, f) }

// Policy says how long and how many requests may wait for one bucket.
type Policy struct {
	// MaxWait bounds the time a request waits. Zero: it never waits, and is
	// refused at once when the bucket cannot take it.
	MaxWait time.Duration
	// MaxDepth bounds how many requests wait for the bucket. Zero means no
	// bound.
	MaxDepth int
}

// Request is what Queue.Admit asks for.
type Request struct {
	// Charges are the request's buckets, charged all at once or not at all.
	Charges []Charge
	// States receives each bucket's state after the decision (required, one
	// per charge).
	States []State
	// Policies say, per charge, how the request may wait for that bucket.
	Policies []Policy
	// Flow names the request's subject for fairness: among the requests
	// waiting for a bucket, the next free capacity goes to the flow that has
	// received the least service (weighted by cost). Empty is a flow too.
	Flow []byte
	// Weight is the flow's share relative to others: a flow of weight 2
	// receives twice the service of a flow of weight 1 when both wait.
	// Zero or less means 1.
	Weight float64
	// Priority is the request's class. Waiting requests of a higher class
	// always go first.
	Priority int
}

// Outcome says how a request ended in the queue.
type Outcome uint8

const (
	// Admitted: every bucket was charged.
	Admitted Outcome = iota
	// Refused: a bucket could not take the request and it may not wait.
	Refused
	// Predicted: the request's turn was predicted to come after its
	// deadline, so it was refused at once.
	Predicted
	// TimedOut: the request waited for its whole max_wait.
	TimedOut
	// QueueFull: the bucket's queue was at its max_depth, and the request
	// (or an older one of a flow with more waiting) was turned away.
	QueueFull
	// Canceled: the caller's context ended while the request waited.
	Canceled
)

var outcomeNames = [...]string{"admitted", "refused", "predicted", "timeout", "queue_full", "canceled"}

func (o Outcome) String() string { return outcomeNames[o] }

// Result is the outcome of Queue.Admit.
type Result struct {
	// Decision is the store's decision. For a request that was not admitted,
	// Delay is the predicted time until it could be, for Retry-After, and
	// Limiting the bucket it waited for.
	Decision
	Outcome Outcome
	// Waited is how long the request waited in the queue.
	Waited time.Duration
	// Depth is how many requests were waiting for the same bucket when the
	// request left the queue (0 for one that never waited).
	Depth int
	// Predicted is the wait the queue predicted when the request joined it
	// (0 for one that never waited, or waited for a concurrency limit).
	Predicted time.Duration
}

// Queue puts requests that a bucket cannot take now in a fair queue in front
// of it, instead of refusing them.
//
// A request first tries the store. If a bucket refuses it, and that bucket's
// policy lets it wait, it joins the bucket's lane. A lane dispatches when the
// bucket frees capacity: at the time the store predicts for a rate limit, and
// when a holder leaves for a concurrency limit. At each dispatch it picks the
// request to try, and the pick is what makes it fair:
//
//   - the highest priority class with a waiting request goes first;
//   - within a class, the flow that has received the least service, counted
//     in units of the bucket divided by the flow's weight, goes first (the
//     Virtual Token Counter of Sheng et al., OSDI 2024). A flow that starts
//     waiting begins at the class's current virtual time, so idleness earns
//     no credit and a newcomer is served within about one service interval,
//     however long another flow's backlog is;
//   - within a flow, requests go in order of arrival.
//
// The pick is tried against the store for all its buckets. If another bucket
// refuses it, the request moves to that bucket's lane, keeping its deadline.
//
// While a bucket has a lane, new requests for it join the lane rather than
// try the store, so that nobody overtakes the waiting requests except by the
// fairness rule. Everything in a Queue is guarded by one mutex that is never
// held during a store call, so a slow shared store does not stall the queue.
type Queue struct {
	store Store
	clock Clock
	// poll is how often a lane that waits for a concurrency limit tries
	// again without being woken: a holder in another process (a shared
	// store) leaves without telling this one.
	poll time.Duration

	// nlanes counts the lanes; Admit skips the mutex while it is zero.
	nlanes atomic.Int64
	// joined counts the requests that ever joined a lane.
	joined atomic.Uint64
	// wakes counts Wake calls, so that Admit can tell that capacity was
	// freed between its store call and the creation of its lane.
	wakes atomic.Uint64
	mu    sync.Mutex
	lanes map[string]*lane
}

// NewQueue returns a queue in front of store.
func NewQueue(store Store, clock Clock) *Queue {
	return &Queue{store: store, clock: clock, poll: time.Second, lanes: make(map[string]*lane)}
}

// Admit charges the request's buckets, waiting in the queue if a bucket
// cannot take it now and its policy allows. now is the admission time for
// the first try; later tries use the queue's clock.
//
// On Admitted, the request holds its charges. Any other outcome has charged
// nothing. An error is the store's; the request was not charged.
func (q *Queue) Admit(ctx context.Context, now time.Time, r *Request) (Result, error) {
	if q.nlanes.Load() > 0 {
		if w := q.joinLane(now, r); w != nil {
			return q.wait(ctx, w, r)
		}
	}
	wakes := q.wakes.Load()
	d, err := q.store.Reserve(ctx, now, r.Charges, 0, r.States)
	if err != nil || d.Allowed {
		return Result{Decision: d, Outcome: Admitted}, err
	}
	pol := r.Policies[d.Limiting]
	if pol.MaxWait <= 0 {
		return Result{Decision: d, Outcome: Refused}, nil
	}
	l := r.Charges[d.Limiting].Limit
	if !l.Concurrent() && d.Delay > pol.MaxWait {
		// The bucket alone will not take it in time, whatever the queue.
		return Result{Decision: d, Outcome: Predicted}, nil
	}
	w := newWaiter(now, r, d.Limiting)
	w.tried = true // r.States are the store's
	q.mu.Lock()
	ln, fresh := q.lane(w.key())
	if fresh {
		ln.observe(r.States[d.Limiting], now)
	}
	if res, ok := ln.enqueue(q, w, now); !ok {
		// A lane made for this request alone must not stay behind empty.
		q.retire(ln)
		q.mu.Unlock()
		copy(r.States, w.states)
		return res, nil
	}
	woken := q.wakes.Load() != wakes
	if fresh {
		q.arm(ln, now.Add(d.Delay))
	}
	q.joined.Add(1)
	q.mu.Unlock()
	if woken {
		// Capacity freed after the store refused us, before the lane
		// existed for Wake to find: try again now.
		q.dispatch(ln)
	}
	return q.wait(ctx, w, r)
}

// joinLane enqueues the request in the lane of the first of its buckets that
// has one and lets it wait, and returns its waiter; nil when there is none.
// A waiter refused at once already holds its result.
func (q *Queue) joinLane(now time.Time, r *Request) *waiter {
	q.mu.Lock()
	defer q.mu.Unlock()
	for i := range r.Charges {
		ln := q.lanes[string(r.Charges[i].Key)]
		if ln == nil || r.Policies[i].MaxWait <= 0 {
			continue
		}
		w := newWaiter(now, r, i)
		if res, ok := ln.enqueue(q, w, now); !ok {
			// Refused at once: hand the result over through the waiter, as
			// the dispatcher would.
			w.finish(res)
		} else {
			q.joined.Add(1)
		}
		return w
	}
	return nil
}

// wait blocks until the waiter is admitted or refused, its deadline passes,
// or ctx ends.
func (q *Queue) wait(ctx context.Context, w *waiter, r *Request) (Result, error) {
	expired := make(chan struct{})
	t := q.clock.AfterFunc(w.deadline.Sub(q.clock.Now()), func() { close(expired) })
	var res Result
	select {
	case res = <-w.done:
	case <-expired:
		res = q.withdraw(w, TimedOut)
	case <-ctx.Done():
		res = q.withdraw(w, Canceled)
	}
	t.Stop()
	copy(r.States, w.states)
	if !w.tried {
		// Nothing asked the store for this request's states: look.
		q.store.Peek(context.Background(), q.clock.Now(), r.Charges, r.States)
	}
	if res.Outcome == Admitted && ctx.Err() != nil {
		// Admitted as the caller left: give the charges back.
		q.giveBack(r.Charges, !res.Decision.Fallback)
		res.Outcome = Canceled
	}
	return res, w.err
}

// withdraw takes a waiter out of the queue because it timed out or was
// canceled. If the dispatcher has it at that moment, the dispatcher's
// outcome wins; it is at most one store call away.
func (q *Queue) withdraw(w *waiter, why Outcome) Result {
	q.mu.Lock()
	switch w.state {
	case waiterQueued:
		ln := w.lane
		now := q.clock.Now()
		res := ln.refusal(w, why, now)
		wasPick := ln.pick() == w
		ln.remove(w)
		q.retire(ln)
		if wasPick && !ln.dead && !ln.dispatching {
			// The timer was set for what w needed: the next pick may
			// need less.
			q.arm(ln, now)
		}
		q.mu.Unlock()
		return res
	case waiterReserving:
		w.leaving = why
	}
	q.mu.Unlock()
	return <-w.done
}

// Release gives back the units of charges (a concurrency slot when the
// response ends, or the whole admission of a request that was canceled)
// and wakes the lanes of those buckets.
func (q *Queue) Release(charges []Charge) error { return q.giveBack(charges, false) }

// giveBack is Release, with the refunds marked Replay when the charges were
// made by a Failover's primary.
func (q *Queue) giveBack(charges []Charge, replay bool) error {
	refund := make([]Charge, len(charges))
	for i, c := range charges {
		refund[i] = Charge{Key: c.Key, Limit: c.Limit, Cost: -c.Cost, Replay: replay}
	}
	return q.Give(refund)
}

// Give applies refunds the caller built (negative costs, in a buffer it
// reuses) and wakes the lanes of those buckets: Release without its
// allocation, for the end of every request that holds a slot.
func (q *Queue) Give(refunds []Charge) error {
	err := q.store.Adjust(context.Background(), q.clock.Now(), refunds)
	q.Wake(refunds)
	return err
}

// Wake tells the lanes of these buckets that capacity may have freed: a
// concurrency slot was released or a token estimate was refunded.
func (q *Queue) Wake(charges []Charge) {
	q.wakes.Add(1)
	if q.nlanes.Load() == 0 {
		return
	}
	// The lanes are found under one lock, and dispatched outside it.
	var buf [8]*lane
	found := buf[:0]
	q.mu.Lock()
	for i := range charges {
		if ln := q.lanes[string(charges[i].Key)]; ln != nil {
			found = append(found, ln)
		}
	}
	q.mu.Unlock()
	for _, ln := range found {
		q.dispatch(ln)
	}
}

// UpdateLimit tells the queue of a bucket that its limit changed, so that
// the requests waiting for it are admitted under the new one. Requests
// that join later carry the limit themselves.
func (q *Queue) UpdateLimit(key []byte, l Limit) {
	if q.nlanes.Load() == 0 {
		return
	}
	q.mu.Lock()
	ln := q.lanes[string(key)]
	if ln != nil {
		ln.limit = l
	}
	q.mu.Unlock()
	if ln != nil {
		// A higher limit may admit someone now.
		q.dispatch(ln)
	}
}

// Joined returns how many requests have joined the queue since it was
// created: the requests that had to wait.
func (q *Queue) Joined() uint64 { return q.joined.Load() }

// Len returns how many requests wait, in all lanes.
func (q *Queue) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := 0
	for _, ln := range q.lanes {
		n += ln.depth
	}
	return n
}

// lane returns the lane of a bucket, creating it. q.mu is held.
func (q *Queue) lane(key string) (ln *lane, fresh bool) {
	if ln = q.lanes[key]; ln != nil {
		return ln, false
	}
	ln = &lane{key: key}
	q.lanes[key] = ln
	q.nlanes.Add(1)
	return ln, true
}

// retire drops a lane that nobody waits in and nobody dispatches. q.mu is
// held.
func (q *Queue) retire(ln *lane) {
	if ln.depth > 0 || ln.dispatching || ln.dead {
		return
	}
	ln.dead = true
	if ln.timer != nil {
		ln.timer.Stop()
		ln.timer = nil
	}
	delete(q.lanes, ln.key)
	q.nlanes.Add(-1)
}

// arm schedules the lane's next dispatch at a given instant, replacing an
// earlier one. For a concurrency limit, the instant is ignored: the lane is
// woken by releases, and polls in case a release happened elsewhere. q.mu is
// held.
func (q *Queue) arm(ln *lane, at time.Time) {
	d := at.Sub(q.clock.Now())
	if ln.limit.Concurrent() {
		d = q.poll
	}
	if ln.timer != nil {
		ln.timer.Stop()
	}
	ln.timer = q.clock.AfterFunc(max(d, 0), func() { q.dispatch(ln) })
}

// dispatch tries the lane's picks against the store until one is refused by
// the lane's own bucket, or the lane is empty.
func (q *Queue) dispatch(ln *lane) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if ln.dead {
		return
	}
	if ln.dispatching {
		ln.again = true
		return
	}
	ln.dispatching = true
	defer func() {
		ln.dispatching = false
		q.retire(ln)
	}()
	for {
		ln.again = false
		w := ln.pick()
		if w == nil {
			return
		}
		w.state = waiterReserving
		// The bucket's limit as the lane knows it now: a waiter that
		// joined under an older limit (a reload, a limit learned since)
		// must not be admitted under it.
		w.charges[w.at].Limit = ln.limit
		now := q.clock.Now()
		q.mu.Unlock()
		d, err := q.store.Reserve(context.Background(), now, w.charges, 0, w.states)
		q.mu.Lock()
		w.state = waiterQueued
		w.tried = true
		if err != nil {
			// The store failed. The waiter's caller decides what that means
			// (the module lets the request through); the queue keeps going.
			w.err = err
			ln.remove(w)
			w.finish(Result{Decision: Decision{Allowed: false, Limiting: -1}, Outcome: Refused, Waited: now.Sub(w.arrived)})
			continue
		}
		ln.observe(w.states[w.at], now)
		switch {
		case d.Allowed:
			ln.served(w, now)
			ln.remove(w)
			w.finish(Result{Decision: d, Outcome: Admitted, Waited: now.Sub(w.arrived), Depth: ln.depth, Predicted: w.predicted})
		case w.leaving != 0:
			res := ln.refusal(w, w.leaving, now)
			ln.remove(w)
			w.finish(res)
		case d.Limiting == w.at:
			// The lane's bucket is not ready: try again when it is, unless
			// something freed capacity while the store was asked.
			if ln.again {
				continue
			}
			q.arm(ln, now.Add(d.Delay))
			return
		default:
			// Another bucket holds it back: wait there instead.
			ln.remove(w)
			q.move(w, d, now)
		}
	}
}

// move puts a waiter that another bucket refused in that bucket's lane.
// q.mu is held.
func (q *Queue) move(w *waiter, d Decision, now time.Time) {
	w.at = d.Limiting
	pol := w.policies[w.at]
	limit := w.charges[w.at].Limit
	if pol.MaxWait <= 0 || !limit.Concurrent() && now.Add(d.Delay).After(w.deadline) {
		why := Refused
		if pol.MaxWait > 0 {
			why = Predicted
		}
		w.finish(Result{Decision: d, Outcome: why, Waited: now.Sub(w.arrived)})
		return
	}
	ln, fresh := q.lane(w.key())
	if fresh {
		ln.observe(w.states[w.at], now)
	}
	if res, ok := ln.enqueue(q, w, now); !ok {
		w.finish(res)
		q.retire(ln)
		return
	}
	if fresh {
		q.arm(ln, now.Add(d.Delay))
	}
}

// waiter is one request in the queue. The queue owns copies of its charges,
// so that a caller that gives up may reuse its own buffers at once.
type waiter struct {
	charges  []Charge
	states   []State
	policies []Policy
	flowKey  string
	weight   float64
	priority int
	// at is the index of the charge whose lane the waiter is in.
	at       int
	arrived  time.Time
	deadline time.Time

	predicted time.Duration
	// tried is set once the store has filled states.
	tried   bool
	state   waiterState
	leaving Outcome
	lane    *lane
	flow    *flow
	done    chan Result
	err     error
}

type waiterState uint8

const (
	waiterQueued waiterState = iota
	waiterReserving
	waiterDone
)

func newWaiter(now time.Time, r *Request, at int) *waiter {
	w := &waiter{
		charges:  make([]Charge, len(r.Charges)),
		states:   make([]State, len(r.Charges)),
		policies: append([]Policy(nil), r.Policies...),
		flowKey:  string(r.Flow),
		weight:   r.Weight,
		priority: r.Priority,
		at:       at,
		arrived:  now,
		deadline: now.Add(r.Policies[at].MaxWait),
		done:     make(chan Result, 1),
	}
	if w.weight <= 0 {
		w.weight = 1
	}
	n := 0
	for _, c := range r.Charges {
		n += len(c.Key)
	}
	keys := make([]byte, 0, n)
	for i, c := range r.Charges {
		start := len(keys)
		keys = append(keys, c.Key...)
		w.charges[i] = Charge{Key: keys[start:len(keys):len(keys)], Limit: c.Limit, Cost: c.Cost}
	}
	copy(w.states, r.States)
	return w
}

func (w *waiter) key() string { return string(w.charges[w.at].Key) }

func (w *waiter) cost() int64 { return w.charges[w.at].Cost }

// finish hands the waiter its result. q.mu is held (or the waiter was never
// shared), so a withdraw that finds it done knows the result is there.
func (w *waiter) finish(res Result) {
	w.state = waiterDone
	w.lane, w.flow = nil, nil
	w.done <- res
}
