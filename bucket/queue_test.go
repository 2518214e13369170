package bucket

import (
	"context"
	"fmt"
	"math"
	"runtime"
	"sort"
	"sync"
	"testing"
	"time"
)

// fakeClock is a Clock that moves only when a test advances it. Timers fire
// in the advancing goroutine, in order of their time (then of creation), so
// that every dispatch happens at a known instant.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	seq    int
	timers []*fakeTimer
}

type fakeTimer struct {
	c     *fakeClock
	at    time.Time
	seq   int
	f     func()
	state int // 0 pending, 1 fired, 2 stopped
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Date(2026, 5, 1, 0, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) AfterFunc(d time.Duration, f func()) Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.seq++
	t := &fakeTimer{c: c, at: c.now.Add(d), seq: c.seq, f: f}
	c.timers = append(c.timers, t)
	return t
}

func (t *fakeTimer) Stop() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	if t.state != 0 {
		return false
	}
	t.state = 2
	return true
}

// Advance moves the clock by d, firing the timers due on the way.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	target := c.now.Add(d)
	c.mu.Unlock()
	for {
		c.mu.Lock()
		var next *fakeTimer
		live := c.timers[:0]
		for _, t := range c.timers {
			if t.state != 0 {
				continue
			}
			live = append(live, t)
			if !t.at.After(target) && (next == nil || t.at.Before(next.at) || t.at.Equal(next.at) && t.seq < next.seq) {
				next = t
			}
		}
		c.timers = live
		if next == nil {
			c.now = target
			c.mu.Unlock()
			return
		}
		if next.at.After(c.now) {
			c.now = next.at
		}
		next.state = 1
		c.mu.Unlock()
		next.f()
	}
}

// queueHarness runs Admit calls in goroutines against a queue on a fake
// clock and collects their results.
type queueHarness struct {
	t       *testing.T
	clock   *fakeClock
	store   *MemoryStore
	q       *Queue
	results chan queueResult
	running sync.WaitGroup
}

type queueResult struct {
	id  int
	res Result
	err error
}

func newQueueHarness(t *testing.T) *queueHarness {
	t.Helper()
	before := runtime.NumGoroutine()
	clock := newFakeClock()
	store := NewMemoryStore()
	h := &queueHarness{t: t, clock: clock, store: store, q: NewQueue(store, clock), results: make(chan queueResult, 10000)}
	t.Cleanup(func() {
		// Every Admit must have returned, and no goroutine is left behind.
		done := make(chan struct{})
		go func() { h.running.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Errorf("Admit calls still blocked at the end of the test")
			return
		}
		deadline := time.Now().Add(5 * time.Second)
		for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		if n := runtime.NumGoroutine(); n > before {
			t.Errorf("%d goroutines left behind", n-before)
		}
		if n := h.q.Len(); n != 0 {
			t.Errorf("%d requests still queued", n)
		}
	})
	return h
}

// req describes one request for the harness.
type req struct {
	flow     string
	cost     int64
	priority int
	weight   float64
	policy   Policy
	charges  []Charge // defaults to the harness's bucket
	ctx      context.Context
}

var perSecond10 = Limit{Count: 10, Window: time.Second, Burst: 1} // one every 100 ms

func (h *queueHarness) charges(r req) []Charge {
	if r.charges != nil {
		return r.charges
	}
	cost := r.cost
	if cost == 0 {
		cost = 1
	}
	return []Charge{{Key: []byte("b"), Limit: perSecond10, Cost: cost}}
}

// submit starts an Admit call and returns once it has either finished or
// joined the queue (so that submissions are ordered).
func (h *queueHarness) submit(id int, r req) {
	h.t.Helper()
	charges := h.charges(r)
	pols := make([]Policy, len(charges))
	for i := range pols {
		pols[i] = r.policy
	}
	ctx := r.ctx
	if ctx == nil {
		ctx = context.Background()
	}
	request := &Request{Charges: charges, States: make([]State, len(charges)), Policies: pols, Flow: []byte(r.flow), Weight: r.weight, Priority: r.priority}
	joined := h.q.Joined()
	done := make(chan struct{})
	h.running.Add(1)
	go func() {
		defer h.running.Done()
		res, err := h.q.Admit(ctx, h.clock.Now(), request)
		h.results <- queueResult{id, res, err}
		close(done)
	}()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-done:
			return
		default:
		}
		if h.q.Joined() > joined {
			return
		}
		runtime.Gosched()
	}
	h.t.Fatalf("request %d neither finished nor queued", id)
}

