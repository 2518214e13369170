package bucket

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// fillBucket makes the harness's default bucket refuse for one interval, so
// that the requests after it wait.
func (h *queueHarness) fillBucket() {
	h.t.Helper()
	h.submit(-1, req{flow: "filler"})
	if r := h.next(); r.res.Outcome != Admitted {
		h.t.Fatalf("filler: %+v", r.res)
	}
}

// A flow that keeps exactly one request waiting (a client that sends its
// next request as soon as the previous one is admitted) is forgotten every
// time it is served, and comes back at the class's virtual time, which is
// the counter it had before it was charged: it is never charged at all. A
// backlogged flow competing with it is then never served again.
//
// VTC lifts a returning flow to max(its own counter, the virtual time); the
// queue resets it to the virtual time.
func TestReviewClosedLoopFlowIsNeverCharged(t *testing.T) {
	h := newQueueHarness(t)
	h.fillBucket()
	flowOf := map[int]string{}
	id := 0
	send := func(f string) {
		flowOf[id] = f
		h.submit(id, req{flow: f, policy: wait1m})
		id++
	}
	for range 3 {
		send("backlog")
	}
	send("oneatatime")
	served := map[string]int{}
	for range 20 {
		h.clock.Advance(interval)
		r := h.next()
		if r.res.Outcome != Admitted {
			t.Fatalf("request %d: %v", r.id, r.res.Outcome)
		}
		f := flowOf[r.id]
		served[f]++
		send(f) // closed loop: the flow's next request, at once
	}
	t.Logf("served in 20 dispatches: %v", served)
	// Both flows wait the whole time, with equal weights: VTC gives each
	// about half.
	if served["backlog"] < 7 {
		t.Errorf("the backlogged flow got %d of 20 dispatches, want about 10", served["backlog"])
	}
	h.drain()
}

// Flows that all start at the virtual time have equal counters, and the
// heap breaks ties by position: container/heap moves the last element to
// the top on every removal, so the newest flow goes first. With one new
// single-request flow arriving per service interval, an older waiter is
// passed over again and again, until its max_wait.
func TestReviewEqualCountersAreServedNewestFirst(t *testing.T) {
	h := newQueueHarness(t)
	h.fillBucket()
	h.submit(1, req{flow: "u1", policy: wait1m})
	h.submit(2, req{flow: "u2", policy: wait1m})
	servedAt := map[int]int{}
	for i := 3; i < 23; i++ {
		h.submit(i, req{flow: fmt.Sprint("u", i), policy: wait1m})
		h.clock.Advance(interval)
		r := h.next()
		servedAt[r.id] = i - 2 // dispatch number
	}
	t.Logf("u2 served at dispatch %d (0: not in 20)", servedAt[2])
	// Arrival order among flows of equal standing: u1, u2 first, each
	// within a couple of dispatches.
	if n, ok := servedAt[2]; !ok || n > 3 {
		t.Errorf("u2, second in line, was not served in the first 3 dispatches (dispatch %d; 0 means never in 20)", n)
	}
	h.drain()
}

// A charge larger than the bucket's capacity conforms, in the store, once
// the bucket is full (Decision.Delay does not count the excess), but the
// lane's prediction counts its whole span. So a request that passes Admit's
// own check (d.Delay <= max_wait) can be refused Predicted by enqueue, on a
// lane Admit has just created. That lane is then never armed and never
// retired: it stays in q.lanes empty, and every later request for the bucket
// joins it through joinLane and waits for a dispatch that never comes, until
// its max_wait, even though the bucket is free.
func TestReviewFreshLaneLeaksWhenEnqueueRefuses(t *testing.T) {
	h := newQueueHarness(t)
	h.fillBucket() // capacity 1 unit, full for 100 ms
	big := []Charge{{Key: []byte("b"), Limit: perSecond10, Cost: 5}}
	h.submit(1, req{charges: big, policy: Policy{MaxWait: 300 * time.Millisecond}})
	select {
	case r := <-h.results:
		// Refused at once (the store would have admitted it at 100 ms,
		// within its 300 ms: see the next test).
		t.Logf("oversize request: %v, delay %s", r.res.Outcome, r.res.Delay)
		if n := h.q.nlanes.Load(); n != 0 {
			t.Errorf("%d lane(s) left after a refusal, with nobody waiting", n)
		}
	default:
		// It waits: then it must be served when the bucket is full.
		h.clock.Advance(interval)
		if r := h.next(); r.id != 1 || r.res.Outcome != Admitted {
			t.Fatalf("oversize request: %+v", r.res)
		}
	}
	// Much later, the bucket is long full again.
	h.clock.Advance(10 * time.Second)
	h.submit(2, req{policy: wait1m})
	select {
	case r := <-h.results:
		if r.res.Outcome != Admitted || r.res.Waited != 0 {
			t.Errorf("got %+v, want admitted at once", r.res)
		}
	case <-time.After(200 * time.Millisecond):
		t.Errorf("a request for a free bucket is stuck in a lane nobody dispatches")
		h.clock.Advance(time.Minute) // let it time out
		t.Logf("then: %+v", h.next().res)
	}
}

