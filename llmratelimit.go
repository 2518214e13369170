// Package llmratelimit is a Caddy HTTP handler that puts per-model, per-user
// request and token limits in front of LLM APIs: OpenAI, Azure OpenAI,
// Anthropic, Gemini, and the vLLM, llama.cpp and Ollama servers that speak
// their dialects.
//
// It reads the model and the caller from each request, matches the request
// against rules (seed 003's rules: an id, a when, limits, and
// rate_limit_applies_per), charges every bucket of every matching rule at
// once or none of them, and either passes the request on to the next handler
// (normally reverse_proxy) or answers 429 in the caller's API dialect. Every
// response it passes carries rate-limit headers. Limiter state lives in a
// caddy.UsagePool, so a graceful reload keeps it.
package llmratelimit

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/llmratelimit/caddy-llm-ratelimit/bucket"
	"github.com/llmratelimit/caddy-llm-ratelimit/tokens"
)

func init() {
	caddy.RegisterModule(Handler{})
	httpcaddyfile.RegisterHandlerDirective("llm_rate_limit", parseCaddyfile)
	// Rate limiting belongs before the proxy; registering the order means a
	// Caddyfile works without an `order` global option.
	httpcaddyfile.RegisterDirectiveOrder("llm_rate_limit", httpcaddyfile.Before, "reverse_proxy")
}

// DefaultMaxBody is the default bound on a request body the module reads.
const DefaultMaxBody = 16 << 20

// maxMaxBody bounds max_body, in the JSON and in the Caddyfile.
const maxMaxBody = 1 << 40