// next returns the next result, failing the test if none comes.
func (h *queueHarness) next() queueResult {
	h.t.Helper()
	select {
	case r := <-h.results:
		return r
	case <-time.After(5 * time.Second):
		h.t.Fatalf("no result")
		return queueResult{}
	}
}

// none checks that no result is pending.
func (h *queueHarness) none() {
	h.t.Helper()
	select {
	case r := <-h.results:
		h.t.Fatalf("unexpected result for request %d: %+v", r.id, r.res)
	case <-time.After(20 * time.Millisecond):
	}
}

// drain serves whatever is still queued.
func (h *queueHarness) drain() {
	h.t.Helper()
	for h.q.Len() > 0 {
		h.clock.Advance(time.Second)
		for {
			select {
			case <-h.results:
				continue
			case <-time.After(5 * time.Millisecond):
			}
			break
		}
	}
}

const interval = 100 * time.Millisecond

var wait1m = Policy{MaxWait: time.Minute}

func TestQueueAdmitsAtOnceWhenFree(t *testing.T) {
	h := newQueueHarness(t)
	h.submit(1, req{policy: wait1m})
	if r := h.next(); r.res.Outcome != Admitted || r.res.Waited != 0 || r.res.Depth != 0 {
		t.Fatalf("got %+v", r.res)
	}
	if h.q.nlanes.Load() != 0 {
		t.Fatal("a lane was created for an admitted request")
	}
}

func TestQueueNoWaitRefusesAtOnce(t *testing.T) {
	h := newQueueHarness(t)
	h.submit(1, req{})
	h.next()
	h.submit(2, req{})
	r := h.next()
	if r.res.Outcome != Refused || r.res.Allowed || r.res.Delay != interval {
		t.Fatalf("got %+v, want Refused with a delay of one interval", r.res)
	}
}

// A single flow is served first come, first served, one interval apart, and
// each request's predicted wait is its actual wait.
func TestQueueFIFOAndPrediction(t *testing.T) {
	h := newQueueHarness(t)
	for i := 0; i < 6; i++ {
		h.submit(i, req{policy: wait1m})
	}
	if r := h.next(); r.id != 0 || r.res.Waited != 0 {
		t.Fatalf("first: %+v", r)
	}
	for i := 1; i < 6; i++ {
		h.none()
		h.clock.Advance(interval)
		r := h.next()
		if r.id != i || r.res.Outcome != Admitted {
			t.Fatalf("step %d: got request %d, %v", i, r.id, r.res.Outcome)
		}
		want := time.Duration(i) * interval
		if r.res.Waited != want {
			t.Errorf("request %d waited %s, want %s", i, r.res.Waited, want)
		}
		if d := r.res.Predicted - r.res.Waited; d < -interval || d > interval {
			t.Errorf("request %d: predicted %s, waited %s", i, r.res.Predicted, r.res.Waited)
		}
		if r.res.Depth != 5-i {
			t.Errorf("request %d: depth %d, want %d", i, r.res.Depth, 5-i)
		}
	}
}

// A request whose turn is predicted after max_wait is refused at once, with
// the predicted wait as its Retry-After; that prediction is within one
// interval of the time it would really have been served.
func TestQueuePredictiveRefusal(t *testing.T) {
	h := newQueueHarness(t)
	pol := Policy{MaxWait: 350 * time.Millisecond}
	for i := 0; i < 4; i++ { // admitted at 0, then queued for 100, 200, 300 ms
		h.submit(i, req{policy: pol})
	}
	h.next()
	h.submit(4, req{policy: pol}) // its turn would be at 400 ms
	r := h.next()
	if r.id != 4 || r.res.Outcome != Predicted || r.res.Waited != 0 {
		t.Fatalf("got %d %+v, want an immediate Predicted refusal", r.id, r.res)
	}
	if d := r.res.Delay - 4*interval; d < -interval || d > interval {
		t.Errorf("Retry-After %s, want about %s", r.res.Delay, 4*interval)
	}
	// Check the prediction against reality: the same request with room to
	// wait is served at 400 ms.
	h.submit(5, req{policy: wait1m})
	for i := 1; i <= 4; i++ {
		h.clock.Advance(interval)
		r := h.next()
		if i == 4 && (r.id != 5 || r.res.Waited != 4*interval) {
			t.Fatalf("got %d after %s", r.id, r.res.Waited)
		}
	}
}

