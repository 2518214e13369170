package llmratelimit

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"

	"go.uber.org/zap"

	"github.com/llmratelimit/caddy-llm-ratelimit/bucket"
	"github.com/llmratelimit/caddy-llm-ratelimit/tokens"
)

// TokenConfig configures token accounting: how a request's tokens are
// estimated when it is admitted, and what happens to a request larger than a
// token bucket.
//
// Token limits charge the estimate (prompt + completion) at admission, on
// every token bucket the request matches, atomically with the request
// buckets. When the response ends, the difference between the real usage
// the upstream reported and the estimate is settled on each of those
// buckets, before the handler returns, so the next request sees the truth.
//
// Cached tokens: prompt tokens served from a provider's cache (OpenAI
// cached_tokens, Anthropic cache_read/cache_creation_input_tokens, Gemini
// cachedContentTokenCount) count in full. The model reads them, and a limit
// that protects an upstream or a budget should see them; providers that
// discount them do so in price, not in what their own limits count for most
// models.
type TokenConfig struct {
	// CharsPerToken is how many characters of non-CJK prompt text the
	// estimate counts as one token. CJK text counts one token per
	// character. Default: 4.
	CharsPerToken float64 `json:"chars_per_token,omitempty"`

	// CompletionTokens is the completion estimate for a request that names
	// no max_tokens (or its dialect's equivalent). Default: 1024.
	CompletionTokens int64 `json:"completion_tokens,omitempty"`

	// Oversize decides what happens to a request whose estimate is larger
	// than a token bucket's whole capacity: "admit" (the default) admits it
	// once the bucket is full and leaves the bucket in debt, so that it is
	// not refused forever; "reject" answers 413 at once, naming the rule.
	Oversize string `json:"oversize,omitempty"`

	// StreamUsage, for OpenAI and Azure chat and completion streams whose
	// request has no stream_options, adds "stream_options":
	// {"include_usage": true} to the request body, so that the stream's
	// last chunk reports the real usage. This is the one case where the
	// module changes a request body; the client then receives one more
	// chunk, with empty choices. Default: false, and such a stream is
	// settled by counting the text it carried.
	StreamUsage bool `json:"stream_usage,omitempty"`

	// Models tune the estimate per model. The first entry whose Match
	// matches the request's model applies.
	Models []ModelTokenConfig `json:"models,omitempty"`
}

// ModelTokenConfig tunes the token estimate for some models.
type ModelTokenConfig struct {
	// Match is a model name; a trailing "*" makes it a prefix.
	Match string `json:"match"`
	// CharsPerToken overrides TokenConfig.CharsPerToken. Default: inherit.
	CharsPerToken float64 `json:"chars_per_token,omitempty"`
	// CompletionTokens overrides TokenConfig.CompletionTokens. Default:
	// inherit.
	CompletionTokens int64 `json:"completion_tokens,omitempty"`
}

// tokenSettings is TokenConfig ready for use.
type tokenSettings struct {
	base           tokens.Estimator
	models         []modelEstimator
	rejectOversize bool
	streamUsage    bool
}

type modelEstimator struct {
	pattern modelPattern
	est     tokens.Estimator
}

func (c *TokenConfig) compile() (tokenSettings, error) {
	var ts tokenSettings
	if c == nil {
		return ts, nil
	}
	if !(c.CharsPerToken >= 0 && c.CharsPerToken <= 100) {
		return ts, fmt.Errorf("tokens: chars_per_token %g: want a number between 0 and 100", c.CharsPerToken)
	}
	if c.CompletionTokens < 0 {
		return ts, fmt.Errorf("tokens: completion_tokens %d: must not be negative", c.CompletionTokens)
	}
	switch c.Oversize {
	case "", "admit":
	case "reject":
		ts.rejectOversize = true
	default:
		return ts, fmt.Errorf("tokens: oversize %q: want admit or reject", c.Oversize)
	}
	ts.streamUsage = c.StreamUsage
	ts.base = tokens.Estimator{CharsPerToken: c.CharsPerToken, CompletionTokens: c.CompletionTokens}
	for _, m := range c.Models {
		if m.Match == "" {
			return ts, fmt.Errorf("tokens: model entry without a match")
		}
		if !(m.CharsPerToken >= 0 && m.CharsPerToken <= 100) || m.CompletionTokens < 0 {
			return ts, fmt.Errorf("tokens: model %q: chars_per_token must be between 0 and 100 and completion_tokens not negative", m.Match)
		}
		est := ts.base
		if m.CharsPerToken > 0 {
			est.CharsPerToken = m.CharsPerToken
		}
		if m.CompletionTokens > 0 {
			est.CompletionTokens = m.CompletionTokens
		}
		ts.models = append(ts.models, modelEstimator{pattern: newModelPattern(m.Match), est: est})
	}
	return ts, nil
}

// estimator returns the estimator for a model.
func (ts *tokenSettings) estimator(model string) tokens.Estimator {
	for i := range ts.models {
		if ts.models[i].pattern.matches(model) {
			return ts.models[i].est
		}
	}
	return ts.base
}