// Handler is the llm_rate_limit HTTP handler. It rate-limits LLM API requests
// by rules, before they reach the next handler.
type Handler struct {
	// User is a placeholder that gives the request's user, for example
	// "{http.request.header.X-User}" or "{http.auth.user.id}". Default: none,
	// and a request with an empty value has no user.
	User string `json:"user,omitempty"`

	// Team is a placeholder that gives the request's team. Default: none.
	Team string `json:"team,omitempty"`

	// VirtualAccount is a placeholder that gives the request's virtual
	// account, typically its API key: "{http.request.header.Authorization}".
	// The value is hashed (SHA-256, a leading "Bearer " dropped) before it is
	// used anywhere, so keys never reach buckets, logs or headers.
	// Default: none.
	VirtualAccount string `json:"virtualaccount,omitempty"`

	// MetadataHeader names a request header that carries a JSON object of
	// string values, matched by when.metadata and used by
	// rate_limit_applies_per's metadata.KEY. A header that is too large
	// (over 4 KiB) or not such an object is ignored. Default: none.
	MetadataHeader string `json:"metadata_header,omitempty"`

	// Rules are the rate-limit rules. Every rule that matches a request
	// applies, and the request is admitted only if all their buckets can
	// take it.
	Rules []Rule `json:"rules,omitempty"`

	// RulesFile is the path of a YAML file in seed 003's own format (type:
	// gateway-rate-limiting-config), whose rules are added after Rules.
	// Rule ids must be unique across both. A relative path is relative to
	// Caddy's working directory, and placeholders such as {env.RULES_DIR}
	// are resolved. The file is read at provisioning: a reload reads it
	// again (`caddy reload --force` when the Caddyfile itself is
	// unchanged). Default: none.
	RulesFile string `json:"rules_file,omitempty"`

	// MaxBody bounds the request body the module reads to find the model, in
	// bytes. A larger body is answered with 413 in the caller's dialect.
	// Default: 16 MiB.
	MaxBody int64 `json:"max_body,omitempty"`

	// Tokens configures token accounting for tokens_per_* limits: the
	// estimate charged at admission and the settlement on the real usage.
	// Default: an estimate of 4 characters per token and 1024 completion
	// tokens when the request names no maximum.
	Tokens *TokenConfig `json:"tokens,omitempty"`

	// Zone namespaces this handler's buckets. Handlers with the same zone
	// and rule id share buckets, across sites and reloads. Default: "".
	Zone string `json:"zone,omitempty"`

	// Queue makes requests that a limit cannot take at once wait for their
	// turn, fairly between subjects, instead of being refused. Default:
	// none, and such requests are refused at once (a rule's own queue block
	// still applies to that rule).
	Queue *QueueConfig `json:"queue,omitempty"`

	// Adaptive turns on adaptive mode: limits learned from the upstream's
	// answers, and retries of what it refused. See AdaptiveConfig.
	// Default: off.
	Adaptive *AdaptiveConfig `json:"adaptive,omitempty"`

	// UseHandleErrors makes refusals (429, and 413 and 400 for bad bodies)
	// return a caddyhttp.Error for Caddy's handle_errors routes to answer,
	// instead of writing the body in the caller's dialect. The rate-limit
	// headers and Retry-After are set either way. Default: false.
	UseHandleErrors bool `json:"use_handle_errors,omitempty"`

	// Store says where bucket states live: this process's memory (the
	// default), or a Redis shared by several Caddy instances. See
	// StoreConfig.
	Store *StoreConfig `json:"store,omitempty"`

	user, team     placeholder
	account        placeholder
	rules          []compiledRule
	retained       []*compiledRule // the rules registered in the shared state
	hasTokenLimits bool
	// queues is set when some rule's requests may wait.
	queues   bool
	tokens   tokenSettings
	queue    queueSettings
	adaptive adaptiveSettings
	// state is kept after Cleanup: Caddy cleans up an old configuration
	// while its last requests may still be in flight, and they must still
	// find a store.
	state    *sharedState
	stateKey string
	// released is set (atomically) by the first Cleanup.
	released int32
	logger   *zap.Logger
	// now is the clock. Tests replace it; it defaults to time.Now.
	now func() time.Time
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.llm_rate_limit",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision compiles the rules and attaches the handler to the limiter state
// that outlives reloads.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	if h.now == nil {
		h.now = time.Now
	}
	if h.MaxBody == 0 {
		h.MaxBody = DefaultMaxBody
	}
	h.user, h.team, h.account = newPlaceholder(h.User), newPlaceholder(h.Team), newPlaceholder(h.VirtualAccount)
	cfgRules, err := h.withFileRules()
	if err != nil {
		return err
	}
	rules, err := compileRules(h.Zone, cfgRules)
	if err != nil {
		return err
	}
	h.rules = rules
	if h.queue, err = h.Queue.compile(); err != nil {
		return err
	}
	for i := range rules {
		if rules[i].policy, err = rulePolicy(&cfgRules[i], h.queue); err != nil {
			return fmt.Errorf("rule %q: %w", rules[i].id, err)
		}
	}
	if h.adaptive, err = h.Adaptive.compile(h.Zone, h.queue); err != nil {
		return err
	}
	if h.adaptive.enabled {
		h.queues, h.hasTokenLimits = true, true
		h.retained = append(h.retained, &h.adaptive.rule)
	}
	for i, r := range rules {
		h.queues = h.queues || r.policy.MaxWait > 0
		h.retained = append(h.retained, &rules[i])
		for _, l := range r.limits {
			if l.quantity == quantityTokens {
				h.hasTokenLimits = true
			}
		}
	}
	if h.tokens, err = h.Tokens.compile(); err != nil {
		return err
	}
	if err = metrics.register(ctx.GetMetricsRegistry()); err != nil {
		return err
	}
	metrics.pinModels(h.rules)
	h.state, h.stateKey, err = acquireState(h.Store, h.logger)
	if err != nil {
		return err
	}
	h.state.retain(h.Zone, h.retained)
	return nil
}

// Validate checks the options that Provision does not.
func (h *Handler) Validate() error {
	if h.MaxBody < 0 || h.MaxBody > maxMaxBody {
		return fmt.Errorf("max_body must be between 1 byte and 1 TiB, got %d", h.MaxBody)
	}
	return nil
}

// Cleanup lets go of the shared limiter state. The buckets of rules that no
// running configuration uses any more are freed.
func (h *Handler) Cleanup() error {
	if h.state == nil || atomic.SwapInt32(&h.released, 1) == 1 {
		return nil
	}
	h.state.release(h.retained)
	return releaseState(h.stateKey)
}

