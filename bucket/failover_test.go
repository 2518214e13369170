package bucket_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/llmratelimit/caddy-llm-ratelimit/bucket"
	"github.com/llmratelimit/caddy-llm-ratelimit/internal/redistest"
)

// fakeBehavior is what a fakePrimary does on a call.
type fakeBehavior int32

const (
	// fakeOK answers from an in-memory store.
	fakeOK fakeBehavior = iota
	// fakeFail fails at once.
	fakeFail
	// fakeBlock waits for the call's context to end, as a well-behaved
	// client of an unresponsive server does.
	fakeBlock
	// fakeHang ignores the context and waits for release, as a client
	// without context deadlines does, then fails.
	fakeHang
	// fakeSlowOK waits for release, ignoring the context, then answers.
	fakeSlowOK
)

var errFake = errors.New("fake primary failure")

// fakePrimary is a Store whose calls succeed, fail or block on command.
type fakePrimary struct {
	behavior atomic.Int32
	calls    atomic.Int64
	inflight atomic.Int64
	// entered, when set, receives each call as it starts.
	entered chan struct{}
	// release ends the calls that hang.
	release chan struct{}
	// gate, when set, is waited on by failing calls before they fail (so
	// that many fail together).
	gate  chan struct{}
	inner *bucket.MemoryStore
	// lastKey is the first key of the last Reserve, read after it returned.
	mu      sync.Mutex
	lastKey string
}

func newFakePrimary() *fakePrimary {
	return &fakePrimary{release: make(chan struct{}), inner: bucket.NewMemoryStore()}
}

func (p *fakePrimary) set(b fakeBehavior) { p.behavior.Store(int32(b)) }

// do runs one call's behavior, and the call itself when it is to succeed.
func (p *fakePrimary) do(ctx context.Context, ok func() error) error {
	p.calls.Add(1)
	p.inflight.Add(1)
	defer p.inflight.Add(-1)
	if p.entered != nil {
		p.entered <- struct{}{}
	}
	switch fakeBehavior(p.behavior.Load()) {
	case fakeFail:
		if p.gate != nil {
			<-p.gate
		}
		return errFake
	case fakeBlock:
		<-ctx.Done()
		return ctx.Err()
	case fakeHang:
		<-p.release
		return errFake
	case fakeSlowOK:
		<-p.release
	}
	return ok()
}

func (p *fakePrimary) Reserve(ctx context.Context, now time.Time, cs []bucket.Charge, maxWait time.Duration, st []bucket.State) (bucket.Decision, error) {
	var d bucket.Decision
	err := p.do(ctx, func() error {
		var err error
		d, err = p.inner.Reserve(ctx, now, cs, maxWait, st)
		return err
	})
	if len(cs) > 0 {
		// Read the key after the wait: a Failover must have given the
		// primary its own copy.
		p.mu.Lock()
		p.lastKey = string(cs[0].Key)
		p.mu.Unlock()
	}
	if err != nil {
		return bucket.Decision{Limiting: -1}, err
	}
	return d, nil
}

func (p *fakePrimary) Adjust(ctx context.Context, now time.Time, cs []bucket.Charge) error {
	return p.do(ctx, func() error { return p.inner.Adjust(ctx, now, cs) })
}

func (p *fakePrimary) Peek(ctx context.Context, now time.Time, cs []bucket.Charge, st []bucket.State) error {
	return p.do(ctx, func() error { return p.inner.Peek(ctx, now, cs, st) })
}

func (p *fakePrimary) DeletePrefix(ctx context.Context, prefix []byte) (int, error) {
	var n int
	err := p.do(ctx, func() error {
		var err error
		n, err = p.inner.DeletePrefix(ctx, prefix)
		return err
	})
	return n, err
}

func (p *fakePrimary) Scan(ctx context.Context, now time.Time, prefix []byte, fn func([]byte, bucket.Level) bool) error {
	return p.do(ctx, func() error { return p.inner.Scan(ctx, now, prefix, fn) })
}

func (p *fakePrimary) Delete(ctx context.Context, keys [][]byte) (int, error) {
	var n int
	err := p.do(ctx, func() error {
		var err error
		n, err = p.inner.Delete(ctx, keys)
		return err
	})
	return n, err
}

