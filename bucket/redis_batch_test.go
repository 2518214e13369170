package bucket

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/llmratelimit/caddy-llm-ratelimit/internal/redistest"
)

// batchStore is a store whose batcher lets one call fly at a time, so that
// concurrent calls are batched.
func batchStore(t *testing.T, c redis.UniversalClient, prefix string) *RedisStore {
	t.Helper()
	s := NewRedisStore(c, RedisOptions{Prefix: prefix, CallerTime: true})
	s.batch.maxFlights = 1
	return s
}

// idle reports whether the batcher has nothing in flight and nothing queued.
func (b *redisBatcher) idle() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.flights == 0 && len(b.queue) == 0
}

// Every caller gets its own reply from a batch: each of many concurrent
// callers has a bucket of one request an hour, so its first call is admitted
// with nothing left and its second refused. A reply handed to the wrong
// caller shows as a wrong decision or a wrong remaining count.
func TestRedisBatchRepliesReachTheirCallers(t *testing.T) {
	srv := redistest.Start(t)
	c := redis.NewClient(&redis.Options{Addr: srv.Addr(), ContextTimeoutEnabled: true, PoolSize: 8})
	t.Cleanup(func() { c.Close() })
	s := batchStore(t, c, "batch-replies")
	now := time.Unix(1_800_000_000, 0)
	var batched countingHook
	c.AddHook(&batched)

	const callers = 64
	var wg sync.WaitGroup
	errs := make(chan error, 4*callers)
	for i := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l := Limit{Count: int64(i + 2), Window: time.Hour, Burst: 1}
			cs := []Charge{{Key: []byte(fmt.Sprintf("caller-%d", i)), Limit: l, Cost: 1}}
			st := make([]State, 1)
			for call := range 2 {
				d, err := s.Reserve(context.Background(), now, cs, 0, st)
				if err != nil {
					errs <- err
					return
				}
				if want := call == 0; d.Allowed != want {
					errs <- fmt.Errorf("caller %d call %d: allowed %v", i, call, d.Allowed)
				}
				// Each caller's limit drains at its own pace, so the reset
				// tells whose bucket the reply describes.
				if want := time.Duration(l.span(1)); st[0].Remaining != 0 || st[0].ResetAfter != want {
					errs <- fmt.Errorf("caller %d call %d: state %+v, want remaining 0, reset %s", i, call, st[0], want)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if !s.batch.idle() {
		t.Error("the batcher is not idle after every call returned")
	}
	if batched.pipelines() == 0 {
		t.Error("no call was batched: the test did not test batching")
	}
}

// A server that lost its scripts (restarted, or SCRIPT FLUSH) answers a
// batch's EVALSHAs with NOSCRIPT; the batch is sent again with the script's
// body and every call succeeds. (A lone call reloads the script through
// redis.Script.Run; a batch must do it itself, so the test hands a batch
// to flush directly, as land does.)
func TestRedisBatchReloadsTheScript(t *testing.T) {
	srv := redistest.Start(t)
	c := redis.NewClient(&redis.Options{Addr: srv.Addr(), ContextTimeoutEnabled: true, PoolSize: 8})
	t.Cleanup(func() { c.Close() })
	s := batchStore(t, c, "batch-noscript")
	var batched countingHook
	c.AddHook(&batched)
	now := time.Unix(1_800_000_000, 0)
	l := Limit{Count: 1000, Window: time.Minute}
	if err := c.ScriptFlush(context.Background()).Err(); err != nil {
		t.Fatal(err)
	}
	runs := make([]*redisRun, 8)
	for i := range runs {
		call := s.build(redisOpReserve, now, []Charge{{Key: []byte(fmt.Sprint("k", i)), Limit: l, Cost: 1}}, 0)
		runs[i] = &redisRun{ctx: context.Background(), keys: call.keys, args: call.args, done: make(chan struct{})}
	}
	b := s.batch
	b.flights = 1 // as when land hands a batch to flush
	b.flush(runs)
	for i, r := range runs {
		if r.err != nil {
			t.Errorf("run %d: %v", i, r.err)
		} else if arr, _ := r.res.([]any); len(arr) != 4 || arr[0] != int64(1) {
			t.Errorf("run %d: reply %#v, want an admission", i, r.res)
		}
	}
	if batched.pipelines() == 0 {
		t.Error("no pipeline was sent: the test did not test batching")
	}
	if !b.idle() {
		t.Error("the batcher is not idle after the batch")
	}
}

// A Redis that stops answering costs each waiting call at most its own
// deadline, queued or in a pipeline; afterwards the batcher is idle and
// serves calls again.
func TestRedisBatchWaitersKeepTheirDeadlines(t *testing.T) {
	srv := redistest.Start(t)
	c := redis.NewClient(&redis.Options{Addr: srv.Addr(), ContextTimeoutEnabled: true, PoolSize: 8})
	t.Cleanup(func() { c.Close() })
	s := batchStore(t, c, "batch-deadline")
	s.batch.maxFlights = 2
	l := Limit{Count: 1000, Window: time.Minute}
	if err := s.Warm(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := srv.Client(t).ClientPause(context.Background(), 1500*time.Millisecond).Err(); err != nil {
		t.Fatal(err)
	}
	const timeout = 100 * time.Millisecond
	var wg sync.WaitGroup
	// Patient calls go first, so that the impatient ones share flights
	// and batches with them: a batch lives as long as its most patient
	// call, and an impatient one must not wait for that.
	for i := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			cs := []Charge{{Key: []byte(fmt.Sprint("patient", i)), Limit: l, Cost: 1}}
			if _, err := s.Reserve(ctx, time.Now(), cs, 0, nil); err != nil {
				t.Errorf("patient call %d: %v", i, err)
			}
		}()
	}
	time.Sleep(20 * time.Millisecond) // let them take off (the test holds either way)
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			start := time.Now()
			cs := []Charge{{Key: []byte(fmt.Sprint("k", i)), Limit: l, Cost: 1}}
			_, err := s.Reserve(ctx, time.Now(), cs, 0, nil)
			if took := time.Since(start); took > timeout+200*time.Millisecond {
				t.Errorf("call %d took %s with a %s deadline", i, took, timeout)
			}
			if err == nil || !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) && !isTimeout(err) {
				t.Errorf("call %d during the pause: err %v, want a deadline error", i, err)
			}
		}()
	}
	wg.Wait()
	// The pause ends; the calls already sent are answered, the flights
	// land, and the store serves again.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for !s.batch.idle() {
		if ctx.Err() != nil {
			t.Fatal("the batcher never became idle after the pause")
		}
		time.Sleep(10 * time.Millisecond)
	}
	cs := []Charge{{Key: []byte("after"), Limit: l, Cost: 1}}
	if d, err := s.Reserve(ctx, time.Now(), cs, 0, nil); err != nil || !d.Allowed {
		t.Fatalf("after the pause: %+v, %v", d, err)
	}
}