// exchange is the per-request working set, pooled so that the decision path
// does not allocate.
type exchange struct {
	id      identity
	req     tokens.Request
	keys    []byte
	applied []applied
	charges []bucket.Charge
	states  []bucket.State
	// policies holds each charge's queue policy, and admission what is
	// asked of the queue.
	policies  []bucket.Policy
	admission bucket.Request
	// flow is the fairness subject, and weight and priority its share and
	// class, when a rule may queue.
	flow     []byte
	weight   float64
	priority int
	// concurrent counts the concurrency limits among the charges.
	concurrent int
	// learned is the upstream model's learner in adaptive mode, arrived
	// when the request came, and extraSlots the learned concurrency slots
	// it took when it was sent again.
	learned    *learned
	arrived    time.Time
	extraSlots []bucket.Charge
	// nEnforce is how many of applied/charges/states belong to enforcing
	// rules; the rest are shadow rules.
	nEnforce int
	// charged tells, per charge, whether the bucket was charged (and so
	// must be settled).
	charged []bool
	// tokenCharges counts the token limits among the charges.
	tokenCharges int
	// est is the estimator for the request's model, and promptEst and
	// completionEst what it estimated.
	est                      tokens.Estimator
	promptEst, completionEst int64
	// adjust is scratch space for settlement.
	adjust []bucket.Charge
	// vars are the request's placeholders' values; nil when the request
	// has no replacer.
	vars *decisionVars
	// body is the request body the module read. It is not pooled: the
	// request keeps it after the handler returns, when handle_errors routes
	// may still send it on (to a fallback upstream, say).
	body []byte
}

// applied is one limit of one matching rule.
type applied struct {
	rule  *compiledRule
	limit *compiledLimit
}

var exchangePool = sync.Pool{New: func() any { return new(exchange) }}

func getExchange() *exchange {
	x := exchangePool.Get().(*exchange)
	x.id.reset()
	x.req = tokens.Request{}
	x.keys = x.keys[:0]
	x.applied, x.charges, x.states = x.applied[:0], x.charges[:0], x.states[:0]
	x.charged, x.adjust = x.charged[:0], x.adjust[:0]
	x.policies, x.flow = x.policies[:0], x.flow[:0]
	x.learned, x.extraSlots = nil, x.extraSlots[:0]
	x.admission = bucket.Request{}
	x.weight, x.priority = 1, 0
	x.nEnforce, x.tokenCharges, x.concurrent = 0, 0, 0
	x.est, x.promptEst, x.completionEst = tokens.Estimator{}, 0, 0
	x.body, x.vars = nil, nil
	return x
}

func putExchange(x *exchange) {
	x.body, x.vars = nil, nil
	exchangePool.Put(x)
}

// match finds the limits that apply to the request and builds their bucket
// keys: enforcing rules first, then shadow rules. A request limit costs one;
// a token limit costs the request's estimate.
//
// learn, when not nil, adds the charges of the learned limits after the
// enforcing rules.
func (x *exchange) match(rules []compiledRule, learn func(*exchange)) {
	for pass := 0; pass < 2; pass++ {
		shadow := pass == 1
		for i := range rules {
			r := &rules[i]
			if r.shadow != shadow || !r.matches(&x.id) {
				continue
			}
			for j := range r.limits {
				x.add(r, &r.limits[j])
			}
		}
		if !shadow {
			if learn != nil {
				learn(x)
			}
			x.nEnforce = len(x.applied)
		}
	}
}

// outcome is what decide concluded.
type outcome struct {
	bucket.Result
	// shadowRefused is the index of the shadow limit that would have refused
	// the request, or -1.
	shadowRefused int
}