// runFair serves flows with the given backlogs (request costs per flow) and
// weights, and returns the order of service. While every flow is
// backlogged, it checks that the weighted service of any two flows never
// differs by more than bound.
func runFair(t *testing.T, costs [][]int64, weights []float64, bound float64) []int {
	t.Helper()
	h := newQueueHarness(t)
	tokens := Limit{Count: 1000, Window: time.Second, Burst: 100}
	// Fill the bucket first, so that every request waits.
	h.submit(-1, req{charges: []Charge{{Key: []byte("t"), Limit: tokens, Cost: 100}}})
	h.next()
	owner, costOf := map[int]int{}, map[int]int64{}
	remaining := make([]int, len(costs))
	total := int64(0)
	n := 0
	for f, cs := range costs {
		for _, c := range cs {
			owner[n], costOf[n] = f, c
			h.submit(n, req{flow: fmt.Sprint("f", f), weight: weights[f], policy: Policy{MaxWait: time.Hour},
				charges: []Charge{{Key: []byte("t"), Limit: tokens, Cost: c}}})
			n++
			remaining[f]++
			total += c
		}
	}
	// Every request costs at least 10 ms of the bucket, so no two are
	// admitted at the same instant, and the time of admission gives the
	// order.
	h.clock.Advance(time.Duration(total+1) * time.Millisecond)
	results := make([]queueResult, n)
	for i := range results {
		results[i] = h.next()
		if results[i].res.Outcome != Admitted {
			t.Fatalf("request %d: %v", results[i].id, results[i].res.Outcome)
		}
	}
	sort.Slice(results, func(i, j int) bool { return results[i].res.Waited < results[j].res.Waited })
	served := make([]float64, len(costs))
	spread := 0.0
	defer func() {
		t.Logf("largest weighted service spread while all flows waited: %.1f (bound %.1f)", spread, bound)
	}()
	var order []int
	for k, r := range results {
		if k > 0 && r.res.Waited == results[k-1].res.Waited {
			t.Fatalf("two admissions at %s", r.res.Waited)
		}
		f := owner[r.id]
		order = append(order, f)
		served[f] += float64(costOf[r.id]) / weights[f]
		remaining[f]--
		all := true
		for _, left := range remaining {
			all = all && left > 0
		}
		if !all {
			continue
		}
		lo, hi := math.Inf(1), math.Inf(-1)
		for _, s := range served {
			lo, hi = math.Min(lo, s), math.Max(hi, s)
		}
		spread = math.Max(spread, hi-lo)
		if hi-lo > bound {
			t.Fatalf("after %d dispatches, weighted service spread %.1f > %.1f: %v", len(order), hi-lo, bound, served)
		}
	}
	return order
}

func TestQueueFairness(t *testing.T) {
	for _, n := range []int{2, 3, 5, 10} {
		t.Run(fmt.Sprint(n, "flows"), func(t *testing.T) {
			// Unequal demand: flow f has 3(f+1) requests of cost 10(f+1).
			costs := make([][]int64, n)
			weights := make([]float64, n)
			maxCost := 0.0
			for f := range costs {
				for range 3 * (f + 1) {
					costs[f] = append(costs[f], int64(10*(f+1)))
				}
				weights[f] = 1
				maxCost = math.Max(maxCost, float64(10*(f+1)))
			}
			// VTC's bound: two flows backlogged together differ by at most
			// twice the largest request.
			runFair(t, costs, weights, 2*maxCost)
		})
	}
}

func TestQueueWeights(t *testing.T) {
	costs := [][]int64{make([]int64, 40), make([]int64, 40)}
	for f := range costs {
		for i := range costs[f] {
			costs[f][i] = 10
		}
	}
	order := runFair(t, costs, []float64{1, 3}, 2*10)
	// In the first 40 dispatches, the weight-3 flow gets about 3/4.
	n := 0
	for _, f := range order[:40] {
		n += f
	}
	if n < 28 || n > 32 {
		t.Errorf("weight 3 flow got %d of the first 40 dispatches, want about 30", n)
	}
}