// The same over-count makes the prediction refuse an oversize request that
// the bucket would admit in time, with a Retry-After that is too long.
func TestReviewOversizePredictionCountsTheWholeSpan(t *testing.T) {
	h := newQueueHarness(t)
	h.fillBucket()
	// Another request waits, so that the oversize one joins an existing
	// lane (no leak here).
	h.submit(1, req{flow: "x", policy: wait1m})
	big := []Charge{{Key: []byte("b"), Limit: perSecond10, Cost: 5}}
	// Its turn: after request 1, at 200 ms (the store admits a charge
	// larger than the capacity once the bucket is full).
	h.submit(2, req{flow: "y", charges: big, policy: Policy{MaxWait: 300 * time.Millisecond}})
	h.clock.Advance(interval)
	r := h.next()
	if r.id == 2 {
		t.Fatalf("oversize request: %+v, want it to wait for its turn at 200 ms", r.res)
	}
	h.clock.Advance(interval)
	r = h.next()
	if r.id != 2 || r.res.Outcome != Admitted {
		t.Errorf("oversize request: %+v, want admitted at 200 ms", r.res)
	}
	h.drain()
}

// leavingWaiters counts the waiters the dispatcher holds that were asked to
// leave.
func leavingWaiters(q *Queue) int {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := 0
	for _, ln := range q.lanes {
		for _, c := range ln.classes {
			for _, f := range c.backlog {
				for _, w := range f.waiters {
					if w.leaving != 0 {
						n++
					}
				}
			}
		}
	}
	return n
}

// A waiter whose max_wait ends while the dispatcher is asking the store for
// it leaves through dispatch's "leaving" case, which removes it from the lane
// before computing its refusal: with w.flow already nil, refusal predicts
// nothing, and the request gets Delay 0 (Retry-After: the 1 s floor,
// Retry-After-Ms 1) however long the bucket's queue really is. withdraw,
// for a queued waiter, computes the refusal first.
func TestReviewTimeoutWhileReservingLosesRetryAfter(t *testing.T) {
	clock := newFakeClock()
	mem := NewMemoryStore()
	store := &blockingStore{Store: mem, gate: make(chan struct{}), entered: make(chan struct{}, 10)}
	q := NewQueue(store, clock)
	lim := Limit{Count: 10, Window: time.Second, Burst: 1}
	ch := []Charge{{Key: []byte("slow"), Limit: lim, Cost: 1}}
	mem.Reserve(context.Background(), clock.Now(), ch, 0, nil) // full for 100 ms
	result := make(chan Result, 1)
	go func() {
		r, _ := q.Admit(context.Background(), clock.Now(), &Request{Charges: ch, States: make([]State, 1), Policies: []Policy{{MaxWait: 250 * time.Millisecond}}})
		result <- r
	}()
	<-store.entered // the direct try
	store.gate <- struct{}{}
	waitFor(t, func() bool { return q.Len() == 1 })
	// The lane's timer and the waiter's deadline timer are both set.
	waitFor(t, func() bool { clock.mu.Lock(); defer clock.mu.Unlock(); return len(clock.timers) >= 2 })
	go q.Wake(ch) // a dispatch at time 0, which the store will refuse
	<-store.entered
	advanced := make(chan struct{})
	go func() { clock.Advance(300 * time.Millisecond); close(advanced) }() // max_wait ends meanwhile
	waitFor(t, func() bool { return leavingWaiters(q) == 1 })
	store.gate <- struct{}{}
	r := <-result
	<-advanced
	// The lane's timer fired during the Advance and found the lane
	// dispatching; let any dispatch it scheduled run and finish.
	clock.Advance(time.Second)
	if r.Outcome != TimedOut {
		t.Fatalf("outcome %v, want timeout", r.Outcome)
	}
	// At time 0 (the dispatch's instant) the bucket needs 100 ms.
	if r.Delay <= 0 {
		t.Errorf("timed out with Delay %s: the refusal was computed after the waiter left its flow", r.Delay)
	}
	if q.Len() != 0 || q.nlanes.Load() != 0 {
		t.Errorf("queue not empty: %d waiting, %d lanes", q.Len(), q.nlanes.Load())
	}
}