// decide charges the request's buckets: the enforcing ones atomically,
// through the queue (where the request may wait for its turn), and then, if
// the request is admitted, the shadow ones on their own, at the time of
// admission.
func (h *Handler) decide(ctx context.Context, now time.Time, x *exchange) (outcome, error) {
	out := outcome{Result: bucket.Result{Decision: bucket.Decision{Allowed: true, Limiting: -1}}, shadowRefused: -1}
	store := h.state.store
	if x.nEnforce > 0 {
		x.admission = bucket.Request{
			Charges:  x.charges[:x.nEnforce],
			States:   x.states[:x.nEnforce],
			Policies: x.policies[:x.nEnforce],
			Flow:     x.flow,
			Weight:   x.weight,
			Priority: x.priority,
		}
		res, err := h.state.queue.Admit(ctx, now, &x.admission)
		x.admission = bucket.Request{}
		if err != nil {
			return out, err
		}
		out.Result = res
		if res.Outcome != bucket.Admitted {
			out.Allowed = false
		}
		if out.Allowed {
			for i := range x.nEnforce {
				x.charged[i] = true
				// Their refunds are for the store that charged them.
				x.charges[i].Replay = !res.Fallback
			}
		}
		now = now.Add(res.Waited)
	}
	shadow := x.charges[x.nEnforce:]
	if len(shadow) == 0 {
		return out, nil
	}
	if !out.Allowed {
		// A refused request never reaches the upstream, so it costs the
		// shadow rules nothing either; they still report their state.
		// A shadow rule never decides: a store that fails here only
		// leaves its state out of the headers.
		_ = store.Peek(ctx, now, shadow, x.states[x.nEnforce:])
		return out, nil
	}
	// Each shadow rule is charged on its own, as if it were the only rule:
	// one that would refuse must not keep the others from counting.
	for start := x.nEnforce; start < len(x.charges); {
		end := start + 1
		for end < len(x.charges) && x.applied[end].rule == x.applied[start].rule {
			end++
		}
		d, err := store.Reserve(ctx, now, x.charges[start:end], 0, x.states[start:end])
		if err != nil {
			// The request is admitted and charged already: a shadow rule
			// the store cannot count must not undo that (the charges
			// would never be given back) or refuse it.
			for i := start; i < end; i++ {
				x.charged[i] = false
			}
			start = end
			continue
		}
		if !d.Allowed && out.shadowRefused < 0 {
			out.shadowRefused = start + d.Limiting
		}
		for i := start; i < end; i++ {
			x.charged[i] = d.Allowed
			x.charges[i].Replay = !d.Fallback
		}
		start = end
	}
	return out, nil
}

// add adds the charge of limit l of rule r for the request, with its key,
// policy and scratch entries.
func (x *exchange) add(r *compiledRule, l *compiledLimit) {
	// A key is sliced out of x.keys as soon as it is built. If a later
	// append moves x.keys, earlier keys keep pointing at the old array,
	// whose bytes never change again.
	start := len(x.keys)
	x.keys = r.appendKey(x.keys, l, &x.id)
	cost := int64(1)
	if l.quantity == quantityTokens {
		// A request larger than the bucket is charged the whole capacity:
		// it is admitted once the bucket is full, and settlement then
		// charges what it really used. So a client's huge max_tokens
		// cannot push a debt onto everyone sharing the bucket; only real
		// usage can. (With oversize reject, it is refused before this
		// matters.)
		cost = min(x.promptEst+x.completionEst, l.limit.Capacity())
		x.tokenCharges++
	}
	if l.limit.Concurrent() {
		x.concurrent++
	}
	x.policies = append(x.policies, r.policy)
	x.applied = append(x.applied, applied{rule: r, limit: l})
	x.charges = append(x.charges, bucket.Charge{Key: x.keys[start:len(x.keys):len(x.keys)], Limit: l.limit, Cost: cost})
	x.states = append(x.states, bucket.State{})
	x.charged = append(x.charged, false)
}