// events counts a Failover's callbacks.
type events struct {
	outages, recoveries atomic.Int64
	mu                  sync.Mutex
	lastErr             error
}

func (e *events) options(o bucket.FailoverOptions) bucket.FailoverOptions {
	o.OnOutage = func(err error) {
		e.mu.Lock()
		e.lastErr = err
		e.mu.Unlock()
		e.outages.Add(1)
	}
	o.OnRecover = func() { e.recoveries.Add(1) }
	return o
}

var (
	rateLimit = bucket.Limit{Count: 10, Window: time.Minute, Burst: 5}
	concLimit = bucket.Limit{Count: 2}
)

func failCharges() []bucket.Charge {
	return []bucket.Charge{
		{Key: []byte("rate"), Limit: rateLimit, Cost: 1},
		{Key: []byte("conc"), Limit: concLimit, Cost: 1},
	}
}

// eventually polls cond every few milliseconds for up to 10s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 10s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func TestFailoverHealthy(t *testing.T) {
	p := newFakePrimary()
	var ev events
	f := bucket.NewFailover(p, ev.options(bucket.FailoverOptions{Mode: bucket.FailClosed}))
	ctx, now := context.Background(), time.Now()
	cs := failCharges()
	st := make([]bucket.State, 2)
	for i := 0; i < 5; i++ {
		d, err := f.Reserve(ctx, now, cs, 0, st)
		if err != nil || !d.Allowed {
			t.Fatalf("reserve %d: %+v, %v", i, d, err)
		}
		// Give the concurrency unit back.
		if err := f.Adjust(ctx, now, []bucket.Charge{{Key: []byte("conc"), Limit: concLimit, Cost: -1}}); err != nil {
			t.Fatal(err)
		}
	}
	if st[0].Remaining != 0 || st[1].Remaining != 1 {
		t.Fatalf("states not copied from the primary: %+v", st)
	}
	if d, err := f.Reserve(ctx, now, cs, 0, st); err != nil || d.Allowed || d.Limiting != 0 {
		t.Fatalf("sixth: %+v, %v; want refused by the primary", d, err)
	}
	if err := f.Peek(ctx, now, cs, st); err != nil || st[0].Remaining != 0 || st[1].Remaining != 2 {
		t.Fatalf("peek: %+v, %v", st, err)
	}
	if n, err := f.DeletePrefix(ctx, []byte("ra")); err != nil || n != 1 {
		t.Fatalf("DeletePrefix = %d, %v", n, err)
	}
	if p.calls.Load() != 13 || f.Down() || ev.outages.Load() != 0 {
		t.Fatalf("calls %d, down %v, outages %d", p.calls.Load(), f.Down(), ev.outages.Load())
	}
}

func TestFailoverOpen(t *testing.T) {
	p := newFakePrimary()
	p.set(fakeFail)
	var ev events
	f := bucket.NewFailover(p, ev.options(bucket.FailoverOptions{Mode: bucket.FailOpen, Backoff: time.Hour}))
	ctx, now := context.Background(), time.Now()
	for i := 0; i < 20; i++ {
		st := make([]bucket.State, 2)
		d, err := f.Reserve(ctx, now, failCharges(), 0, st)
		if err != nil || !d.Allowed || d.Delay != 0 || d.Limiting != -1 {
			t.Fatalf("reserve %d: %+v, %v; want allowed", i, d, err)
		}
		if st[0] != (bucket.State{Remaining: 5}) || st[1] != (bucket.State{Remaining: 2}) {
			t.Fatalf("reserve %d: states %+v, want full buckets", i, st)
		}
	}
	st := make([]bucket.State, 2)
	if err := f.Peek(ctx, now, failCharges(), st); err != nil || st[0].Remaining != 5 || st[1].Remaining != 2 {
		t.Fatalf("peek: %+v, %v; want full", st, err)
	}
	if err := f.Adjust(ctx, now, failCharges()); err != nil {
		t.Fatalf("adjust during outage: %v, want dropped", err)
	}
	// Only the first call reached the primary: the back-off skips it.
	if p.calls.Load() != 1 || !f.Down() || ev.outages.Load() != 1 || ev.recoveries.Load() != 0 {
		t.Fatalf("calls %d, down %v, outages %d, recoveries %d; want 1, true, 1, 0",
			p.calls.Load(), f.Down(), ev.outages.Load(), ev.recoveries.Load())
	}
	if !errors.Is(ev.lastErr, errFake) {
		t.Fatalf("OnOutage got %v", ev.lastErr)
	}
	if _, err := f.DeletePrefix(ctx, []byte("x")); !errors.Is(err, bucket.ErrPrimaryDown) {
		t.Fatalf("DeletePrefix while down: %v", err)
	}
}

