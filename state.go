package llmratelimit

import (
	"context"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/llmratelimit/caddy-llm-ratelimit/bucket"
)

// states holds the limiter state that outlives a configuration. During a
// graceful reload the new configuration is provisioned, and so takes its
// reference, before the old one is cleaned up, so the buckets carry over.
var states = caddy.NewUsagePool()

// stateKey names the in-memory state in the pool. There is one per process:
// zones and rule ids keep handlers apart inside it.
const stateKey = "llm_rate_limit/memory"

// sweepInterval is how often drained buckets are dropped. Dropping a full
// bucket changes no decision, so the interval only trades memory for work.
const sweepInterval = time.Minute

// sharedState is the limiter state shared by every llm_rate_limit handler of
// every loaded configuration.
type sharedState struct {
	store *bucket.MemoryStore
	// queue holds the requests waiting for their turn. Requests that wait
	// across a reload stay in it and are served by the same queue.
	queue *bucket.Queue
	// learners are adaptive mode's, per zone and model.
	learners learners

	mu sync.Mutex
	// refs counts, per rule key prefix, the provisioned handlers whose rules
	// use it. A prefix that drops to zero belongs to a removed rule.
	refs map[string]int

	stop chan struct{}
	done chan struct{}
}

func acquireState() (*sharedState, error) {
	v, _, err := states.LoadOrNew(stateKey, func() (caddy.Destructor, error) {
		store := bucket.NewMemoryStore()
		s := &sharedState{
			store:    store,
			queue:    bucket.NewQueue(store, bucket.SystemClock{}),
			learners: learners{m: make(map[learnerKey]*learned)},
			refs:     make(map[string]int),
			stop:     make(chan struct{}),
			done:     make(chan struct{}),
		}
		go s.sweep()
		return s, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*sharedState), nil
}

func releaseState() error {
	_, err := states.Delete(stateKey)
	return err
}

// Destruct stops the sweeper once no configuration uses the state.
func (s *sharedState) Destruct() error {
	close(s.stop)
	<-s.done
	return nil
}

func (s *sharedState) sweep() {
	defer close(s.done)
	t := time.NewTicker(sweepInterval)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case now := <-t.C:
			s.store.Sweep(now)
		}
	}
}

// retain records that a handler uses these rule prefixes.
func (s *sharedState) retain(prefixes []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range prefixes {
		s.refs[p]++
	}
}

// release records that a handler no longer uses these rule prefixes, and
// frees the buckets of those no handler uses any more.
func (s *sharedState) release(prefixes []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range prefixes {
		s.refs[p]--
		if s.refs[p] > 0 {
			continue
		}
		delete(s.refs, p)
		s.store.DeletePrefix(context.Background(), []byte(p))
	}
}