// ServeHTTP implements caddyhttp.MiddlewareHandler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	// The state (and a Redis client) stays open while a request of this
	// configuration is being served, even after a reload has let it go.
	h.state.enter()
	defer h.state.leave()
	x := getExchange()
	defer putExchange(x)

	dialect, endpoint, pathModel := tokens.Route(r.Method, r.URL.Path)
	if dialect != tokens.DialectUnknown {
		if answered, err := h.readBody(w, r, dialect, x); answered {
			return err
		}
		defer func() {
			// Whatever the next handler did with the body, leave a fresh
			// copy on the request for handle_errors routes (a fallback
			// upstream) that send it again: the body as last sent, with
			// its length.
			if body := x.body; body != nil {
				h.replaceBody(r, x, body)
			}
		}()
		if len(x.body) > 0 || pathModel != "" {
			p := tokens.GetParser()
			err := p.Parse(dialect, endpoint, pathModel, x.body, &x.req)
			tokens.PutParser(p)
			if err != nil {
				return h.refuse(w, dialect, http.StatusBadRequest, tokens.ErrBadRequest, "", "invalid request body: "+err.Error())
			}
		}
	}
	h.identify(r, x)
	if h.hasTokenLimits {
		x.est = h.tokens.estimator(x.req.Model)
		x.promptEst, x.completionEst = x.est.Prompt(&x.req), x.est.Completion(&x.req)
	}
	var learn func(*exchange)
	if h.adaptive.enabled {
		learn = h.matchLearned
	}
	x.match(h.rules, learn)
	x.vars = attachVars(r, x)
	if len(x.charges) == 0 && x.learned == nil {
		return next.ServeHTTP(w, r)
	}
	if h.queues {
		h.queueIdentity(r, x)
	}
	if x.tokenCharges > 0 && h.tokens.rejectOversize {
		if i := x.oversize(); i >= 0 {
			a := x.applied[i]
			return h.refuse(w, dialect, http.StatusRequestEntityTooLarge, tokens.ErrTooLarge, "tokens",
				fmt.Sprintf("request too large: it needs about %d tokens, and rule %q allows at most %d at once (%d %s)",
					x.promptEst+x.completionEst, a.rule.id, a.limit.limit.Capacity(), a.limit.limit.Count, a.limit.unit))
		}
	}

	now := h.now()
	x.arrived = now
	out, err := h.decide(r.Context(), now, x)
	if err != nil {
		metrics.storeError("admit")
		return h.storeFailed(w, r, dialect, err, next)
	}
	if out.Fallback {
		metrics.storeFallbacks.Inc()
	}
	metrics.observeDecision(x, &out)
	x.vars.decided(x, &out)
	if out.shadowRefused >= 0 {
		a := x.applied[out.shadowRefused]
		// Per request, so not at INFO: the decisions_total metric's
		// shadow_refused outcome counts these.
		h.logger.Debug("shadow rule would refuse the request",
			zap.String("rule", a.rule.id), zap.String("unit", a.limit.unit),
			zap.String("model", x.id.model), zap.Duration("retry_after", out.Delay))
	}
	if out.Outcome == bucket.Canceled {
		// The client left while it waited; nothing was charged. 499 is
		// what Caddy's proxy logs for a client that closed its request.
		return caddyhttp.Error(499, r.Context().Err())
	}
	now = now.Add(out.Waited)
	hdr := w.Header()
	setRateLimitHeaders(hdr, now, x)
	if out.Waited > 0 || out.Outcome != bucket.Admitted && out.Outcome != bucket.Refused {
		hdr.Set(headerQueueWait, strconv.FormatInt(out.Waited.Milliseconds(), 10))
		hdr.Set(headerQueueDepth, strconv.Itoa(out.Depth))
	}
	if !out.Allowed {
		return h.tooMany(w, dialect, x, out.Result)
	}
	if x.concurrent > 0 || x.learned != nil {
		// A concurrency slot is held until the response ends, however it
		// ends: reverse_proxy panics when the client leaves mid-stream.
		defer h.releaseSlots(x)
	}
	guard := &headerGuard{ResponseWriterWrapper: caddyhttp.ResponseWriterWrapper{ResponseWriter: w}}
	if x.tokenCharges == 0 {
		return h.forward(guard, r, next, x)
	}
	// Token limits: watch the response for its usage, and settle.
	if h.tokens.streamUsage && x.req.Stream && !x.req.HasStreamOptions &&
		(dialect == tokens.DialectOpenAI || dialect == tokens.DialectAzure) &&
		(endpoint == tokens.EndpointChat || endpoint == tokens.EndpointCompletion) {
		h.replaceBody(r, x, addIncludeUsage(x.body))
	}
	// An upstream's usage can only be read from an uncompressed response.
	// Caddy's encode directive can still compress toward the client.
	r.Header.Del("Accept-Encoding")
	watch := watcherPool.Get().(*usageWatcher)
	watch.status, watch.off = 0, false
	guard.watch, guard.dialect, guard.endpoint = watch, dialect, endpoint
	// Settle however the response ends. When the client goes away in the
	// middle of a stream, reverse_proxy panics with http.ErrAbortHandler:
	// settle then, as a response cut short, and let the panic go on.
	completed := false
	defer func() {
		h.settle(x, watch, guard.wroteHeader, err, !completed)
		watcherPool.Put(watch)
	}()
	err = h.forward(guard, r, next, x)
	completed = err == nil
	return err
}