func TestFailoverClosed(t *testing.T) {
	p := newFakePrimary()
	p.set(fakeFail)
	var ev events
	f := bucket.NewFailover(p, ev.options(bucket.FailoverOptions{Mode: bucket.FailClosed, Backoff: time.Hour}))
	ctx, now := context.Background(), time.Now()
	for i := 0; i < 5; i++ {
		d, err := f.Reserve(ctx, now, failCharges(), 0, make([]bucket.State, 2))
		if !errors.Is(err, bucket.ErrPrimaryDown) || !errors.Is(err, errFake) || d.Allowed {
			t.Fatalf("reserve %d: %+v, %v; want refused with the primary's error", i, d, err)
		}
	}
	if err := f.Peek(ctx, now, failCharges(), make([]bucket.State, 2)); !errors.Is(err, bucket.ErrPrimaryDown) {
		t.Fatalf("peek: %v", err)
	}
	if err := f.Adjust(ctx, now, failCharges()); err != nil {
		t.Fatalf("adjust during outage: %v, want dropped", err)
	}
	if p.calls.Load() != 1 || ev.outages.Load() != 1 {
		t.Fatalf("calls %d, outages %d; want 1, 1", p.calls.Load(), ev.outages.Load())
	}
}

func TestFailoverLocal(t *testing.T) {
	p := newFakePrimary()
	p.set(fakeFail)
	local := bucket.NewMemoryStore()
	var ev events
	f := bucket.NewFailover(p, ev.options(bucket.FailoverOptions{Mode: bucket.FailLocal, Local: local, Instances: 3, Backoff: time.Hour}))
	ctx, now := context.Background(), time.Now()
	rate := []bucket.Charge{{Key: []byte("rate"), Limit: bucket.Limit{Count: 10, Window: time.Minute}, Cost: 1}}
	// 10 per minute over 3 instances: 3 here.
	st := make([]bucket.State, 1)
	for i := 0; i < 3; i++ {
		if d, err := f.Reserve(ctx, now, rate, 0, st); err != nil || !d.Allowed {
			t.Fatalf("unit %d: %+v, %v", i, d, err)
		}
	}
	d, err := f.Reserve(ctx, now, rate, 0, st)
	if err != nil || d.Allowed || d.Delay != 20*time.Second {
		t.Fatalf("fourth unit: %+v, %v; want refused for 20s (3 per minute)", d, err)
	}
	// A burst of 5 over 3 is 1; a concurrency limit of 2 over 3 is 1.
	cs := failCharges()
	cs[0].Key = []byte("burst")
	if d, err := f.Reserve(ctx, now, cs, 0, nil); err != nil || !d.Allowed {
		t.Fatalf("first: %+v, %v", d, err)
	}
	cs[0].Key = []byte("other")
	if d, err := f.Reserve(ctx, now, cs, 0, nil); err != nil || d.Allowed || d.Limiting != 1 {
		t.Fatalf("second: %+v, %v; want refused by the concurrency limit", d, err)
	}
	// A release during the outage goes to the local store.
	if err := f.Adjust(ctx, now, []bucket.Charge{{Key: []byte("conc"), Limit: concLimit, Cost: -1}}); err != nil {
		t.Fatal(err)
	}
	if d, err := f.Reserve(ctx, now, cs, 0, nil); err != nil || !d.Allowed {
		t.Fatalf("after release: %+v, %v", d, err)
	}
	if err := f.Peek(ctx, now, rate, st); err != nil || st[0].Remaining != 0 {
		t.Fatalf("peek: %+v, %v", st, err)
	}
	if local.Len() != 4 || p.calls.Load() != 1 {
		t.Fatalf("local holds %d buckets, primary saw %d calls; want 4 and 1", local.Len(), p.calls.Load())
	}
	if n := f.Sweep(now.Add(time.Hour)); n != 3 {
		t.Fatalf("Sweep dropped %d, want the 3 rate buckets", n)
	}
	// DeletePrefix cleans the local store even while the primary is down.
	if n, err := f.DeletePrefix(ctx, []byte("conc")); n != 1 || !errors.Is(err, bucket.ErrPrimaryDown) {
		t.Fatalf("DeletePrefix while down = %d, %v", n, err)
	}

	// Without a Local, FailLocal makes its own.
	f = bucket.NewFailover(p, bucket.FailoverOptions{Mode: bucket.FailLocal})
	if d, err := f.Reserve(ctx, now, rate, 0, nil); err != nil || !d.Allowed {
		t.Fatalf("default local: %+v, %v", d, err)
	}
}

