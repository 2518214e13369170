package llmratelimit

import (
	"encoding/binary"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/llmratelimit/caddy-llm-ratelimit/bucket"
)

// Rule limits the requests it matches: seed 003's rule, with an id, a when,
// one or more limits, and the dimensions that split it into buckets.
type Rule struct {
	// ID names the rule in headers, logs, errors and metrics. It is required
	// and unique within the handler. Rules with the same ID in handlers of the
	// same zone share their buckets.
	ID string `json:"id"`

	// When selects the requests the rule applies to. Missing, it matches every
	// request.
	When *When `json:"when,omitempty"`

	// Limits are the rule's limits. A request is admitted only if every limit
	// of every matching rule can take it. At least one is required, and a
	// rule has at most one limit per unit.
	Limits []Limit `json:"limits"`

	// AppliesPer splits the rule into one bucket per distinct value of these
	// dimensions: "user", "team", "virtualaccount", "model" and
	// "metadata.KEY". Empty, the rule has a single bucket shared by every
	// request it matches. A request with no value for a dimension shares
	// the bucket of the empty value.
	AppliesPer []string `json:"rate_limit_applies_per,omitempty"`

	// Mode is "enforce" (the default) or "shadow". A shadow rule counts,
	// logs and sets headers, but never refuses a request.
	Mode string `json:"mode,omitempty"`

	// Queue overrides the handler's queue for this rule's buckets: its
	// max_wait and max_depth. A rule with a queue block queues even when
	// the handler has none. Default: the handler's queue, if any.
	Queue *QueueConfig `json:"queue,omitempty"`
}

// When is a rule's condition. Its three parts are ANDed; within each list,
// any value matches. An empty part matches everything.
type When struct {
	// Subjects are "user:NAME", "team:NAME" and "virtualaccount:NAME". NAME
	// for a virtual account is compared after hashing (as the request's value
	// is), or may be given as "sha256:HEX", the key's SHA-256 in hex (all 64
	// digits or the first 32), to keep the key itself out of the config.
	Subjects []string `json:"subjects,omitempty"`
	// Models are model names. A trailing "*" makes a prefix: "gpt-4o*".
	Models []string `json:"models,omitempty"`
	// Metadata are key/value pairs that must all be present in the request's
	// metadata header.
	Metadata map[string]string `json:"metadata,omitempty"`
}

// Limit is one "limit_to per unit" limit.
type Limit struct {
	// LimitTo is how many requests or tokens the unit's window allows.
	LimitTo int64 `json:"limit_to"`
	// Unit is requests_per_{second,minute,hour,day},
	// tokens_per_{second,minute,hour,day}, or concurrent_requests: at most
	// LimitTo requests in flight at once, each holding its place until its
	// response ends (normally, in error, or because the client left).
	Unit string `json:"unit"`
	// Burst is the bucket's capacity: how much can be spent at once. Default:
	// LimitTo, the whole window's amount.
	Burst int64 `json:"burst,omitempty"`
}

// quantity is what a limit counts.
type quantity uint8

const (
	quantityRequests quantity = iota
	quantityTokens
)

func (q quantity) String() string {
	if q == quantityTokens {
		return "tokens"
	}
	return "requests"
}

// unitSpec describes a unit name.
type unitSpec struct {
	quantity quantity
	window   time.Duration
}

var units = map[string]unitSpec{
	"requests_per_second": {quantityRequests, time.Second},
	"requests_per_minute": {quantityRequests, time.Minute},
	"requests_per_hour":   {quantityRequests, time.Hour},
	"requests_per_day":    {quantityRequests, 24 * time.Hour},
	"tokens_per_second":   {quantityTokens, time.Second},
	"tokens_per_minute":   {quantityTokens, time.Minute},
	"tokens_per_hour":     {quantityTokens, time.Hour},
	"tokens_per_day":      {quantityTokens, 24 * time.Hour},
	// No window: a concurrency limit.
	"concurrent_requests": {quantityRequests, 0},
}

// unitNames lists the units for error messages.
func unitNames() string {
	names := make([]string, 0, len(units))
	for n := range units {
		names = append(names, n)
	}
	slices.Sort(names)
	return strings.Join(names, ", ")
}

// dimension is one entry of rate_limit_applies_per.
type dimension struct {
	kind    dimensionKind
	metaKey string
}

type dimensionKind uint8

const (
	dimUser dimensionKind = iota
	dimTeam
	dimVirtualAccount
	dimModel
	dimMetadata
)

// subject is one entry of when.subjects.
type subject struct {
	kind  dimensionKind // dimUser, dimTeam or dimVirtualAccount
	value string        // for virtual accounts, the hash
}

// modelPattern is one entry of when.models.
type modelPattern struct {
	name   string
	prefix bool
}