// oversize returns the index of a token charge larger than its bucket's
// whole capacity, or -1.
func (x *exchange) oversize() int {
	for i, a := range x.applied[:x.nEnforce] {
		if a.limit.quantity == quantityTokens && x.promptEst+x.completionEst > a.limit.limit.Capacity() {
			return i
		}
	}
	return -1
}

// readBody reads a recognised request's body, up to MaxBody, into x.body and
// puts an identical, replayable body back on the request. When the body is
// too large or cannot be read, it answers the request itself and returns
// answered = true, with the error for Caddy if the operator chose
// handle_errors.
func (h *Handler) readBody(w http.ResponseWriter, r *http.Request, d tokens.Dialect, x *exchange) (answered bool, err error) {
	if r.Body == nil || r.Body == http.NoBody {
		return false, nil
	}
	tooLarge := func() (bool, error) {
		return true, h.refuse(w, d, http.StatusRequestEntityTooLarge, tokens.ErrTooLarge, "",
			fmt.Sprintf("request body is larger than the gateway's limit of %d bytes", h.MaxBody))
	}
	if r.ContentLength > h.MaxBody {
		return tooLarge()
	}
	body, err := readAll(r.Body, r.ContentLength, h.MaxBody+1)
	n := int64(len(body))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return tooLarge()
		}
		// The client went away or sent a broken body. Answer it anyway, so
		// that no request ends without a response in the log.
		h.logger.Debug("reading request body", zap.Error(err))
		return true, h.refuse(w, d, http.StatusBadRequest, tokens.ErrBadRequest, "", "could not read the request body")
	}
	if n > h.MaxBody {
		return tooLarge()
	}
	h.replaceBody(r, x, body)
	return false, nil
}

// readAll reads at most limit bytes of body. An announced length sizes the
// first buffer (up to 64 KiB), with the room bytes.Buffer wants for its
// final read, so a typical body is read with one allocation.
func readAll(body io.Reader, length, limit int64) ([]byte, error) {
	if length < 0 || length >= limit {
		var buf bytes.Buffer
		_, err := buf.ReadFrom(io.LimitReader(body, limit))
		return buf.Bytes(), err
	}
	// Trust an announced length only so far: a client must send the bytes
	// before the module holds memory for them.
	buf := bytes.NewBuffer(make([]byte, 0, min(length, 64<<10)+bytes.MinRead))
	_, err := buf.ReadFrom(io.LimitReader(body, limit))
	return buf.Bytes(), err
}

// replaceBody makes body the request's body, replayable.
func (h *Handler) replaceBody(r *http.Request, x *exchange, body []byte) {
	x.body = body
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	r.ContentLength = int64(len(body))
	// The body is now known in full: send it with a Content-Length even if
	// it arrived chunked. The bytes themselves are unchanged.
	r.TransferEncoding = nil
}

// identify resolves who is asking and about what.
func (h *Handler) identify(r *http.Request, x *exchange) {
	x.id.model = x.req.Model
	if h.User == "" && h.Team == "" && h.VirtualAccount == "" && h.MetadataHeader == "" {
		return
	}
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	if h.User != "" {
		x.id.user = boundedValue(h.user.value(r, repl))
	}
	if h.Team != "" {
		x.id.team = boundedValue(h.team.value(r, repl))
	}
	if h.VirtualAccount != "" {
		x.id.account = hashAccount(h.account.value(r, repl))
	}
	if h.MetadataHeader != "" {
		var why string
		x.id.metadata, why = parseMetadata(x.id.metadata, r.Header.Get(h.MetadataHeader))
		if why != "" {
			h.logger.Debug("ignoring metadata header", zap.String("header", h.MetadataHeader), zap.String("reason", why))
		}
	}
}