// TestFailoverTimeout checks that a slow primary costs a call at most about
// the timeout, whether it honors its context or not, and that the charges it
// got are its own.
func TestFailoverTimeout(t *testing.T) {
	const timeout = 20 * time.Millisecond
	for _, b := range []fakeBehavior{fakeBlock, fakeHang} {
		p := newFakePrimary()
		p.set(b)
		var ev events
		f := bucket.NewFailover(p, ev.options(bucket.FailoverOptions{Mode: bucket.FailOpen, Timeout: timeout, Backoff: time.Millisecond}))
		key := []byte("mine")
		t.Cleanup(func() {
			select {
			case <-p.release:
			default:
				close(p.release)
			}
		})
		for i := 0; i < 10; i++ {
			copy(key, "mine")
			var d bucket.Decision
			var err error
			done := make(chan struct{})
			go func() {
				defer close(done)
				d, err = f.Reserve(context.Background(), time.Now(), []bucket.Charge{{Key: key, Limit: rateLimit, Cost: 1}}, 0, nil)
			}()
			select {
			case <-done:
			case <-time.After(10 * timeout):
				t.Fatalf("behavior %d: call %d took over %s, timeout %s", b, i, 10*timeout, timeout)
			}
			if err != nil || !d.Allowed {
				t.Fatalf("behavior %d: %+v, %v", b, d, err)
			}
			// The caller reuses its key buffer at once.
			copy(key, "XXXX")
			time.Sleep(2 * time.Millisecond) // past the back-off: the next call probes
		}
		if ev.outages.Load() != 1 || !f.Down() {
			t.Fatalf("behavior %d: outages %d, down %v", b, ev.outages.Load(), f.Down())
		}
		if p.calls.Load() < 2 {
			t.Fatalf("behavior %d: %d primary calls, want probes after the back-off", b, p.calls.Load())
		}
		close(p.release)
		eventually(t, "abandoned calls end", func() bool { return p.inflight.Load() == 0 })
		p.mu.Lock()
		if p.lastKey != "mine" {
			t.Errorf("behavior %d: the primary read key %q after the caller reused its buffer", b, p.lastKey)
		}
		p.mu.Unlock()
	}
}

