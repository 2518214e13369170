package adaptive

import (
	"testing"
	"time"
)

// TestLearnerSnapshot follows a learner through each source of its request
// rate, and checks that a snapshot says where the rate came from and leaves
// the learner as it was.
func TestLearnerSnapshot(t *testing.T) {
	l := NewLearner()
	now := simEpoch
	if s := l.Snapshot(); s.RequestsSource != "" || s.Requests.Count != 0 || s.Concurrent != 0 {
		t.Fatalf("a new learner's snapshot: %+v, want nothing known", s)
	}
	refuse := func(wait time.Duration) {
		o := bareObs(429)
		o.RetryAfter = wait
		l.Observe(o, now)
	}
	for range 3 {
		l.Observe(bareObs(200), now)
	}
	refuse(100 * time.Millisecond)
	s := l.Snapshot()
	if s.RequestsSource != SourceRetryAfter || s.Requests.Count == 0 || s.MeasuredPerSecond != 0 {
		t.Fatalf("after one refusal: %+v, want a guess from its Retry-After", s)
	}
	if want := now.Add(100 * time.Millisecond); !s.BlockedUntil.Equal(want) || !s.LastRefusal.Equal(now) {
		t.Fatalf("after one refusal: blocked until %v, last refusal %v; want %v and %v", s.BlockedUntil, s.LastRefusal, want, now)
	}
	if s.Accepted != 3 {
		t.Fatalf("accepted %d, want 3", s.Accepted)
	}
	// Five successes in the second to the next refusal: 5 per second.
	for range 5 {
		now = now.Add(150 * time.Millisecond)
		l.Observe(bareObs(200), now)
	}
	now = simEpoch.Add(time.Second)
	refuse(100 * time.Millisecond)
	s = l.Snapshot()
	if s.RequestsSource != SourceMeasured || s.MeasuredPerSecond != 5 || !s.MeasuredAt.Equal(now) {
		t.Fatalf("after two refusals a second apart: %+v, want 5/s measured at %v", s, now)
	}
	if again := l.Snapshot(); again != s {
		t.Fatalf("a second snapshot differs: %+v, then %+v", s, again)
	}

	// Three in flight, and the upstream refuses one as busy: a cap of 2.
	var sent []Attempt
	for range 3 {
		sent = append(sent, l.Send(now))
	}
	if s := l.Snapshot(); s.InFlight != 3 {
		t.Fatalf("in flight %d, want 3", s.InFlight)
	}
	l.Answer(sent[0], bareObs(503), now)
	if s := l.Snapshot(); s.Concurrent != 2 || s.InFlight != 2 {
		t.Fatalf("after a 503 with 3 in flight: cap %d, in flight %d; want 2 and 2", s.Concurrent, s.InFlight)
	}

	// An upstream that advertises its limit is believed over any measure.
	o := bareObs(200)
	o.Requests = Quota{Limit: 600, Remaining: 500, Reset: time.Second}
	o.Tokens = Quota{Limit: 90000, Remaining: 90000, Reset: 0}
	l.Observe(o, now)
	if s := l.Snapshot(); s.RequestsSource != SourceHeaders || s.Requests.Count != 600 || s.Tokens.Count != 90000 {
		t.Fatalf("after advertised limits: %+v, want 600 requests and 90000 tokens a minute from headers", s)
	}
}
