package bucket

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// redisBatcher sends concurrent script runs to Redis together, as one
// pipeline, when a call is already on its way: automatic pipelining.
//
// Why: under load most of a call's cost is not the script but moving it.
// Each command sent alone costs Redis a read and a write system call and an
// event-loop turn, and costs the client a write, a read and a goroutine
// wake-up; measured on loopback under load, that is about as much CPU on
// each side as the script itself. A pipeline of n commands pays those once.
// (go-redis v9.23 has an AutoPipeline of its own, marked experimental and
// subject to change; this is the small part of it the store needs, with
// the script's NOSCRIPT fallback.)
//
// How: at most maxFlights calls or pipelines are in flight. A call that
// finds fewer goes at once, alone, on its own goroutine, with no added
// latency: a lightly loaded store sends every call immediately. Otherwise it
// joins the queue, and when a flight lands, the whole queue (up to maxBatch)
// takes off as one pipeline, sent by a goroutine of its own. Every queued
// call waits for its reply or its own deadline, whichever comes first, so a
// batch never makes a call wait past its deadline; a call that gives up
// after its batch was sent still runs in Redis, as a lone call's would
// after its time-out.
type redisBatcher struct {
	client     redis.UniversalClient
	maxFlights int
	maxBatch   int

	mu      sync.Mutex
	flights int
	queue   []*redisRun

	// lastPipeline is when a pipeline was last sent, in Unix ns of the
	// machine's clock (a keep-alive, not a limiter's time).
	lastPipeline atomic.Int64
}

// Defaults for the batcher. One flight: while a call (or a pipeline) is on
// its way, everything else gathers into the next pipeline. bench/load.sh
// (wrk at 32 connections, three buckets a request, Redis on the same two
// cores) measured Caddy on Redis at 0.85 of Caddy on the memory store with
// one flight, and 0.77-0.80 with two or four: Redis is single-threaded, so
// more flights only split the same work into smaller, costlier batches
// (go-redis's AutoPipeline also defaults to one batch at a time).
//
// The cost: a queued call waits for the flight out, then for its own, so
// when Redis takes more than half the store's timeout to answer, queued
// calls time out (and Failover sees an outage) before lone ones would. The
// batch bound is far above the concurrency of one Caddy, so in practice a
// call waits for at most one flight before its own.
const (
	redisMaxFlights = 1
	redisMaxBatch   = 1024
)

// redisPipelineRefresh is how long the batcher may leave go-redis's
// pipeline pool unused before it sends a lone call as a pipeline of one.
// Batches go through that pool, which keeps no idle connection for long
// (its MinIdleConns is 0, and ConnMaxIdleTime, 30 minutes by default,
// closes one left idle), while they form only when calls overlap. Without
// the refresh, the first batch after a quiet half hour would dial, and do
// its TLS handshake and AUTH, inside its callers' timeouts, and a slow dial
// would fail the batch and start an outage. A call sent as a pipeline costs
// what it costs sent alone: one round trip.
const redisPipelineRefresh = 5 * time.Minute

// redisRun is one queued script run.
type redisRun struct {
	ctx  context.Context
	keys []string
	args []any
	// res and err are the reply, valid once done is closed.
	res  any
	err  error
	done chan struct{}
}

func newRedisBatcher(client redis.UniversalClient) *redisBatcher {
	b := &redisBatcher{client: client, maxFlights: redisMaxFlights, maxBatch: redisMaxBatch}
	// A new store's pipeline pool is warmed by RedisStore.Warm, if at all:
	// the refresh starts counting now.
	b.lastPipeline.Store(time.Now().UnixNano())
	return b
}

// run runs the script with keys and args and returns its reply.
func (b *redisBatcher) run(ctx context.Context, keys []string, args []any) (any, error) {
	b.mu.Lock()
	if b.flights < b.maxFlights {
		b.flights++
		b.mu.Unlock()
		var res any
		var err error
		if time.Now().UnixNano()-b.lastPipeline.Load() > int64(redisPipelineRefresh) {
			// Keep the pipeline pool's connection in use (see
			// redisPipelineRefresh).
			r := &redisRun{ctx: ctx, keys: keys, args: args}
			b.send(ctx, []*redisRun{r})
			res, err = r.res, r.err
		} else {
			res, err = redisScript.Run(ctx, b.client, keys, args...).Result()
		}
		b.land()
		return res, err
	}
	r := &redisRun{ctx: ctx, keys: keys, args: args, done: make(chan struct{})}
	b.queue = append(b.queue, r)
	b.mu.Unlock()
	select {
	case <-r.done:
		return r.res, r.err
	case <-ctx.Done():
		b.withdraw(r)
		return nil, ctx.Err()
	}
}

// withdraw takes a run whose caller gave up out of the queue, if it is
// still there (otherwise it is in a pipeline already).
func (b *redisBatcher) withdraw(r *redisRun) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for i, q := range b.queue {
		if q == r {
			n := copy(b.queue[i:], b.queue[i+1:])
			b.queue[i+n] = nil // no stale pointer keeps a request alive
			b.queue = b.queue[:i+n]
			return
		}
	}
}

// land ends a flight: if calls are queued, they take off together.
func (b *redisBatcher) land() {
	b.mu.Lock()
	if len(b.queue) == 0 {
		b.flights--
		b.mu.Unlock()
		return
	}
	n := min(len(b.queue), b.maxBatch)
	batch := make([]*redisRun, n)
	copy(batch, b.queue)
	rest := copy(b.queue, b.queue[n:])
	clear(b.queue[rest:])
	b.queue = b.queue[:rest]
	if rest == 0 {
		b.queue = nil // let a burst's backing array go
	}
	b.mu.Unlock()
	go b.flush(batch)
}

// flush sends a batch as one pipeline, hands each run its reply, and lands.
func (b *redisBatcher) flush(batch []*redisRun) {
	defer b.land()
	// The pipeline lives as long as its most patient run; each run stops
	// waiting at its own deadline.
	ctx, cancel := batchContext(batch)
	defer cancel()
	b.send(ctx, batch)
	for _, r := range batch {
		close(r.done)
	}
}

// send sends runs as one pipeline and sets each one's reply.
func (b *redisBatcher) send(ctx context.Context, runs []*redisRun) {
	b.lastPipeline.Store(time.Now().UnixNano())
	cmds := b.exec(ctx, runs, false)
	var retry []*redisRun
	for i, r := range runs {
		r.res, r.err = cmds[i].Result()
		if redis.HasErrorPrefix(r.err, "NOSCRIPT") {
			// A server that lost its scripts (restarted, flushed): send
			// the body, which loads it again.
			retry = append(retry, r)
		}
	}
	if len(retry) > 0 {
		cmds = b.exec(ctx, retry, true)
		for i, r := range retry {
			r.res, r.err = cmds[i].Result()
		}
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
// runs, or never if one of them has none (the client's read and write
// timeouts still bound it). It is not cancelled with any one run: a client
// that leaves must not fail the others' commands.
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
