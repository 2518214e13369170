package bucket

import (
	"context"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// redisBatcher sends concurrent script runs to Redis together, as one
// pipeline, when enough are already on their way: automatic pipelining.
//
// Why: under load most of a call's cost is not the script but moving it.
// Each command sent alone costs Redis a read and a write system call and an
// event-loop turn, and costs the client a write, a read and a goroutine
// wake-up; measured on loopback under load, that is about as much CPU on
// each side as the script itself. A pipeline of n commands pays those once.
//
// How: at most maxFlights calls or pipelines are in flight. A call that
// finds fewer goes at once, alone, with no added latency: a lightly loaded
// store sends every call immediately, as before. Otherwise it waits in the queue, and
// the first flight to come back hands the whole queue (up to maxBatch) to
// the oldest waiter, which sends it as one pipeline. So the busier the
// store, the larger the batches, and no goroutine exists only to flush.
//
// A waiter gives up when its context ends, like a lone call, so a batch
// never makes a call wait past its own deadline; its command, if already
// sent, still runs in Redis, exactly as a lone call's would after its
// time-out.
type redisBatcher struct {
	client     redis.UniversalClient
	maxFlights int
	maxBatch   int

	mu      sync.Mutex
	flights int
	queue   []*redisRun
}

// Defaults for the batcher. One flight: while a call (or a pipeline) is on
// its way, everything else gathers into the next pipeline. bench/load.sh
// (wrk at 32 connections, three buckets a request, Redis on the same two
// cores) measured Caddy on Redis at 0.85 of Caddy on the memory store with
// one flight, and 0.77-0.80 with two or four: Redis is single-threaded, so
// more flights only split the same work into smaller, costlier batches. A
// call waits at most one round trip more than alone, and only when another
// is on its way. A batch is bounded so that its reply is read in a few
// network reads.
const (
	redisMaxFlights = 1
	redisMaxBatch   = 64
)

// redisRun is one script run waiting for its turn or its reply.
type redisRun struct {
	ctx  context.Context
	keys []string
	args []any
	// res and err are the reply, valid once done is closed.
	res any
	err error
	// lead is set (before done is closed) when the run is handed the
	// queue to send, rather than its reply.
	lead bool
	done chan struct{}
}

func newRedisBatcher(client redis.UniversalClient) *redisBatcher {
	return &redisBatcher{client: client, maxFlights: redisMaxFlights, maxBatch: redisMaxBatch}
}

// run runs the script with keys and args and returns its reply.
func (b *redisBatcher) run(ctx context.Context, keys []string, args []any) (any, error) {
	b.mu.Lock()
	if b.flights < b.maxFlights {
		b.flights++
		b.mu.Unlock()
		res, err := redisScript.Run(ctx, b.client, keys, args...).Result()
		b.land()
		return res, err
	}
	r := &redisRun{ctx: ctx, keys: keys, args: args, done: make(chan struct{})}
	b.queue = append(b.queue, r)
	b.mu.Unlock()
	select {
	case <-r.done:
		if r.lead {
			b.flush(r)
		}
		return r.res, r.err
	case <-ctx.Done():
		if b.giveUp(r) {
			// It had just been handed the queue: hand it on, unsent.
			b.land()
		}
		return nil, ctx.Err()
	}
}

// giveUp takes a run whose context ended out of the queue. If it is no
// longer queued, it is either in a pipeline already (its command may still
// run in Redis, as a lone call's may after its time-out) or it has just
// been made the leader, which giveUp reports so that the caller hands the
// queue on.
func (b *redisBatcher) giveUp(r *redisRun) (wasLead bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for i, q := range b.queue {
		if q == r {
			b.queue = append(b.queue[:i], b.queue[i+1:]...)
			return false
		}
	}
	return r.lead
}

// land ends a flight: the oldest waiter, if any, takes off with the queue.
func (b *redisBatcher) land() {
	b.mu.Lock()
	if len(b.queue) == 0 {
		b.flights--
		b.mu.Unlock()
		return
	}
	next := b.queue[0]
	b.queue = b.queue[1:]
	next.lead = true
	b.mu.Unlock()
	close(next.done)
}

// flush sends the leader's run and the queued ones as one pipeline, hands
// each its reply, and lands.
func (b *redisBatcher) flush(lead *redisRun) {
	b.mu.Lock()
	n := min(len(b.queue), b.maxBatch-1)
	batch := make([]*redisRun, 0, n+1)
	batch = append(batch, lead)
	batch = append(batch, b.queue[:n]...)
	b.queue = b.queue[n:]
	if len(b.queue) == 0 {
		b.queue = nil // let the backing array go
	}
	b.mu.Unlock()

	if len(batch) == 1 {
		lead.res, lead.err = redisScript.Run(lead.ctx, b.client, lead.keys, lead.args...).Result()
		b.land()
		return
	}
	// The pipeline lives as long as its most patient run: each run still
	// stops waiting at its own deadline.
	ctx, cancel := batchContext(batch)
	defer cancel()
	cmds := b.exec(ctx, batch, false)
	var retry []*redisRun
	for i, r := range batch {
		r.res, r.err = cmds[i].Result()
		if redis.HasErrorPrefix(r.err, "NOSCRIPT") {
			// A server that lost its scripts (restarted, flushed): send
			// the body, which loads it again.
			retry = append(retry, r)
		}
	}
	if len(retry) > 0 {
		again := b.exec(ctx, retry, true)
		for i, r := range retry {
			r.res, r.err = again[i].Result()
		}
	}
	b.land()
	for _, r := range batch[1:] {
		close(r.done)
	}
}

// exec sends runs as one pipeline, by EVALSHA (or EVAL, which also loads
// the script) and returns their commands.
func (b *redisBatcher) exec(ctx context.Context, runs []*redisRun, eval bool) []*redis.Cmd {
	pipe := b.client.Pipeline()
	cmds := make([]*redis.Cmd, len(runs))
	for i, r := range runs {
		if eval {
			cmds[i] = redisScript.Eval(ctx, pipe, r.keys, r.args...)
		} else {
			cmds[i] = redisScript.EvalSha(ctx, pipe, r.keys, r.args...)
		}
	}
	// Each command keeps its own error; Exec's is the first of them.
	_, _ = pipe.Exec(ctx)
	return cmds
}

// batchContext returns a context that ends at the latest deadline of the
// runs, or never if one of them has none. It is not cancelled with any one
// run: a client that leaves must not fail the others' commands.
func batchContext(runs []*redisRun) (context.Context, context.CancelFunc) {
	var latest time.Time
	for _, r := range runs {
		d, ok := r.ctx.Deadline()
		if !ok {
			return context.WithCancel(context.Background())
		}
		if d.After(latest) {
			latest = d
		}
	}
	return context.WithDeadline(context.Background(), latest)
}