// newModelPattern reads a model name, where a trailing "*" makes a prefix.
func newModelPattern(s string) modelPattern {
	if name, ok := strings.CutSuffix(s, "*"); ok {
		return modelPattern{name: name, prefix: true}
	}
	return modelPattern{name: s}
}

func (m modelPattern) matches(model string) bool {
	if m.prefix {
		return strings.HasPrefix(model, m.name)
	}
	return model == m.name
}

// compiledLimit is a Limit ready for the hot path.
type compiledLimit struct {
	unit     string
	quantity quantity
	limit    bucket.Limit
	// keyPrefix starts every bucket key of this limit: the rule's prefix and
	// the unit.
	keyPrefix []byte
	// policy is the IETF RateLimit policy name, quoted: "ID/UNIT".
	policy string
	// hidden keeps the limit out of the response headers: adaptive mode's
	// concurrency bucket before a cap is learned, which only counts.
	hidden bool
	// window in seconds, for RateLimit-Policy's w parameter.
	windowSeconds int64
	// counters are the limit's decisions_total counters.
	counters *limitCounters
}

// compiledRule is a Rule ready for the hot path.
type compiledRule struct {
	id       string
	shadow   bool
	subjects []subject
	models   []modelPattern
	metadata []metaPair
	per      []dimension
	limits   []compiledLimit
	// prefix starts the keys of all the rule's buckets: zone, id and the
	// applies_per spec, so that a rule whose split changes starts afresh and
	// its old buckets are freed with the old rule.
	prefix string
	// perText describes the split for messages: "user, model".
	perText string
	// policy says how long and how many requests may wait for the rule's
	// buckets.
	policy bucket.Policy
	// learned marks adaptive mode's rule, whose limits are learned, so that
	// no configured rule is taken for it (none may be named "adaptive").
	learned bool
}

// keySep separates the fixed parts of a bucket key. Values taken from the
// request are length-prefixed instead, so no value can forge a separator.
const keySep = '\x1f'

// validRuleID reports whether id is safe in a header's quoted string, a log
// field and a metric label: printable ASCII without quotes, backslashes or
// spaces.
func validRuleID(id string) bool {
	if id == "" || len(id) > 128 {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if c <= ' ' || c >= 0x7f || c == '"' || c == '\\' {
			return false
		}
	}
	return true
}

// compileRules checks the rules and prepares them for the hot path.
func compileRules(zone string, rules []Rule) ([]compiledRule, error) {
	seen := make(map[string]bool, len(rules))
	out := make([]compiledRule, 0, len(rules))
	for i, r := range rules {
		if !validRuleID(r.ID) {
			return nil, fmt.Errorf("rule %d: id %q must be 1 to 128 printable ASCII characters without spaces, quotes or backslashes", i, r.ID)
		}
		if seen[r.ID] {
			return nil, fmt.Errorf("rule %q: duplicate id", r.ID)
		}
		if r.ID == adaptiveRuleID {
			return nil, fmt.Errorf("rule id %q is reserved for adaptive mode's learned limits: choose another", r.ID)
		}
		seen[r.ID] = true
		cr, err := compileRule(zone, r)
		if err != nil {
			return nil, fmt.Errorf("rule %q: %w", r.ID, err)
		}
		out = append(out, cr)
	}
	return out, nil
}

func compileRule(zone string, r Rule) (compiledRule, error) {
	cr := compiledRule{id: r.ID}
	switch r.Mode {
	case "", "enforce":
	case "shadow":
		cr.shadow = true
	default:
		return cr, fmt.Errorf("mode %q: want enforce or shadow", r.Mode)
	}
	if r.When != nil {
		for _, s := range r.When.Subjects {
			sub, err := parseSubject(s)
			if err != nil {
				return cr, err
			}
			cr.subjects = append(cr.subjects, sub)
		}
		for _, m := range r.When.Models {
			if m == "" {
				return cr, fmt.Errorf("models: empty model name")
			}
			cr.models = append(cr.models, newModelPattern(m))
		}
		keys := make([]string, 0, len(r.When.Metadata))
		for k := range r.When.Metadata {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			if k == "" {
				return cr, fmt.Errorf("metadata: empty key")
			}
			cr.metadata = append(cr.metadata, metaPair{key: k, value: r.When.Metadata[k]})
		}
	}
	var perText []string
	for _, p := range r.AppliesPer {
		d, err := parseDimension(p)
		if err != nil {
			return cr, err
		}
		if slices.Contains(cr.per, d) {
			return cr, fmt.Errorf("rate_limit_applies_per: %q listed twice", p)
		}
		cr.per = append(cr.per, d)
		perText = append(perText, p)
	}
	cr.perText = strings.Join(perText, ", ")
	cr.prefix = zone + string(keySep) + r.ID + string(keySep) + strings.Join(perText, ",") + string(keySep)

	if len(r.Limits) == 0 {
		return cr, fmt.Errorf("no limits: a rule needs at least one limit")
	}
	for _, l := range r.Limits {
		u, ok := units[l.Unit]
		if !ok {
			return cr, fmt.Errorf("unknown unit %q: want one of %s", l.Unit, unitNames())
		}
		for _, prev := range cr.limits {
			if prev.unit == l.Unit {
				return cr, fmt.Errorf("two limits with unit %s: a rule has at most one limit per unit", l.Unit)
			}
		}
		bl := bucket.Limit{Count: l.LimitTo, Window: u.window, Burst: l.Burst}
		if err := bl.Validate(); err != nil {
			return cr, fmt.Errorf("limit %d %s: %w", l.LimitTo, l.Unit, err)
		}
		cr.limits = append(cr.limits, compiledLimit{
			unit:          l.Unit,
			quantity:      u.quantity,
			limit:         bl,
			keyPrefix:     []byte(cr.prefix + l.Unit + string(keySep)),
			policy:        `"` + r.ID + "/" + l.Unit + `"`,
			windowSeconds: int64(u.window / time.Second),
			counters:      metrics.limitCounters(zone, r.ID, l.Unit),
		})
	}
	return cr, nil
}

