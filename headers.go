package llmratelimit

import (
	"io"
	"math/bits"
	"net/http"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/llmratelimit/caddy-llm-ratelimit/tokens"
)

// Header names. RateLimit-Policy and RateLimit follow
// draft-ietf-httpapi-ratelimit-headers-10: one list member per policy, named
// by a quoted string, with q (quota) and w (window, seconds) on the policy,
// and r (remaining) and t (seconds until the quota is whole again) on the
// live state. The X-RateLimit-* trio is the de facto form most clients read,
// for the bucket closest to its limit.
const (
	headerPolicy    = "RateLimit-Policy"
	headerRateLimit = "RateLimit"
	headerLimit     = "X-RateLimit-Limit"
	headerRemaining = "X-RateLimit-Remaining"
	headerReset     = "X-RateLimit-Reset"
	// headerQueueWait says how long a request waited in the queue, in
	// milliseconds, and headerQueueDepth how many requests were waiting
	// for the same bucket when it left the queue. Both are on responses to
	// requests that waited, and on the queue's refusals.
	headerQueueWait  = "X-Queue-Wait-Ms"
	headerQueueDepth = "X-Queue-Depth"
)

// ourHeaders are the fields the guard keeps from duplicating an upstream's,
// in canonical form since the guard indexes the header map directly.
var ourHeaders = [...]string{
	http.CanonicalHeaderKey(headerPolicy),
	http.CanonicalHeaderKey(headerRateLimit),
	http.CanonicalHeaderKey(headerLimit),
	http.CanonicalHeaderKey(headerRemaining),
	http.CanonicalHeaderKey(headerReset),
}

// setRateLimitHeaders writes the rate-limit fields for the request's buckets.
func setRateLimitHeaders(h http.Header, now time.Time, x *exchange) {
	if len(x.applied) == 0 {
		return
	}
	policy := make([]byte, 0, 64*len(x.applied))
	state := make([]byte, 0, 48*len(x.applied))
	tightest := -1
	for i, a := range x.applied {
		if a.limit.hidden {
			continue
		}
		st := x.states[i]
		if len(policy) > 0 {
			policy = append(policy, ", "...)
			state = append(state, ", "...)
		}
		policy = append(policy, a.limit.policy...)
		policy = append(policy, ";q="...)
		policy = strconv.AppendInt(policy, a.limit.limit.Count, 10)
		state = append(state, a.limit.policy...)
		state = append(state, ";r="...)
		state = strconv.AppendInt(state, st.Remaining, 10)
		// A concurrency limit has no window and no reset time: its quota
		// comes back when a request in flight ends.
		if a.limit.windowSeconds > 0 {
			policy = append(policy, ";w="...)
			policy = strconv.AppendInt(policy, a.limit.windowSeconds, 10)
			state = append(state, ";t="...)
			state = strconv.AppendInt(state, ceilSeconds(st.ResetAfter), 10)
		}

		// The tightest bucket has the smallest share of its capacity left:
		// compare remaining/capacity without dividing.
		if tightest < 0 {
			tightest = i
			continue
		}
		t := x.states[tightest]
		if lessProduct(st.Remaining, x.applied[tightest].limit.limit.Capacity(), t.Remaining, a.limit.limit.Capacity()) {
			tightest = i
		}
	}
	if tightest < 0 {
		return
	}
	// Canonical keys, assigned directly: Header.Set would canonicalize
	// every name on every request.
	st, l := x.states[tightest], x.applied[tightest].limit
	h[ourHeaders[0]] = []string{string(policy)}
	h[ourHeaders[1]] = []string{string(state)}
	h[ourHeaders[2]] = []string{strconv.FormatInt(l.limit.Count, 10)}
	h[ourHeaders[3]] = []string{strconv.FormatInt(st.Remaining, 10)}
	h[ourHeaders[4]] = []string{strconv.FormatInt(now.Add(st.ResetAfter+time.Second-1).Unix(), 10)}
}

// lessProduct reports a×b < c×d for non-negative values, in 128 bits: near
// the 10¹² limits the products overflow 64.
func lessProduct(a, b, c, d int64) bool {
	h1, l1 := bits.Mul64(uint64(max(a, 0)), uint64(max(b, 0)))
	h2, l2 := bits.Mul64(uint64(max(c, 0)), uint64(max(d, 0)))
	return h1 < h2 || h1 == h2 && l1 < l2
}

// ceilSeconds rounds a duration up to whole seconds.
func ceilSeconds(d time.Duration) int64 {
	if d <= 0 {
		return 0
	}
	return int64((d + time.Second - 1) / time.Second)
}

// retryAfterSeconds formats Retry-After: whole seconds, rounded up, at least
// 1 so that no client reads it as "retry at once".
func retryAfterSeconds(d time.Duration) string {
	return strconv.FormatInt(max(ceilSeconds(d), 1), 10)
}

// retryAfterMillis formats retry-after-ms, the finer form OpenAI's SDKs read.
func retryAfterMillis(d time.Duration) string {
	return strconv.FormatInt(max(int64((d+time.Millisecond-1)/time.Millisecond), 1), 10)
}

// headerGuard keeps the upstream's own rate-limit headers untouched. Ours are
// set on the response before the request goes on, so that they are there on
// every response, even one Caddy writes for an error. When the upstream
// sends a field of the same name, reverse_proxy adds its value to ours; the
// guard then drops ours, so the client sees the upstream's value alone.
//
// When the request was charged tokens, the guard also hands a copy of every
// byte written to the client to a usage watcher, so that the tokens can be
// settled when the response ends. Nothing is buffered or delayed.
type headerGuard struct {
	caddyhttp.ResponseWriterWrapper
	wroteHeader bool
	watch       *usageWatcher
	dialect     tokens.Dialect
	endpoint    tokens.Endpoint
}

func (g *headerGuard) WriteHeader(status int) {
	if !g.wroteHeader && status >= 200 {
		g.wroteHeader = true
		h := g.Header()
		for _, name := range ourHeaders {
			if v := h[name]; len(v) > 1 {
				h[name] = v[1:]
			}
		}
		if g.watch != nil {
			g.watch.start(g.dialect, g.endpoint, h, status)
		}
	}
	g.ResponseWriterWrapper.WriteHeader(status)
}

func (g *headerGuard) Write(b []byte) (int, error) {
	if !g.wroteHeader {
		g.WriteHeader(http.StatusOK)
	}
	n, err := g.ResponseWriterWrapper.Write(b)
	if g.watch != nil && !g.watch.off {
		// Only what reached the client counts.
		g.watch.scanner.Write(b[:n])
	}
	return n, err
}

func (g *headerGuard) ReadFrom(r io.Reader) (int64, error) {
	if !g.wroteHeader {
		g.WriteHeader(http.StatusOK)
	}
	if g.watch != nil {
		// Through Write, so that the watcher sees the bytes.
		return io.Copy(writerOnly{g}, r)
	}
	return g.ResponseWriterWrapper.ReadFrom(r)
}

// writerOnly hides ReadFrom, so that io.Copy writes through Write.
type writerOnly struct{ io.Writer }