// addIncludeUsage returns body with "stream_options":{"include_usage":true}
// added as the first member of its top-level object. The body has been
// parsed as a JSON object without stream_options, so its first
// non-space byte is '{'.
func addIncludeUsage(body []byte) []byte {
	i := 0
	for i < len(body) && body[i] != '{' {
		i++
	}
	if i == len(body) {
		return body
	}
	const member = `"stream_options":{"include_usage":true}`
	out := make([]byte, 0, len(body)+len(member)+1)
	out = append(out, body[:i+1]...)
	out = append(out, member...)
	rest := body[i+1:]
	j := 0
	for j < len(rest) && (rest[j] == ' ' || rest[j] == '\t' || rest[j] == '\n' || rest[j] == '\r') {
		j++
	}
	if j < len(rest) && rest[j] != '}' {
		out = append(out, ',')
	}
	return append(out, rest...)
}

// usageWatcher feeds a copy of the response body, as it is written to the
// client, to a usage scanner. It never delays or changes a byte.
type usageWatcher struct {
	scanner tokens.UsageScanner
	status  int
	// off is set when the response cannot be read (compressed).
	off bool
}

var watcherPool = sync.Pool{New: func() any { return new(usageWatcher) }}

func (u *usageWatcher) start(d tokens.Dialect, ep tokens.Endpoint, h http.Header, status int) {
	u.status = status
	enc := h.Get("Content-Encoding")
	u.off = enc != "" && !strings.EqualFold(enc, "identity")
	u.scanner.Reset(d, ep, h.Get("Content-Type"))
}

// settle corrects the token charges of an admitted request by the real
// usage, and reports the estimate's error. wrote says whether a response
// began; cut, that it did not end normally (the client went away, or the
// upstream failed mid-response).
func (h *Handler) settle(x *exchange, u *usageWatcher, wrote bool, nextErr error, cut bool) {
	if x.tokenCharges == 0 {
		return
	}
	estimate := x.promptEst + x.completionEst
	real := estimate
	reported := false
	switch {
	case !wrote || u.status >= 400:
		// The upstream did not answer, or refused: nothing was generated.
		real = x.promptEst
	case u.off:
		// A compressed response cannot be read; the estimate stands.
	default:
		use := u.scanner.Usage()
		text := x.est.Text(use.StreamedChars, use.StreamedCJK)
		switch {
		case cut:
			// A response cut short: what was streamed, never less than
			// the prompt. Usage read so far may be partial: Anthropic's
			// message_start has a placeholder output, Gemini's chunks a
			// running count. Take the larger of it and the text seen.
			real = max(use.InputTokens, x.promptEst) + max(use.OutputTokens, text)
		case use.Reported:
			real, reported = use.InputTokens+use.OutputTokens, true
		case x.req.Stream:
			// A stream without usage: the prompt estimate plus the text
			// it carried.
			real = x.promptEst + text
		}
	}
	metrics.observeTokens(x.id.model, estimate, real)
	if x.vars != nil {
		x.vars.used = real
	}
	if reported && estimate > 0 {
		metrics.observeEstimate(x.req.Dialect, float64(real)/float64(estimate))
	}
	// Each bucket is corrected by what it was charged: a bucket smaller
	// than the estimate was charged only its capacity.
	adj := x.adjust[:0]
	for i, a := range x.applied {
		if a.limit.quantity == quantityTokens && x.charged[i] && real != x.charges[i].Cost {
			c := x.charges[i]
			c.Cost = real - c.Cost
			adj = append(adj, c)
		}
	}
	x.adjust = adj
	if len(adj) == 0 {
		return
	}
	h.correct(adj, "settle", func(adj []bucket.Charge) error {
		// The request's own context may be cancelled (the client left);
		// the correction must still be made.
		err := h.state.store.Adjust(context.Background(), h.now(), adj)
		// A refund frees capacity earlier than the queue planned for:
		// let the requests waiting for those buckets try again now.
		h.state.queue.Wake(adj)
		return err
	})
}

// correct applies a settlement's corrections to the store. The in-memory
// store applies them at once. A shared store (Redis) applies them in the
// background, so that its round trip does not hold the response: Go's
// server sends the last bytes of a response the handler did not flush only
// when the handler returns. (Concurrency slots are released inline, so that
// a client's next request finds its slot free; a token refund that lands a
// moment later only errs towards charging.) The corrections are copied,
// since the request's scratch space is reused, and the state stays open
// until they are applied.
func (h *Handler) correct(charges []bucket.Charge, op string, apply func([]bucket.Charge) error) {
	fail := func(err error) {
		metrics.storeError(op)
		h.logger.Error("limiter store: "+op, zap.Error(err))
	}
	if !h.state.shared {
		if err := apply(charges); err != nil {
			fail(err)
		}
		return
	}
	own := bucket.CloneCharges(charges)
	h.state.enter()
	go func() {
		defer h.state.leave()
		if err := apply(own); err != nil {
			fail(err)
		}
	}()
}