// A light user behind a flooder waits about one interval, not the flooder's
// backlog.
func TestQueueLightUserBehindFlooder(t *testing.T) {
	h := newQueueHarness(t)
	for i := 0; i < 50; i++ {
		h.submit(i, req{flow: "heavy", policy: wait1m})
	}
	h.next() // the first went straight through
	h.clock.Advance(interval)
	h.next()
	h.submit(100, req{flow: "light", policy: wait1m})
	h.clock.Advance(interval)
	r := h.next()
	if r.id != 100 || r.res.Waited != interval {
		t.Fatalf("got request %d after %s, want the light user's after one interval", r.id, r.res.Waited)
	}
	if r.res.Predicted != interval {
		t.Errorf("predicted %s, want %s", r.res.Predicted, interval)
	}
	// Drain the rest.
	for i := 0; i < 48; i++ {
		h.clock.Advance(interval)
		h.next()
	}
}

func TestQueuePriorities(t *testing.T) {
	h := newQueueHarness(t)
	for i := 0; i < 5; i++ {
		h.submit(i, req{flow: "a", policy: wait1m})
	}
	h.next()
	h.submit(10, req{flow: "b", priority: 1, policy: wait1m})
	h.submit(11, req{flow: "a", priority: 2, policy: wait1m})
	var got []int
	for i := 0; i < 6; i++ {
		h.clock.Advance(interval)
		got = append(got, h.next().id)
	}
	want := []int{11, 10, 1, 2, 3, 4}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("order %v, want %v", got, want)
	}
}

// A request whose place is taken by later, higher-priority arrivals waits its
// max_wait and no more, and leaves with a Retry-After.
func TestQueueTimeout(t *testing.T) {
	h := newQueueHarness(t)
	pol := Policy{MaxWait: 250 * time.Millisecond}
	h.submit(0, req{policy: pol})
	h.next()
	h.submit(1, req{policy: pol}) // predicted 100 ms
	for i := 0; i < 5; i++ {
		h.submit(10+i, req{priority: 1, flow: "vip", policy: wait1m})
	}
	h.clock.Advance(interval)
	if r := h.next(); r.id != 10 {
		t.Fatalf("got %d", r.id)
	}
	h.clock.Advance(interval)
	if r := h.next(); r.id != 11 {
		t.Fatalf("got %d", r.id)
	}
	h.clock.Advance(50 * time.Millisecond)
	r := h.next()
	if r.id != 1 || r.res.Outcome != TimedOut || r.res.Waited != 250*time.Millisecond || r.res.Delay <= 0 {
		t.Fatalf("got %d %+v, want request 1 timed out after 250ms with a Retry-After", r.id, r.res)
	}
	for i := 0; i < 3; i++ {
		h.clock.Advance(interval)
		h.next()
	}
}

// A canceled waiter leaves at once, and its place costs nobody anything: the
// next request is served when it would have been anyway.
func TestQueueCancelWhileQueued(t *testing.T) {
	h := newQueueHarness(t)
	h.submit(0, req{policy: wait1m})
	h.next()
	ctx, cancel := context.WithCancel(context.Background())
	h.submit(1, req{policy: wait1m, ctx: ctx})
	h.submit(2, req{policy: wait1m})
	cancel()
	if r := h.next(); r.id != 1 || r.res.Outcome != Canceled || r.res.Allowed {
		t.Fatalf("got %d %+v", r.id, r.res)
	}
	if n := h.q.Len(); n != 1 {
		t.Fatalf("queue holds %d, want 1", n)
	}
	h.clock.Advance(interval)
	if r := h.next(); r.id != 2 || r.res.Waited != interval {
		t.Fatalf("got %d after %s", r.id, r.res.Waited)
	}
}

// blockingStore stops each Reserve of a marked key until the test lets it go,
// to catch a request between the queue's pick and the store's answer.
type blockingStore struct {
	Store
	gate    chan struct{}
	entered chan struct{}
}

func (s *blockingStore) Reserve(ctx context.Context, now time.Time, charges []Charge, maxWait time.Duration, states []State) (Decision, error) {
	if string(charges[0].Key) == "slow" {
		s.entered <- struct{}{}
		<-s.gate
	}
	return s.Store.Reserve(ctx, now, charges, maxWait, states)
}

