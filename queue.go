package llmratelimit

import (
	"fmt"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/llmratelimit/caddy-llm-ratelimit/bucket"
)

// Queue defaults.
const (
	DefaultMaxWait  = 30 * time.Second
	DefaultMaxDepth = 10000
	// maxWeight bounds a flow's weight (and 1/maxWeight is the least), so
	// that no value can starve everyone else or overflow a counter.
	maxWeight = 1000
	// maxPriority bounds a priority class either way.
	maxPriority = 1000
)

// QueueConfig makes requests that a limit cannot take at once wait for their
// turn instead of being refused. The turn is decided when capacity frees,
// fairly between subjects: the waiting subject that has received the least
// service (in the limit's units, requests or tokens, divided by its weight)
// goes next, within the highest priority class that has a request waiting.
type QueueConfig struct {
	// MaxWait bounds how long a request waits. A request whose turn is
	// predicted to come later is refused at once, with that prediction as
	// its Retry-After; one still waiting when MaxWait has passed is refused
	// then. "0s" makes every request that a limit cannot take at once be
	// refused at once. Default: 30s.
	MaxWait *caddy.Duration `json:"max_wait,omitempty"`

	// MaxDepth bounds how many requests wait for one bucket. When a
	// bucket's queue is full, a newcomer pushes out the newest request of
	// the subject with the most waiting (if that is not its own subject),
	// so that a flooder cannot lock anyone else out. Default: 10000.
	MaxDepth int `json:"max_depth,omitempty"`

	// FairBy lists the dimensions that name a subject for fairness, as in
	// rate_limit_applies_per: "user", "team", "virtualaccount", "model",
	// "metadata.KEY". Default: the request's user, or if it has none its
	// virtual account, or if it has none its team. Only at the handler
	// level.
	FairBy []string `json:"fair_by,omitempty"`

	// Priority gives a request's priority class: a placeholder such as
	// "{http.request.header.X-Priority}", or "metadata.KEY". Higher classes
	// always go first. Its value is looked up in PriorityClasses when that
	// is set, and read as an integer otherwise; anything else is class 0.
	// Take it from something clients cannot set themselves. Default: every
	// request is class 0. Only at the handler level.
	Priority string `json:"priority,omitempty"`

	// PriorityClasses maps values of Priority to classes, for example
	// {"interactive": 10, "batch": -10}. Default: none.
	PriorityClasses map[string]int `json:"priority_classes,omitempty"`

	// Weight gives a subject's weight, its share of a bucket when several
	// wait: a placeholder or "metadata.KEY", like Priority. Its value is
	// looked up in Weights when that is set, and read as a number
	// otherwise; anything else, or nothing, is 1. Default: every subject
	// weighs 1. Only at the handler level.
	Weight string `json:"weight,omitempty"`

	// Weights maps values of Weight to weights, for example {"gold": 4,
	// "silver": 2}. Weights lie between 0.001 and 1000. Default: none.
	Weights map[string]float64 `json:"weights,omitempty"`
}

// queueSettings is a QueueConfig ready for the hot path.
type queueSettings struct {
	enabled         bool
	policy          bucket.Policy
	fairBy          []dimension
	priority        valueSource
	priorityClasses map[string]int
	weight          valueSource
	weights         map[string]float64
}

// valueSource is a placeholder or a metadata key.
type valueSource struct {
	set     bool
	metaKey string
	ph      placeholder
}

func newValueSource(s string) valueSource {
	if s == "" {
		return valueSource{}
	}
	if k, ok := strings.CutPrefix(s, "metadata."); ok {
		return valueSource{set: true, metaKey: k}
	}
	return valueSource{set: true, ph: newPlaceholder(s)}
}

func (v valueSource) value(r *http.Request, repl *caddy.Replacer, id *identity) string {
	if !v.set {
		return ""
	}
	if v.metaKey != "" {
		s, _ := id.meta(v.metaKey)
		return s
	}
	return boundedValue(v.ph.value(r, repl))
}

// compilePolicy reads a max_wait and max_depth, falling back to base.
func compilePolicy(c *QueueConfig, base bucket.Policy) (bucket.Policy, error) {
	p := base
	if c.MaxWait != nil {
		if *c.MaxWait < 0 {
			return p, fmt.Errorf("queue: max_wait must not be negative, got %s", time.Duration(*c.MaxWait))
		}
		p.MaxWait = time.Duration(*c.MaxWait)
	}
	if c.MaxDepth < 0 {
		return p, fmt.Errorf("queue: max_depth must not be negative, got %d", c.MaxDepth)
	}
	if c.MaxDepth > 0 {
		p.MaxDepth = c.MaxDepth
	}
	return p, nil
}