// TestFailoverOneProbe checks that during an outage one call at a time
// probes the primary while the others use the fail mode without waiting,
// and that the probe's success ends the outage.
func TestFailoverOneProbe(t *testing.T) {
	p := newFakePrimary()
	p.set(fakeFail)
	var ev events
	f := bucket.NewFailover(p, ev.options(bucket.FailoverOptions{Mode: bucket.FailClosed, Timeout: time.Minute, Backoff: time.Nanosecond}))
	ctx, now := context.Background(), time.Now()
	if _, err := f.Reserve(ctx, now, failCharges(), 0, nil); err == nil {
		t.Fatal("no error")
	}
	// The primary now hangs; the back-off is over at once.
	p.set(fakeHang)
	p.entered = make(chan struct{}, 100)
	var wg sync.WaitGroup
	var refused atomic.Int64
	results := make(chan error, 20)
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := f.Reserve(ctx, now, failCharges(), 0, nil)
			results <- err
		}()
	}
	// 19 calls come back at once, refused; the probe hangs.
	for i := 0; i < 19; i++ {
		select {
		case err := <-results:
			if !errors.Is(err, bucket.ErrPrimaryDown) {
				t.Fatalf("call during the probe: %v", err)
			}
			refused.Add(1)
		case <-time.After(10 * time.Second):
			t.Fatalf("only %d calls returned while the probe ran", refused.Load())
		}
	}
	<-p.entered
	if p.calls.Load() != 2 || p.inflight.Load() != 1 {
		t.Fatalf("primary calls %d, in flight %d; want one probe", p.calls.Load(), p.inflight.Load())
	}
	// The hung probe fails when released: still down, no second outage.
	// The next probe (the back-off is a nanosecond) finds the primary
	// answering.
	p.entered = nil
	p.set(fakeOK)
	close(p.release)
	wg.Wait()
	if !errors.Is(<-results, errFake) {
		t.Fatal("the probe did not return the primary's error")
	}
	eventually(t, "recovery", func() bool {
		f.Reserve(ctx, now, failCharges(), 0, nil)
		return !f.Down()
	})
	if ev.outages.Load() != 1 || ev.recoveries.Load() != 1 {
		t.Fatalf("outages %d, recoveries %d; want 1 and 1", ev.outages.Load(), ev.recoveries.Load())
	}
}

// TestFailoverLateAnswer checks that only a probe ends an outage: a call
// that started before the outage and answers late does not.
func TestFailoverLateAnswer(t *testing.T) {
	p := newFakePrimary()
	p.set(fakeSlowOK)
	p.entered = make(chan struct{}, 2)
	var ev events
	f := bucket.NewFailover(p, ev.options(bucket.FailoverOptions{Mode: bucket.FailOpen, Timeout: time.Minute, Backoff: time.Hour}))
	ctx, now := context.Background(), time.Now()
	late := make(chan error, 1)
	go func() {
		_, err := f.Reserve(ctx, now, failCharges(), 0, nil)
		late <- err
	}()
	<-p.entered // the slow call is with the primary
	p.set(fakeFail)
	f.Reserve(ctx, now, failCharges(), 0, nil)
	<-p.entered
	if !f.Down() || ev.outages.Load() != 1 {
		t.Fatalf("down %v, outages %d; want an outage", f.Down(), ev.outages.Load())
	}
	close(p.release)
	if err := <-late; err != nil {
		t.Fatalf("the slow call: %v", err)
	}
	if !f.Down() || ev.recoveries.Load() != 0 {
		t.Fatalf("a late answer ended the outage: down %v, recoveries %d", f.Down(), ev.recoveries.Load())
	}
}

// TestFailoverNotifiesOnce races many failing calls, over several outages:
// each outage reports once, and each recovery once.
func TestFailoverNotifiesOnce(t *testing.T) {
	p := newFakePrimary()
	var ev events
	f := bucket.NewFailover(p, ev.options(bucket.FailoverOptions{Mode: bucket.FailOpen, Timeout: 10 * time.Second, Backoff: time.Nanosecond}))
	ctx, now := context.Background(), time.Now()
	const callers = 64
	for cycle := 1; cycle <= 5; cycle++ {
		// Every caller reaches the primary before any of them fails.
		p.gate = make(chan struct{})
		p.entered = make(chan struct{}, callers)
		p.set(fakeFail)
		var wg sync.WaitGroup
		for i := 0; i < callers; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if d, err := f.Reserve(ctx, now, failCharges(), 0, nil); err != nil || !d.Allowed {
					t.Errorf("fail open: %+v, %v", d, err)
				}
			}()
		}
		for i := 0; i < callers; i++ {
			<-p.entered
		}
		p.entered = nil
		close(p.gate)
		wg.Wait()
		if ev.outages.Load() != int64(cycle) || !f.Down() {
			t.Fatalf("cycle %d: outages %d, down %v", cycle, ev.outages.Load(), f.Down())
		}
		// Recovery, raced too.
		p.gate = nil
		p.set(fakeOK)
		for i := 0; i < callers; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for f.Down() {
					f.Adjust(ctx, now, nil)
				}
			}()
		}
		wg.Wait()
		if ev.recoveries.Load() != int64(cycle) {
			t.Fatalf("cycle %d: recoveries %d", cycle, ev.recoveries.Load())
		}
	}
}

