package llmratelimit

import (
	"errors"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/llmratelimit/caddy-llm-ratelimit/bucket"
	"github.com/llmratelimit/caddy-llm-ratelimit/tokens"
)

// The module's Prometheus collectors. They are created once per process and
// registered in every configuration's registry (Caddy makes a new registry
// for each configuration it loads): counters keep counting across graceful
// reloads, and several handlers in one configuration share them.
//
// Every label set is bounded. Rule ids and units come from the
// configuration; outcomes, statuses and operations are fixed lists; model
// names come from clients, so they go through modelLabel, which keeps at
// most maxModelLabels distinct names. No label ever holds a user, a key or
// a bucket.
var metrics = newMetrics()

const (
	metricsNamespace = "caddy"
	metricsSubsystem = "llm_rate_limit"
)

// maxModelLabels bounds the distinct model names used as label values; past
// it, a new name is counted as "other".
const maxModelLabels = 200

// Outcomes of a request at one limit, the decisions_total outcome label.
const (
	// outcomeAdmitted: the limit admitted the request at once.
	outcomeAdmitted = "admitted"
	// outcomeDelayed: the request waited in the queue, then was admitted.
	outcomeDelayed = "delayed"
	// outcomeRefused: this limit refused the request (at once or after
	// waiting).
	outcomeRefused = "refused"
	// outcomeCanceled: the client left while the request waited for this
	// limit.
	outcomeCanceled = "canceled"
	// outcomeShadowRefused: a shadow rule's limit would have refused it.
	outcomeShadowRefused = "shadow_refused"
)

type moduleMetrics struct {
	decisions        *prometheus.CounterVec
	queueWait        *prometheus.HistogramVec
	tokensEstimated  *prometheus.CounterVec
	tokensUsed       *prometheus.CounterVec
	estimateRatio    *prometheus.HistogramVec
	upstreamAttempts *prometheus.CounterVec
	upstreamAbsorbed *prometheus.CounterVec
	storeErrors      *prometheus.CounterVec
	storeFallbacks   prometheus.Counter
	live             liveCollector

	// limits caches each (rule, unit)'s decision counters, so that the hot
	// path increments a counter without a label lookup.
	limits sync.Map // limitLabel -> *limitCounters
	// models interns the model names used as labels.
	models      sync.Map // string -> string
	modelsCount atomic.Int64
}

// limitLabel names one limit for the counters cache.
type limitLabel struct{ zone, rule, unit string }

// limitCounters are one limit's decisions_total counters, one per outcome.
type limitCounters struct {
	admitted, delayed, refused, canceled, shadowRefused prometheus.Counter
}

func newMetrics() *moduleMetrics {
	opts := func(name, help string) prometheus.Opts {
		return prometheus.Opts{Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: name, Help: help}
	}
	counter := func(name, help string, labels ...string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts(opts(name, help)), labels)
	}
	return &moduleMetrics{
		decisions: counter("decisions_total",
			"Requests by zone, rule, unit and outcome: admitted (at once), delayed (admitted after waiting in the queue), refused, canceled (the client left while waiting), shadow_refused (a shadow rule would have refused). An admitted request counts at every limit that admitted it; a refused or canceled one at the limit that held it.",
			"zone", "rule", "unit", "outcome"),
		queueWait: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "queue_wait_seconds",
			Help:    "Time requests waited in the queue, by how the wait ended (admitted, refused, canceled). Requests that did not wait are not observed.",
			Buckets: []float64{0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120},
		}, []string{"outcome"}),
		tokensEstimated: counter("tokens_estimated_total",
			"Tokens charged at admission (the estimate), by model, for requests under a token limit.", "model"),
		tokensUsed: counter("tokens_used_total",
			"Tokens settled after the response (the real usage, or what settlement concluded without one), by model.", "model"),
		estimateRatio: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "token_estimate_ratio",
			Help:    "Real token usage divided by the admission estimate, per settled request that reported usage.",
			Buckets: []float64{0.1, 0.25, 0.5, 0.75, 0.9, 1, 1.1, 1.25, 1.5, 2, 3, 4, 8},
		}, []string{"dialect"}),
		upstreamAttempts: counter("upstream_attempts_total",
			"Attempts adaptive mode sent upstream, by model and the upstream's answer (2xx, 4xx, 429, 5xx, 503, or error: no answer).",
			"model", "status"),
		upstreamAbsorbed: counter("upstream_absorbed_total",
			"Upstream refusals and failures adaptive mode kept from the client and retried, by model and status.",
			"model", "status"),
		storeErrors: counter("store_errors_total",
			"Calls to the limiter store that failed, by operation (admit, settle, release). With a Redis store, each is also where fail_mode applied.",
			"op"),
		storeFallbacks: prometheus.NewCounter(prometheus.CounterOpts(opts("store_fallback_decisions_total",
			"Admissions decided by the Redis store's fail_mode (open or local) because Redis did not answer."))),
		live: liveCollector{
			queueDepth: prometheus.NewDesc(prometheus.BuildFQName(metricsNamespace, metricsSubsystem, "queue_depth"),
				"Requests waiting in the queue now.", nil, nil),
			learned: prometheus.NewDesc(prometheus.BuildFQName(metricsNamespace, metricsSubsystem, "learned_limit"),
				"What adaptive mode learned of an upstream model's limits: requests_per_second, tokens_per_second, concurrent_requests (0: none learned yet).",
				[]string{"zone", "model", "limit"}, nil),
		},
	}
}