// queueIdentity resolves the request's fairness subject, weight and
// priority class.
func (h *Handler) queueIdentity(r *http.Request, x *exchange) {
	qs := &h.queue
	x.flow = qs.appendFlow(x.flow, &x.id)
	if !qs.priority.set && !qs.weight.set {
		return
	}
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	x.priority = qs.classOf(r, repl, &x.id)
	x.weight = qs.weightOf(r, repl, &x.id)
}

// releaseSlots gives back the concurrency slots the request holds, and lets
// the next waiting request in.
func (h *Handler) releaseSlots(x *exchange) {
	// The refunds are built in the settlement scratch space, which
	// settlement (deferred after this, so run before it) no longer needs.
	refunds := x.adjust[:0]
	for _, c := range x.extraSlots {
		c.Cost = -c.Cost
		refunds = append(refunds, c)
	}
	for i, c := range x.charges {
		if x.charged[i] && c.Limit.Concurrent() {
			c.Cost = -c.Cost
			refunds = append(refunds, c)
		}
	}
	x.adjust = refunds
	if len(refunds) == 0 {
		return
	}
	// Released inline, even on a shared store: a client that sends its
	// next request as soon as it has the response (an agent with one
	// slot) must find its slot free, on this instance or another.
	if err := h.state.queue.Give(refunds); err != nil {
		metrics.storeError("release")
		h.logger.Error("limiter store: release", zap.Error(err))
	}
}

// tooMany answers a refused request.
func (h *Handler) tooMany(w http.ResponseWriter, d tokens.Dialect, x *exchange, res bucket.Result) error {
	dec := res.Decision
	hdr := w.Header()
	hdr.Set("Retry-After", retryAfterSeconds(dec.Delay))
	hdr.Set("Retry-After-Ms", retryAfterMillis(dec.Delay))
	a := x.applied[dec.Limiting]
	msg := fmt.Sprintf("rate limit exceeded: rule %q allows %d %s", a.rule.id, a.limit.limit.Count, a.limit.unit)
	if a.rule.perText != "" {
		msg += " per " + a.rule.perText
	}
	msg += queueMessage(res, a.rule.policy)
	msg += fmt.Sprintf("; retry after %s", dec.Delay.Round(time.Millisecond))
	return h.refuse(w, d, http.StatusTooManyRequests, tokens.ErrRateLimited, a.limit.quantity.String(), msg)
}

// refuse answers the request with an error in its dialect, or hands the
// error to Caddy's handle_errors when the operator asked for that.
func (h *Handler) refuse(w http.ResponseWriter, d tokens.Dialect, status int, kind tokens.ErrorKind, unit, msg string) error {
	if h.UseHandleErrors {
		return caddyhttp.Error(status, errors.New(msg))
	}
	tokens.WriteError(w, d, status, kind, unit, msg)
	return nil
}

// storeFailed answers a request whose admission the store could not decide.
// A shared store down with fail_mode closed refuses with a 503 in the
// dialect (the outage itself is logged once, by the store); any other error
// (the in-memory store has none) lets the request through, so that a
// limiter fault does not take the API down, and is logged at DEBUG only, to
// keep a fault from flooding the log.
func (h *Handler) storeFailed(w http.ResponseWriter, r *http.Request, d tokens.Dialect, err error, next caddyhttp.Handler) error {
	if errors.Is(err, bucket.ErrPrimaryDown) {
		w.Header().Set("Retry-After", "1")
		return h.refuse(w, d, http.StatusServiceUnavailable, tokens.ErrUnavailable, "",
			"rate limiter unavailable: its shared store does not answer; retry shortly")
	}
	if errors.Is(err, context.Canceled) && r.Context().Err() != nil {
		return nil // the client left while its request was decided
	}
	h.logger.Debug("limiter store failed; request let through", zap.Error(err))
	return next.ServeHTTP(w, r)
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