func TestQueueCancelWhileReserving(t *testing.T) {
	for _, admitted := range []bool{true, false} {
		t.Run(fmt.Sprint("admitted=", admitted), func(t *testing.T) {
			clock := newFakeClock()
			mem := NewMemoryStore()
			store := &blockingStore{Store: mem, gate: make(chan struct{}), entered: make(chan struct{}, 10)}
			q := NewQueue(store, clock)
			lim := Limit{Count: 10, Window: time.Second, Burst: 1}
			if !admitted {
				lim = Limit{Count: 1}
			}
			ch := []Charge{{Key: []byte("slow"), Limit: lim, Cost: 1}}
			// Fill the bucket through the store directly.
			mem.Reserve(context.Background(), clock.Now(), ch, 0, nil)
			ctx, cancel := context.WithCancel(context.Background())
			result := make(chan Result, 1)
			go func() {
				r, _ := q.Admit(ctx, clock.Now(), &Request{Charges: ch, States: make([]State, 1), Policies: []Policy{wait1m}})
				result <- r
			}()
			<-store.entered // the first, direct try
			store.gate <- struct{}{}
			waitFor(t, func() bool { return q.Len() == 1 })
			if admitted {
				go clock.Advance(interval) // frees the bucket; dispatch blocks in Reserve
			} else {
				go q.Wake(ch) // a dispatch that will be refused
			}
			<-store.entered
			cancel()
			// The caller must wait for the store's answer, not leave early.
			select {
			case r := <-result:
				t.Fatalf("returned %+v while the store was deciding", r)
			case <-time.After(20 * time.Millisecond):
			}
			store.gate <- struct{}{}
			r := <-result
			if r.Outcome != Canceled {
				t.Fatalf("outcome %v, want canceled", r.Outcome)
			}
			// Whatever the store decided, nothing is held: the bucket is as
			// the direct fill left it.
			var st [1]State
			mem.Peek(context.Background(), clock.Now(), ch, st[:])
			wantRemaining := int64(0)
			if admitted {
				wantRemaining = 1 // the interval passed and the admission was given back
			}
			if st[0].Remaining != wantRemaining {
				t.Fatalf("remaining %d, want %d", st[0].Remaining, wantRemaining)
			}
			if q.Len() != 0 || q.nlanes.Load() != 0 {
				t.Fatalf("queue not empty: %d waiting, %d lanes", q.Len(), q.nlanes.Load())
			}
		})
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 5s")
		}
		runtime.Gosched()
	}
}

// A full queue turns away the newest request of the flow with the most
// waiting, not a newcomer from another flow.
func TestQueueFullEvictsTheFlooder(t *testing.T) {
	h := newQueueHarness(t)
	pol := Policy{MaxWait: time.Minute, MaxDepth: 3}
	for i := 0; i < 4; i++ {
		h.submit(i, req{flow: "heavy", policy: pol})
	}
	h.next() // 0 admitted; 1, 2, 3 wait
	h.submit(10, req{flow: "light", policy: pol})
	if r := h.next(); r.id != 3 || r.res.Outcome != QueueFull || r.res.Delay <= 0 {
		t.Fatalf("got %d %+v, want the flooder's newest turned away", r.id, r.res)
	}
	h.submit(4, req{flow: "heavy", policy: pol})
	if r := h.next(); r.id != 4 || r.res.Outcome != QueueFull {
		t.Fatalf("got %d %+v, want the flooder's newcomer turned away", r.id, r.res)
	}
	var got []int
	for i := 0; i < 3; i++ {
		h.clock.Advance(interval)
		got = append(got, h.next().id)
	}
	sort.Ints(got)
	if fmt.Sprint(got) != "[1 2 10]" {
		t.Fatalf("served %v", got)
	}
}

// A concurrency limit queues requests until a holder releases, with no
// clock movement at all.
func TestQueueConcurrency(t *testing.T) {
	h := newQueueHarness(t)
	two := []Charge{{Key: []byte("c"), Limit: Limit{Count: 2}, Cost: 1}}
	for i := 0; i < 4; i++ {
		h.submit(i, req{charges: two, policy: wait1m})
	}
	h.next()
	h.next()
	h.none()
	h.q.Release(two)
	if r := h.next(); r.id != 2 || r.res.Outcome != Admitted {
		t.Fatalf("got %d %+v", r.id, r.res)
	}
	h.none()
	h.q.Release(two)
	if r := h.next(); r.id != 3 {
		t.Fatalf("got %d", r.id)
	}
	h.q.Release(two)
	h.q.Release(two)
	var st [1]State
	h.store.Peek(context.Background(), h.clock.Now(), two, st[:])
	if st[0].Remaining != 2 {
		t.Fatalf("remaining %d after every release, want 2", st[0].Remaining)
	}
}