// register adds the collectors to a configuration's registry. A collector
// already there (another handler of the configuration registered it) is
// fine: it is the same one.
func (m *moduleMetrics) register(reg *prometheus.Registry) error {
	if reg == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{m.decisions, m.queueWait, m.tokensEstimated, m.tokensUsed,
		m.estimateRatio, m.upstreamAttempts, m.upstreamAbsorbed, m.storeErrors, m.storeFallbacks, &m.live} {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if !errors.As(err, &are) {
				return err
			}
		}
	}
	return nil
}

// limitCounters returns the decision counters of a rule's limit.
func (m *moduleMetrics) limitCounters(zone, rule, unit string) *limitCounters {
	key := limitLabel{zone, rule, unit}
	if c, ok := m.limits.Load(key); ok {
		return c.(*limitCounters)
	}
	with := func(outcome string) prometheus.Counter { return m.decisions.WithLabelValues(zone, rule, unit, outcome) }
	c := &limitCounters{
		admitted: with(outcomeAdmitted), delayed: with(outcomeDelayed), refused: with(outcomeRefused),
		canceled: with(outcomeCanceled), shadowRefused: with(outcomeShadowRefused),
	}
	v, _ := m.limits.LoadOrStore(key, c)
	return v.(*limitCounters)
}

// pinModels gives the models a configuration names (exactly, not by
// prefix) a label of their own, whatever clients sent before: a flood of
// invented names cannot push them into "other".
func (m *moduleMetrics) pinModels(rules []compiledRule) {
	for _, r := range rules {
		for _, p := range r.models {
			if !p.prefix && p.name != "" {
				m.models.LoadOrStore(p.name, p.name)
			}
		}
	}
}

// modelLabel returns the label value for a model name: a model the
// configuration names, or one of the first maxModelLabels others seen, is
// its own label; any other is "other", and "none" is a request that named
// no model.
func (m *moduleMetrics) modelLabel(model string) string {
	if model == "" {
		return "none"
	}
	if v, ok := m.models.Load(model); ok {
		return v.(string)
	}
	if m.modelsCount.Load() >= maxModelLabels {
		return "other"
	}
	if _, loaded := m.models.LoadOrStore(model, model); !loaded {
		m.modelsCount.Add(1)
	}
	return model
}

// knownModelLabel returns a model's own label if it has one already,
// without giving it one.
func (m *moduleMetrics) knownModelLabel(model string) (string, bool) {
	if model == "" {
		return "", false
	}
	v, ok := m.models.Load(model)
	if !ok {
		return "", false
	}
	return v.(string), true
}