// TestFailoverCallerGone checks that a call whose own context ends is not
// taken for an outage.
func TestFailoverCallerGone(t *testing.T) {
	p := newFakePrimary()
	p.set(fakeBlock)
	var ev events
	f := bucket.NewFailover(p, ev.options(bucket.FailoverOptions{Mode: bucket.FailOpen, Timeout: time.Minute}))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	d, err := f.Reserve(ctx, time.Now(), failCharges(), 0, nil)
	if !errors.Is(err, context.DeadlineExceeded) || d.Allowed {
		t.Fatalf("%+v, %v; want the caller's deadline", d, err)
	}
	if f.Down() || ev.outages.Load() != 0 {
		t.Fatalf("down %v, outages %d; want no outage", f.Down(), ev.outages.Load())
	}
}

// TestFailoverRedis kills and restarts a real redis-server under a Failover
// in each mode: calls stay within the timeout's reach during the outage,
// behave as the mode says, and the store recovers on the same port.
func TestFailoverRedis(t *testing.T) {
	for _, mode := range []bucket.FailMode{bucket.FailOpen, bucket.FailClosed, bucket.FailLocal} {
		t.Run(mode.String(), func(t *testing.T) {
			srv := redistest.Start(t)
			c := srv.Client(t)
			rs := bucket.NewRedisStore(c, bucket.RedisOptions{Prefix: "fo"})
			const timeout = 50 * time.Millisecond
			var ev events
			f := bucket.NewFailover(rs, ev.options(bucket.FailoverOptions{
				Mode: mode, Timeout: timeout, Backoff: 100 * time.Millisecond, Instances: 2,
			}))
			ctx := context.Background()
			l := bucket.Limit{Count: 4, Window: time.Minute}
			cs := []bucket.Charge{{Key: []byte("k"), Limit: l, Cost: 1}}
			bounded := func(what string, fn func()) {
				t.Helper()
				start := time.Now()
				fn()
				if el := time.Since(start); el > 10*timeout {
					t.Fatalf("%s took %s, timeout %s", what, el, timeout)
				}
			}
			if d, err := f.Reserve(ctx, time.Now(), cs, 0, nil); err != nil || !d.Allowed {
				t.Fatalf("healthy: %+v, %v", d, err)
			}
			if n, err := c.Exists(ctx, "{fo}k").Result(); err != nil || n != 1 {
				t.Fatalf("healthy: the bucket is not in redis (%d, %v)", n, err)
			}

			srv.Stop()
			for i := 0; i < 6; i++ {
				var d bucket.Decision
				var err error
				bounded("reserve during the outage", func() { d, err = f.Reserve(ctx, time.Now(), cs, 0, nil) })
				switch mode {
				case bucket.FailOpen:
					if err != nil || !d.Allowed {
						t.Fatalf("call %d: %+v, %v; want admitted", i, d, err)
					}
				case bucket.FailClosed:
					if !errors.Is(err, bucket.ErrPrimaryDown) || d.Allowed {
						t.Fatalf("call %d: %+v, %v; want refused with an error", i, d, err)
					}
				case bucket.FailLocal:
					// 4 per minute over 2 instances: 2 here.
					if err != nil || d.Allowed != (i < 2) {
						t.Fatalf("call %d: %+v, %v; want the first 2 admitted", i, d, err)
					}
				}
			}
			refund := []bucket.Charge{{Key: []byte("k"), Limit: l, Cost: -1}}
			for i := 0; i < 3; i++ {
				bounded("adjust during the outage", func() { f.Adjust(ctx, time.Now(), refund) })
				bounded("peek during the outage", func() { f.Peek(ctx, time.Now(), cs, make([]bucket.State, 1)) })
			}
			if !f.Down() || ev.outages.Load() != 1 || ev.recoveries.Load() != 0 {
				t.Fatalf("down %v, outages %d, recoveries %d", f.Down(), ev.outages.Load(), ev.recoveries.Load())
			}

			srv.Restart()
			eventually(t, "recovery", func() bool {
				bounded("reserve during recovery", func() { f.Reserve(ctx, time.Now(), cs, 0, nil) })
				return ev.recoveries.Load() == 1
			})
			if f.Down() || ev.outages.Load() != 1 {
				t.Fatalf("after recovery: down %v, outages %d", f.Down(), ev.outages.Load())
			}
			// Back on Redis (which restarted empty).
			st := make([]bucket.State, 1)
			if d, err := f.Reserve(ctx, time.Now(), cs, 0, st); err != nil || !d.Allowed {
				t.Fatalf("after recovery: %+v, %v", d, err)
			}
			if n, err := c.Exists(ctx, "{fo}k").Result(); err != nil || n != 1 || st[0].Remaining > 3 {
				t.Fatalf("after recovery: the bucket is not in redis (%d, %v, %+v)", n, err, st[0])
			}
		})
	}
}