// defaultPolicy is what a queue block with nothing in it means.
var defaultPolicy = bucket.Policy{MaxWait: DefaultMaxWait, MaxDepth: DefaultMaxDepth}

func (c *QueueConfig) compile() (queueSettings, error) {
	if c == nil {
		return queueSettings{}, nil
	}
	qs := queueSettings{enabled: true}
	var err error
	if qs.policy, err = compilePolicy(c, defaultPolicy); err != nil {
		return qs, err
	}
	for _, p := range c.FairBy {
		d, err := parseDimension(p)
		if err != nil {
			return qs, fmt.Errorf("queue: fair_by: %w", err)
		}
		qs.fairBy = append(qs.fairBy, d)
	}
	qs.priority, qs.priorityClasses = newValueSource(c.Priority), c.PriorityClasses
	for k, v := range c.PriorityClasses {
		if v < -maxPriority || v > maxPriority {
			return qs, fmt.Errorf("queue: priority class %q is %d, want between %d and %d", k, v, -maxPriority, maxPriority)
		}
	}
	qs.weight, qs.weights = newValueSource(c.Weight), c.Weights
	for k, v := range c.Weights {
		if !(v >= 1.0/maxWeight && v <= maxWeight) {
			return qs, fmt.Errorf("queue: weight of %q is %g, want between %g and %d", k, v, 1.0/maxWeight, maxWeight)
		}
	}
	if len(c.PriorityClasses) > 0 && !qs.priority.set {
		return qs, fmt.Errorf("queue: priority_classes without priority")
	}
	if len(c.Weights) > 0 && !qs.weight.set {
		return qs, fmt.Errorf("queue: weights without weight")
	}
	return qs, nil
}

// rulePolicy is a rule's queue policy: its own queue block over the
// handler's.
func rulePolicy(r *Rule, hq queueSettings) (bucket.Policy, error) {
	if r.Queue == nil {
		return hq.policy, nil
	}
	if len(r.Queue.FairBy) > 0 || r.Queue.Priority != "" || r.Queue.Weight != "" || len(r.Queue.PriorityClasses) > 0 || len(r.Queue.Weights) > 0 {
		return bucket.Policy{}, fmt.Errorf("queue: a rule's queue sets max_wait and max_depth only; fair_by, priority and weight belong to the handler")
	}
	return compilePolicy(r.Queue, hq.waitPolicy())
}

// waitPolicy is the handler's queue policy, or, without a queue block, the
// default one: what rules that set their own max_wait or max_depth, and
// adaptive mode (which always queues), start from.
func (qs *queueSettings) waitPolicy() bucket.Policy {
	if !qs.enabled {
		return defaultPolicy
	}
	return qs.policy
}

// appendFlow appends the request's fairness subject to dst.
func (qs *queueSettings) appendFlow(dst []byte, id *identity) []byte {
	if len(qs.fairBy) == 0 {
		v := id.user
		if v == "" {
			v = id.account
		}
		if v == "" {
			v = id.team
		}
		return append(dst, v...)
	}
	for _, d := range qs.fairBy {
		dst = appendKeyValue(dst, id.value(d.kind, d.metaKey))
	}
	return dst
}

// classOf returns the request's priority class.
func (qs *queueSettings) classOf(r *http.Request, repl *caddy.Replacer, id *identity) int {
	v := qs.priority.value(r, repl, id)
	if v == "" {
		return 0
	}
	if qs.priorityClasses != nil {
		return qs.priorityClasses[v]
	}
	n, err := strconv.Atoi(strings.TrimSpace(v))
	if err != nil {
		return 0
	}
	return min(max(n, -maxPriority), maxPriority)
}

// weightOf returns the request's weight.
func (qs *queueSettings) weightOf(r *http.Request, repl *caddy.Replacer, id *identity) float64 {
	v := qs.weight.value(r, repl, id)
	if v == "" {
		return 1
	}
	if qs.weights != nil {
		if w, ok := qs.weights[v]; ok {
			return w
		}
		return 1
	}
	w, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
	if err != nil || math.IsNaN(w) || w <= 0 {
		return 1
	}
	return min(max(w, 1.0/maxWeight), maxWeight)
}

// queueMessage explains a refusal by the queue.
func queueMessage(res bucket.Result, p bucket.Policy) string {
	switch res.Outcome {
	case bucket.Predicted:
		return fmt.Sprintf("; its queue would hold this request about %s, longer than the %s it may wait", res.Delay.Round(time.Millisecond), p.MaxWait)
	case bucket.TimedOut:
		return fmt.Sprintf("; the request waited %s in its queue without its turn coming", res.Waited.Round(time.Millisecond))
	case bucket.QueueFull:
		return fmt.Sprintf("; its queue is full (%d requests waiting)", p.MaxDepth)
	}
	return ""
}