// A waiter that another bucket refuses moves to that bucket's lane; when
// that lane's enqueue turns it away (queue full, or predicted too late),
// the refusal comes from enqueue, which leaves Waited at 0, although the
// request did wait. The handler adds Waited to its clock for the headers
// and reports it in X-Queue-Wait-Ms.
func TestReviewMovedWaiterRefusedReportsNoWait(t *testing.T) {
	h := newQueueHarness(t)
	pol := Policy{MaxWait: time.Minute, MaxDepth: 1}
	a := Charge{Key: []byte("a"), Limit: Limit{Count: 5, Window: time.Second, Burst: 1}, Cost: 1} // 200 ms
	s := Charge{Key: []byte("s"), Limit: perSecond10, Cost: 1}                                    // 100 ms
	h.submit(0, req{charges: []Charge{a}, policy: pol})
	h.next() // a is full until 200 ms
	h.submit(1, req{flow: "x", charges: []Charge{a, s}, policy: pol})
	h.clock.Advance(150 * time.Millisecond)
	h.submit(2, req{charges: []Charge{s}, policy: pol})
	if r := h.next(); r.id != 2 || r.res.Outcome != Admitted {
		t.Fatalf("got %d %+v", r.id, r.res) // s is full until 250 ms
	}
	h.submit(3, req{flow: "y", charges: []Charge{s}, policy: pol}) // s's lane is full
	h.clock.Advance(50 * time.Millisecond)                         // a frees; s refuses request 1
	r := h.next()
	if r.id != 1 {
		t.Fatalf("got %d %+v", r.id, r.res)
	}
	t.Logf("request 1: %+v", r.res)
	if r.res.Outcome != QueueFull {
		t.Fatalf("outcome %v: not the path under test", r.res.Outcome)
	}
	if r.res.Waited != 200*time.Millisecond {
		t.Errorf("moved and turned away after waiting 200ms, but Waited is %s", r.res.Waited)
	}
	h.clock.Advance(time.Second)
	h.next()
}

// hookStore runs after, once, after a refused Reserve, on the caller's
// goroutine and before the caller sees the decision.
type hookStore struct {
	Store
	after func()
}

func (s *hookStore) Reserve(ctx context.Context, now time.Time, charges []Charge, maxWait time.Duration, states []State) (Decision, error) {
	d, err := s.Store.Reserve(ctx, now, charges, maxWait, states)
	if f := s.after; f != nil && !d.Allowed {
		s.after = nil
		f()
	}
	return d, err
}

// A concurrency slot released between Admit's refused store call and the
// creation of the lane wakes nobody (Wake sees no lane), and the new lane is
// armed only for the poll: the request waits a whole poll period (1 s) for a
// slot that is free. For a rate limit the same window loses a settle's
// refund, and the request waits the full predicted delay.
func TestReviewReleaseBeforeLaneExistsIsLost(t *testing.T) {
	clock := newFakeClock()
	mem := NewMemoryStore()
	hs := &hookStore{Store: mem}
	q := NewQueue(hs, clock)
	one := []Charge{{Key: []byte("c"), Limit: Limit{Count: 1}, Cost: 1}}
	if d, _ := mem.Reserve(context.Background(), clock.Now(), one, 0, nil); !d.Allowed {
		t.Fatal("first holder refused")
	}
	hs.after = func() { q.Release(one) } // the holder leaves just then
	result := make(chan Result, 1)
	go func() {
		r, _ := q.Admit(context.Background(), clock.Now(), &Request{Charges: one, States: make([]State, 1), Policies: []Policy{wait1m}})
		result <- r
	}()
	select {
	case r := <-result:
		if r.Outcome != Admitted {
			t.Fatalf("got %+v", r)
		}
		q.Release(one)
		return
	case <-time.After(200 * time.Millisecond):
	}
	t.Errorf("the slot is free but the request waits for the lane's poll")
	clock.Advance(q.poll)
	r := <-result
	t.Logf("after the poll: %v, waited %s", r.Outcome, r.Waited)
	q.Release(one)
}

// The lane's timer is armed for the request it picked. When that request
// leaves (canceled, or timed out) nothing re-arms the lane, so the next one
// waits for what the departed request needed rather than what it needs
// itself: here a 10-token request behind a canceled 100-token one waits
// 100 ms instead of 10. With a large token request at the head, the
// requests behind it can wait for seconds with the bucket ready for them,
// and time out.
func TestReviewDepartedPickLeavesTheTimerLate(t *testing.T) {
	h := newQueueHarness(t)
	tokens := Limit{Count: 1000, Window: time.Second, Burst: 100} // 1 token per ms
	charge := func(n int64) []Charge { return []Charge{{Key: []byte("t"), Limit: tokens, Cost: n}} }
	h.submit(0, req{charges: charge(100)})
	h.next() // empty until 100 ms
	ctx, cancel := context.WithCancel(context.Background())
	h.submit(1, req{flow: "a", charges: charge(100), policy: wait1m, ctx: ctx}) // its turn: 100 ms
	h.submit(2, req{flow: "b", charges: charge(10), policy: wait1m})
	cancel()
	if r := h.next(); r.id != 1 || r.res.Outcome != Canceled {
		t.Fatalf("got %d %+v", r.id, r.res)
	}
	h.clock.Advance(10 * time.Millisecond) // 10 tokens are back
	select {
	case r := <-h.results:
		if r.id != 2 || r.res.Outcome != Admitted {
			t.Fatalf("got %d %+v", r.id, r.res)
		}
	case <-time.After(100 * time.Millisecond):
		t.Errorf("the bucket can take request 2 since 10 ms, but the lane waits for the canceled request's 100 ms")
		h.clock.Advance(90 * time.Millisecond)
		r := h.next()
		t.Logf("request 2 then: %v after %s", r.res.Outcome, r.res.Waited)
	}
}
