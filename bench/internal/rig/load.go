package rig

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"runtime"
	"sync"
	"time"
)

// Transport is the load generator's transport to Caddy, keeping up to
// maxConns keep-alive connections.
func Transport(maxConns int) *http.Transport {
	return &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConns:        maxConns,
		MaxIdleConnsPerHost: maxConns,
		IdleConnTimeout:     90 * time.Second,
	}
}

// prompt is what ChatBody asks; its size does not matter to its callers,
// as no rule of theirs limits tokens.
const prompt = "Summarise the plot of Hamlet in three short sentences for a reader in a hurry..."

// ChatBody is an OpenAI chat completion, streamed or not.
func ChatBody(stream bool) []byte {
	b, err := json.Marshal(map[string]any{
		"model":      "gpt-4o-mini",
		"max_tokens": 30,
		"stream":     stream,
		"messages":   []map[string]string{{"role": "user", "content": prompt}},
	})
	if err != nil {
		panic(err)
	}
	return b
}

// NewPost is a POST of body, a JSON OpenAI request, to url, with a
// placeholder API key.
func NewPost(ctx context.Context, url string, body []byte) *http.Request {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		panic(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer sk-bench-not-a-key")
	return req
}

// Do sends req and reads at most 1 MiB of the answer. resp is nil when
// there was no answer; when reading its body failed, err says so and raw
// holds what was read.
func Do(client *http.Client, req *http.Request) (resp *http.Response, raw []byte, err error) {
	resp, err = client.Do(req) // a POST without an idempotency key is never retried by net/http
	if err != nil {
		return nil, nil, err
	}
	raw, err = io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	resp.Body.Close()
	return resp, raw, err
}

// Arrivals is what an open-loop schedule did.
type Arrivals struct {
	Scheduled int           // arrivals the schedule produced
	Dropped   int           // … not sent because the most allowed were in flight
	MaxLag    time.Duration // worst lateness of an arrival loop behind its schedule
}

// Add adds b's arrivals to a's, and keeps the worse lag.
func (a *Arrivals) Add(b Arrivals) {
	a.Scheduled += b.Scheduled
	a.Dropped += b.Dropped
	a.MaxLag = max(a.MaxLag, b.MaxLag)
}

// Poisson is an open-loop schedule: the arrivals of a Poisson process at
// Rate per second from Start until Deadline, drawn from RNG, at most
// MaxInflight of them in flight.
type Poisson struct {
	RNG             *rand.Rand
	Rate            float64
	Start, Deadline time.Time
	MaxInflight     int
}

// Run sends the schedule's arrivals and returns without waiting for them;
// wg tracks them. arrival(i) is called as soon as arrival i's time is
// drawn, before the wait and even if the arrival is then dropped, so that
// what it draws from RNG keeps the schedule the same; the func it returns
// runs on wg, unless MaxInflight are in flight: then the arrival is
// dropped.
func (p Poisson) Run(ctx context.Context, wg *sync.WaitGroup, arrival func(i int) func()) Arrivals {
	// A hard cap on arrivals, far above what a Poisson process at Rate
	// produces before the deadline, so the loop is bounded in count too.
	maxArrivals := int(p.Rate*p.Deadline.Sub(p.Start).Seconds()*2) + 1000
	sem := make(chan struct{}, p.MaxInflight)
	var a Arrivals
	next := p.Start
	for i := range maxArrivals {
		// Exponential gaps make a Poisson process. The schedule is kept in
		// absolute times, so a late wake-up does not shift later arrivals.
		next = next.Add(time.Duration(p.RNG.ExpFloat64() / p.Rate * float64(time.Second)))
		if !next.Before(p.Deadline) {
			break
		}
		send := arrival(i)
		if !SleepUntil(ctx, next) {
			break
		}
		a.MaxLag = max(a.MaxLag, time.Since(next))
		a.Scheduled++
		select {
		case sem <- struct{}{}:
		default:
			a.Dropped++ // open loop: never wait for a slot
			continue
		}
		wg.Go(func() {
			defer func() { <-sem }()
			send()
		})
	}
	return a
}

// ClosedLoop calls call, one call after the other, until deadline: the
// next as soon as the previous one returns true (a 2xx), and no sooner
// than gap after the previous one started otherwise.
func ClosedLoop(ctx context.Context, start, deadline time.Time, gap time.Duration, call func() bool) {
	// Bounded in count too: one call per millisecond on average is far
	// above what a limited upstream serves.
	maxIter := int(deadline.Sub(start)/time.Millisecond) + 1000
	var last time.Time
	var wait time.Duration
	for range maxIter {
		if !SleepUntil(ctx, last.Add(wait)) || !time.Now().Before(deadline) {
			return
		}
		last = time.Now()
		wait = gap
		if call() {
			wait = 0
		}
	}
}

// Drain waits for wg, at most bound, and reports whether everything
// finished within it. Each request has its own timeout, so the bound is
// only reached if something is badly wrong: then cancel aborts the
// stragglers (they count as errors) and Drain waits for them to go. When
// ctx ends first, its end aborts them, and Drain waits likewise.
func Drain(ctx context.Context, cancel context.CancelFunc, wg *sync.WaitGroup, bound time.Duration) bool {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	timer := time.NewTimer(bound)
	defer timer.Stop()
	select {
	case <-done:
		return true
	case <-timer.C:
		cancel()
	case <-ctx.Done():
	}
	<-done
	return false
}

// SettleGoroutines returns the goroutine count once it is back within 2 of
// want, or after 2 s: closed connections' goroutines take a moment to
// return. A count still far above want is a leak.
func SettleGoroutines(want int) int {
	n := runtime.NumGoroutine()
	for i := 0; i < 20 && n > want+2; i++ {
		time.Sleep(100 * time.Millisecond)
		n = runtime.NumGoroutine()
	}
	return n
}