// A release the queue does not hear of (another instance's) is found by the
// lane's poll.
func TestQueueConcurrencyPoll(t *testing.T) {
	h := newQueueHarness(t)
	one := []Charge{{Key: []byte("c"), Limit: Limit{Count: 1}, Cost: 1}}
	h.submit(0, req{charges: one, policy: wait1m})
	h.next()
	h.submit(1, req{charges: one, policy: wait1m})
	h.store.Adjust(context.Background(), h.clock.Now(), []Charge{{Key: []byte("c"), Limit: Limit{Count: 1}, Cost: -1}})
	h.none()
	h.clock.Advance(h.q.poll)
	if r := h.next(); r.id != 1 || r.res.Outcome != Admitted {
		t.Fatalf("got %d %+v", r.id, r.res)
	}
	h.q.Release(one)
}

// A request that its lane's bucket can take but another bucket cannot moves
// to that bucket's lane and is served there.
func TestQueueMovesToTheBlockingBucket(t *testing.T) {
	h := newQueueHarness(t)
	a := Charge{Key: []byte("a"), Limit: perSecond10, Cost: 1}
	slow := Charge{Key: []byte("s"), Limit: Limit{Count: 2, Window: time.Second, Burst: 1}, Cost: 1} // one per 500 ms
	h.submit(0, req{charges: []Charge{a}, policy: wait1m})
	h.next()
	h.submit(1, req{charges: []Charge{slow}, policy: wait1m})
	h.next()
	// Request 2 waits for a first; when a frees (100 ms), s still refuses it
	// until 500 ms.
	h.submit(2, req{charges: []Charge{a, slow}, policy: wait1m})
	h.clock.Advance(interval)
	h.none()
	h.clock.Advance(400 * time.Millisecond)
	r := h.next()
	if r.id != 2 || r.res.Outcome != Admitted || r.res.Waited != 500*time.Millisecond {
		t.Fatalf("got %d %+v", r.id, r.res)
	}
}

// Requests arriving while a bucket has waiters join the queue instead of
// overtaking it.
func TestQueueNewcomersDoNotOvertake(t *testing.T) {
	h := newQueueHarness(t)
	tokens := Limit{Count: 1000, Window: time.Second, Burst: 100}
	big := []Charge{{Key: []byte("t"), Limit: tokens, Cost: 100}}
	small := []Charge{{Key: []byte("t"), Limit: tokens, Cost: 1}}
	h.submit(0, req{charges: big, policy: wait1m})
	h.next()
	h.submit(1, req{charges: big, policy: wait1m}) // needs 100 ms
	h.clock.Advance(10 * time.Millisecond)
	// 10 tokens are free, but request 1 is waiting for 100 of them.
	h.submit(2, req{charges: small, policy: wait1m})
	h.none()
	h.clock.Advance(90 * time.Millisecond)
	if r := h.next(); r.id != 1 {
		t.Fatalf("got %d first", r.id)
	}
	h.clock.Advance(time.Millisecond)
	if r := h.next(); r.id != 2 {
		t.Fatalf("got %d", r.id)
	}
}

// A closed-loop flooder (each admitted request is followed at once by the
// next) with a light user arriving now and then: every light request waits
// at most about one interval.
func TestQueueLightUserBehindClosedLoop(t *testing.T) {
	h := newQueueHarness(t)
	lim := Limit{Count: 120, Window: time.Minute, Burst: 10}
	ch := []Charge{{Key: []byte("b"), Limit: lim, Cost: 1}}
	pol := Policy{MaxWait: time.Minute}
	next := 0
	for ; next < 16; next++ {
		h.submit(next, req{flow: "heavy", charges: ch, policy: pol})
	}
	step := 100 * time.Millisecond
	var worst time.Duration
	for i := 0; i < 600; i++ {
		if i%20 == 7 {
			h.submit(100000+i, req{flow: "light", charges: ch, policy: pol})
		}
		h.clock.Advance(step)
		// Collect what was admitted; resubmit heavy ones.
		for {
			var r queueResult
			select {
			case r = <-h.results:
			case <-time.After(5 * time.Millisecond):
				r.id = -1
			}
			if r.id == -1 {
				break
			}
			if r.res.Outcome != Admitted {
				t.Fatalf("request %d: %v", r.id, r.res.Outcome)
			}
			if r.id >= 100000 {
				worst = max(worst, r.res.Waited)
			} else {
				h.submit(next, req{flow: "heavy", charges: ch, policy: pol})
				next++
			}
		}
	}
	t.Logf("worst light wait %s", worst)
	if worst > 600*time.Millisecond {
		t.Errorf("a light request waited %s", worst)
	}
	h.drain()
}