func isTimeout(err error) bool {
	var te interface{ Timeout() bool }
	return errors.As(err, &te) && te.Timeout()
}

// A lone call after a quiet spell of the pipeline pool goes as a pipeline
// of one, with its own reply, and the next lone call goes alone again: the
// pipeline pool's connection stays in use (see redisPipelineRefresh).
func TestRedisBatchKeepsThePipelinePoolInUse(t *testing.T) {
	srv := redistest.Start(t)
	c := redis.NewClient(&redis.Options{Addr: srv.Addr(), ContextTimeoutEnabled: true})
	t.Cleanup(func() { c.Close() })
	s := batchStore(t, c, "batch-refresh")
	// Connections in both pools and the script loaded, so that the count
	// below is of calls, not of go-redis's connection set-up.
	if err := s.Warm(context.Background()); err != nil {
		t.Fatal(err)
	}
	var batched countingHook
	c.AddHook(&batched)
	now := time.Unix(1_800_000_000, 0)
	cs := []Charge{{Key: []byte("k"), Limit: Limit{Count: 2, Window: time.Hour}, Cost: 1}}
	st := make([]State, 1)

	s.batch.lastPipeline.Store(time.Now().Add(-redisPipelineRefresh - time.Second).UnixNano())
	if d, err := s.Reserve(context.Background(), now, cs, 0, st); err != nil || !d.Allowed || st[0].Remaining != 1 {
		t.Fatalf("first call = %+v, %v, remaining %d; want admitted with 1 left", d, err, st[0].Remaining)
	}
	if batched.pipelines() != 1 {
		t.Fatalf("after a quiet spell: %d pipelines, want the lone call sent as 1", batched.pipelines())
	}
	if d, err := s.Reserve(context.Background(), now, cs, 0, st); err != nil || !d.Allowed || st[0].Remaining != 0 {
		t.Fatalf("second call = %+v, %v, remaining %d; want admitted with 0 left", d, err, st[0].Remaining)
	}
	if batched.pipelines() != 1 {
		t.Fatalf("right after a pipeline: %d pipelines, want the lone call sent alone", batched.pipelines())
	}
}

// countingHook counts the pipelines a client sends.
type countingHook struct {
	mu sync.Mutex
	n  int
}

func (h *countingHook) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (h *countingHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }
func (h *countingHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		h.mu.Lock()
		h.n++
		h.mu.Unlock()
		return next(ctx, cmds)
	}
}

func (h *countingHook) pipelines() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.n
}