// observeDecision counts a decided request at its limits.
func (m *moduleMetrics) observeDecision(x *exchange, out *outcome) {
	enforcing := x.applied[:x.nEnforce]
	switch {
	case out.Allowed:
		for _, a := range enforcing {
			if out.Waited > 0 {
				a.limit.counters.delayed.Inc()
			} else {
				a.limit.counters.admitted.Inc()
			}
		}
	case len(enforcing) > 0:
		i := out.Limiting
		if i < 0 || i >= len(enforcing) {
			// A client that left just as its turn came has no limiting
			// charge: count it at the first limit it waited for.
			i = 0
		}
		c := enforcing[i].limit.counters
		if out.Outcome == bucket.Canceled {
			c.canceled.Inc()
		} else {
			c.refused.Inc()
		}
	}
	if out.shadowRefused >= 0 {
		x.applied[out.shadowRefused].limit.counters.shadowRefused.Inc()
	}
	if out.Waited > 0 {
		state := outcomeAdmitted
		switch {
		case out.Outcome == bucket.Canceled:
			state = outcomeCanceled
		case !out.Allowed:
			state = outcomeRefused
		}
		m.queueWait.WithLabelValues(state).Observe(out.Waited.Seconds())
	}
}

// observeAttempt counts one upstream attempt of adaptive mode; absorbed
// tells that its refusal or failure was kept from the client, to retry.
func (m *moduleMetrics) observeAttempt(model string, status int, absorbed bool) {
	label := m.modelLabel(model)
	s := statusLabel(status)
	m.upstreamAttempts.WithLabelValues(label, s).Inc()
	if absorbed {
		m.upstreamAbsorbed.WithLabelValues(label, s).Inc()
	}
}

// statusLabel groups an upstream status into the few classes the metrics
// use, keeping the ones adaptive mode treats apart (429, 503).
func statusLabel(status int) string {
	switch {
	case status == http.StatusTooManyRequests:
		return "429"
	case status == http.StatusServiceUnavailable:
		return "503"
	case status <= 0:
		return "error"
	case status < 300:
		return "2xx"
	case status < 400:
		return "3xx"
	case status < 500:
		return "4xx"
	default:
		return "5xx"
	}
}

func (m *moduleMetrics) observeTokens(model string, estimated, used int64) {
	label := m.modelLabel(model)
	if estimated > 0 {
		m.tokensEstimated.WithLabelValues(label).Add(float64(estimated))
	}
	if used > 0 {
		m.tokensUsed.WithLabelValues(label).Add(float64(used))
	}
}

func (m *moduleMetrics) observeEstimate(d tokens.Dialect, ratio float64) {
	m.estimateRatio.WithLabelValues(d.String()).Observe(ratio)
}

func (m *moduleMetrics) storeError(op string) { m.storeErrors.WithLabelValues(op).Inc() }

// liveCollector reports what is true now rather than counted: the queue's
// depth and the learned limits, read from every limiter state at scrape
// time.
type liveCollector struct {
	queueDepth, learned *prometheus.Desc
}

func (c *liveCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.queueDepth
	ch <- c.learned
}

func (c *liveCollector) Collect(ch chan<- prometheus.Metric) {
	depth := 0
	perSecond := func(count int64, window time.Duration) float64 {
		if count <= 0 || window <= 0 {
			return 0
		}
		return float64(count) / window.Seconds()
	}
	seen := map[learnerKey]bool{}
	for _, st := range runningStates() {
		depth += st.state.queue.Len()
		for _, e := range st.state.learners.entries() {
			// Only models with a label of their own: a scrape must not
			// use up label slots, and the models that share "other" would
			// take turns in one series.
			model, ok := metrics.knownModelLabel(e.key.model)
			if !ok || seen[learnerKey{e.key.zone, model}] {
				continue
			}
			seen[learnerKey{e.key.zone, model}] = true
			lim := e.l.learner.Limits()
			ch <- prometheus.MustNewConstMetric(c.learned, prometheus.GaugeValue,
				perSecond(lim.Requests.Count, lim.Requests.Window), e.key.zone, model, "requests_per_second")
			ch <- prometheus.MustNewConstMetric(c.learned, prometheus.GaugeValue,
				perSecond(lim.Tokens.Count, lim.Tokens.Window), e.key.zone, model, "tokens_per_second")
			ch <- prometheus.MustNewConstMetric(c.learned, prometheus.GaugeValue,
				float64(lim.Concurrent), e.key.zone, model, "concurrent_requests")
		}
	}
	ch <- prometheus.MustNewConstMetric(c.queueDepth, prometheus.GaugeValue, float64(depth))
}