// TestFailoverScanAndDelete checks the admin view of a Failover: the
// primary's buckets while it answers, and the fail mode's during an outage.
func TestFailoverScanAndDelete(t *testing.T) {
	ctx, now := context.Background(), time.Now()
	rate := bucket.Limit{Count: 10, Window: time.Minute}
	charge := func(key string) []bucket.Charge {
		return []bucket.Charge{{Key: []byte(key), Limit: rate, Cost: 1}}
	}
	keys := func(f *bucket.Failover) []string {
		var out []string
		err := f.Scan(ctx, now, []byte("k"), func(k []byte, _ bucket.Level) bool {
			out = append(out, string(k))
			return true
		})
		if err != nil {
			out = append(out, "error: "+err.Error())
		}
		return out
	}
	for _, c := range []struct {
		mode bucket.FailMode
		down string // what Scan reports during the outage
	}{
		{bucket.FailLocal, "k-local"},
		{bucket.FailOpen, ""},
		{bucket.FailClosed, "error: " + bucket.ErrPrimaryDown.Error()},
	} {
		t.Run(c.mode.String(), func(t *testing.T) {
			p := newFakePrimary()
			f := bucket.NewFailover(p, bucket.FailoverOptions{Mode: c.mode, Instances: 2, Backoff: time.Hour})
			if _, err := f.Reserve(ctx, now, charge("k-primary"), 0, nil); err != nil {
				t.Fatal(err)
			}
			if got := keys(f); len(got) != 1 || got[0] != "k-primary" {
				t.Fatalf("primary up: Scan reported %q, want the primary's bucket", got)
			}
			if s, local, err := f.ScanSource(); s == nil || local || err != nil {
				t.Fatalf("primary up: ScanSource = %v, %v, %v; want the primary", s, local, err)
			}
			p.set(fakeFail)
			f.Reserve(ctx, now, charge("k-local"), 0, nil) // starts the outage
			if got := strings.Join(keys(f), ","); !strings.HasPrefix(got, c.down) || (c.down == "") != (got == "") {
				t.Fatalf("primary down: Scan reported %q, want %q", got, c.down)
			}
			s, local, err := f.ScanSource()
			if local != (c.mode == bucket.FailLocal) || (s != nil) != (c.mode == bucket.FailLocal) || (err != nil) != (c.mode == bucket.FailClosed) {
				t.Fatalf("ScanSource = %v, %v, %v during an outage in mode %s", s, local, err, c.mode)
			}
			n, err := f.Delete(ctx, [][]byte{[]byte("k-local"), []byte("k-primary")})
			if want := map[bool]int{true: 1, false: 0}[c.mode == bucket.FailLocal]; n != want || !errors.Is(err, bucket.ErrPrimaryDown) {
				t.Fatalf("Delete while down = %d, %v; want %d and ErrPrimaryDown", n, err, want)
			}
			p.set(fakeOK)
			if n, err := p.inner.Delete(ctx, [][]byte{[]byte("k-primary")}); n != 1 || err != nil {
				t.Fatalf("the primary lost its bucket during the outage: %d, %v", n, err)
			}
		})
	}
	// The local store's limit is the configured one over the instances.
	f := bucket.NewFailover(newFakePrimary(), bucket.FailoverOptions{Mode: bucket.FailLocal, Instances: 3})
	if got := f.LocalLimit(bucket.Limit{Count: 10, Window: time.Minute, Burst: 5}); got != (bucket.Limit{Count: 3, Window: time.Minute, Burst: 1}) {
		t.Fatalf("LocalLimit = %+v", got)
	}
}