func parseSubject(s string) (subject, error) {
	// Error messages name the kind but never the value: a mistyped
	// virtualaccount subject may hold an API key.
	kind, value, ok := strings.Cut(s, ":")
	if !ok || value == "" {
		return subject{}, fmt.Errorf("subject of kind %q has no value: want user:NAME, team:NAME or virtualaccount:NAME", kind)
	}
	switch kind {
	case "user":
		// Bounded as the request's value is, so that long names match.
		return subject{kind: dimUser, value: boundedValue(value)}, nil
	case "team":
		return subject{kind: dimTeam, value: boundedValue(value)}, nil
	case "virtualaccount":
		if h, ok := strings.CutPrefix(value, "sha256:"); ok {
			// The full digest (64 hex digits) or the 32 the module keeps.
			h = strings.ToLower(h)
			if len(h) != 32 && len(h) != 64 || strings.Trim(h, "0123456789abcdef") != "" {
				return subject{}, fmt.Errorf("virtualaccount subject: sha256: must be followed by the 64 (or first 32) hex digits of the key's SHA-256")
			}
			return subject{kind: dimVirtualAccount, value: h[:32]}, nil
		}
		return subject{kind: dimVirtualAccount, value: hashAccount(value)}, nil
	}
	if len(kind) > 32 {
		kind = kind[:32] + "…"
	}
	return subject{}, fmt.Errorf("subject: unknown kind %q, want user, team or virtualaccount", kind)
}

func parseDimension(p string) (dimension, error) {
	switch p {
	case "user":
		return dimension{kind: dimUser}, nil
	case "team":
		return dimension{kind: dimTeam}, nil
	case "virtualaccount":
		return dimension{kind: dimVirtualAccount}, nil
	case "model":
		return dimension{kind: dimModel}, nil
	}
	if k, ok := strings.CutPrefix(p, "metadata."); ok && k != "" {
		return dimension{kind: dimMetadata, metaKey: k}, nil
	}
	return dimension{}, fmt.Errorf("rate_limit_applies_per: unknown dimension %q, want user, team, virtualaccount, model or metadata.KEY", p)
}

// matches reports whether the rule applies to the request.
func (cr *compiledRule) matches(id *identity) bool {
	if len(cr.subjects) > 0 {
		ok := false
		for _, s := range cr.subjects {
			if v := id.value(s.kind, ""); v != "" && v == s.value {
				ok = true
				break
			}
		}
		if !ok {
			return false
		}
	}
	if len(cr.models) > 0 {
		ok := false
		for _, m := range cr.models {
			if m.matches(id.model) {
				ok = true
				break
			}
		}
		if !ok {
			return false
		}
	}
	for _, p := range cr.metadata {
		if v, ok := id.meta(p.key); !ok || v != p.value {
			return false
		}
	}
	return true
}

// appendKey appends the bucket key of limit l of this rule for the request.
func (cr *compiledRule) appendKey(dst []byte, l *compiledLimit, id *identity) []byte {
	dst = append(dst, l.keyPrefix...)
	for _, d := range cr.per {
		dst = appendKeyValue(dst, id.value(d.kind, d.metaKey))
	}
	return dst
}

// appendKeyValue appends a value taken from the request to a bucket key,
// length-prefixed so that no value can pose as a separator.
func appendKeyValue(dst []byte, v string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(v)))
	return append(dst, v...)
}
