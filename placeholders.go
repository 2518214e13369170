package llmratelimit

import (
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/llmratelimit/caddy-llm-ratelimit/bucket"
)

// placeholderPrefix starts the placeholders the handler sets on each
// request it considers.
const placeholderPrefix = "http.llm_rate_limit."

// decisionVars is what a request's {http.llm_rate_limit.*} placeholders
// show. They are read through a replacer provider rather than set one by
// one: the values are formatted only when a log or header asks for them,
// and a request costs two or three small allocations (the values and the
// provider) however many are used. Caddy's
// access log reads them after the handler has returned (log_append), so
// they are a copy that outlives the pooled exchange.
//
//	{http.llm_rate_limit.rule}              the rule whose limit decided: the one that refused
//	                                        the request or made it wait longest, else the first
//	                                        rule that matched (enforcing rules first); empty when
//	                                        none matched
//	{http.llm_rate_limit.unit}              that limit's unit
//	{http.llm_rate_limit.rules}             every rule that matched, comma-separated
//	{http.llm_rate_limit.decision}          admitted, delayed, refused, canceled, or unlimited
//	                                        (no rule matched)
//	{http.llm_rate_limit.model}             the model the request named
//	{http.llm_rate_limit.user}              the user; without one, "sha256:" and the hash of the
//	                                        virtual account (the API key itself never)
//	{http.llm_rate_limit.wait}              time spent in the queue (a duration)
//	{http.llm_rate_limit.wait_ms}           the same in whole milliseconds
//	{http.llm_rate_limit.tokens_estimated}  tokens charged at admission
//	{http.llm_rate_limit.tokens_used}       tokens settled after the response
//	{http.llm_rate_limit.attempts}          upstream attempts: 1 for a request sent on, more when
//	                                        adaptive mode retried, 0 when it was not sent
//
// They are set once the request's body is read and its rules matched; a
// request answered before that (a body too large or not JSON) has none.
type decisionVars struct {
	rule, unit, decision string
	// rules are the matching rules, joined only when asked for.
	rules []*compiledRule
	model string
	user  string
	wait  time.Duration
	// estimated and used are tokens; attempts counts upstream attempts.
	estimated, used int64
	attempts        int
}

// attachVars registers the request's placeholders and returns the values
// to fill in as the request goes on.
func attachVars(r *http.Request, x *exchange) *decisionVars {
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	if repl == nil {
		return nil
	}
	d := &decisionVars{model: x.id.model, user: x.id.user, decision: "unlimited"}
	if d.user == "" && x.id.account != "" {
		d.user = "sha256:" + x.id.account
	}
	repl.Map(d.get)
	return d
}

// decided records the admission decision.
func (d *decisionVars) decided(x *exchange, out *outcome) {
	if d == nil {
		return
	}
	d.wait = out.Waited
	switch {
	case out.Outcome == bucket.Canceled:
		d.decision = outcomeCanceled
	case !out.Allowed:
		d.decision = outcomeRefused
	case out.Waited > 0:
		d.decision = outcomeDelayed
	default:
		d.decision = outcomeAdmitted
	}
	i := out.Limiting
	if i < 0 || i >= x.nEnforce {
		i = 0
	}
	if i < len(x.applied) {
		a := x.applied[i]
		d.rule, d.unit = a.rule.id, a.limit.unit
	}
	for _, a := range x.applied {
		if n := len(d.rules); n == 0 || d.rules[n-1] != a.rule {
			d.rules = append(d.rules, a.rule)
		}
	}
	if x.tokenCharges > 0 {
		d.estimated = x.promptEst + x.completionEst
	}
}

func (d *decisionVars) get(key string) (any, bool) {
	name, ok := strings.CutPrefix(key, placeholderPrefix)
	if !ok {
		return nil, false
	}
	switch name {
	case "rule":
		return d.rule, true
	case "unit":
		return d.unit, true
	case "rules":
		ids := make([]string, len(d.rules))
		for i, r := range d.rules {
			ids[i] = r.id
		}
		return strings.Join(ids, ","), true
	case "decision":
		return d.decision, true
	case "model":
		return d.model, true
	case "user":
		return d.user, true
	case "wait":
		return d.wait, true
	case "wait_ms":
		return d.wait.Milliseconds(), true
	case "tokens_estimated":
		return d.estimated, true
	case "tokens_used":
		return d.used, true
	case "attempts":
		return d.attempts, true
	}
	return nil, false
}
